"""Task heads, one per task, chosen by task type (registry ``HEADS``), and sentence pooling.

A head reads ``Features`` (the encoder's hidden states, the padding mask and a pooled sentence
vector) and returns the task's output for every example of the batch:

  sequence_classification  [B, C] logits          sequence_regression  [B] prediction
  token_classification     [B, L, C] logits        extractive_qa        [B, L, 2] start/end logits
  multiple_choice          [B, C] choice scores

Heads live under ``params["heads"][<task name>]``; each task has its own, even when two tasks
share a type.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.registry import Registry

HEADS: Registry[type] = Registry("head (task type)")
POOLINGS: Registry[Callable] = Registry("pooling")

_INIT = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range


class Features(NamedTuple):
    """What the encoder hands to every head."""

    hidden: jax.Array  # [B, L, H] float32
    mask: jax.Array  # [B, L] attention mask (1 = real token)
    pooled: jax.Array  # [B, H] sentence vector (heads.pooling)
    # [B, C, H] the pooled vector of each choice slot (models/choices.py); None without a choice
    # axis (a run without a multiple-choice task). The fields above are slot 0's.
    choices: Optional[jax.Array] = None


# --- pooling ----------------------------------------------------------------------------------
# A pooling maps (hidden [B, L, H], mask [B, L], encoder params) -> [B, H].


@POOLINGS.register("cls")
def cls_pooling(hidden, mask, encoder_params):
    del mask, encoder_params
    return hidden[:, 0]


@POOLINGS.register("mean")
def mean_pooling(hidden, mask, encoder_params):
    del encoder_params
    m = mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


@POOLINGS.register("pooler")
def bert_pooler(hidden, mask, encoder_params):
    """BERT's pooler: tanh(W h_[CLS] + b), with the checkpoint's ``pooler/dense`` weights."""
    del mask
    dense = nn.unbox(encoder_params["pooler"]["dense"])
    return jnp.tanh(hidden[:, 0] @ dense["kernel"] + dense["bias"])


def check_pooling(pooling: str, encoder_params) -> None:
    """Fails early (one line) when ``pooler`` pooling is asked of an encoder without a pooler."""
    POOLINGS.get(pooling)
    if pooling == "pooler" and "pooler" not in encoder_params:
        raise UserError("heads.pooling=pooler but the encoder has no pooler/dense weights; "
                        "set heads.pooling=cls or mean")


# --- heads ------------------------------------------------------------------------------------


class _Head(nn.Module):
    num_labels: int
    dropout: float = 0.1


@HEADS.register("sequence_classification")
class SequenceClassificationHead(_Head):
    @nn.compact
    def __call__(self, f: Features, deterministic: bool = True):
        x = nn.Dropout(self.dropout)(f.pooled, deterministic=deterministic)
        return nn.Dense(self.num_labels, kernel_init=_INIT, name="dense")(x)


@HEADS.register("sequence_regression")
class RegressionHead(_Head):
    @nn.compact
    def __call__(self, f: Features, deterministic: bool = True):
        x = nn.Dropout(self.dropout)(f.pooled, deterministic=deterministic)
        return nn.Dense(1, kernel_init=_INIT, name="dense")(x)[:, 0]


@HEADS.register("token_classification")
class TokenClassificationHead(_Head):
    @nn.compact
    def __call__(self, f: Features, deterministic: bool = True):
        x = nn.Dropout(self.dropout)(f.hidden, deterministic=deterministic)
        return nn.Dense(self.num_labels, kernel_init=_INIT, name="dense")(x)


@HEADS.register("extractive_qa")
class SpanHead(_Head):
    """Start/end logits per token (no dropout, like BERT's QA head)."""

    @nn.compact
    def __call__(self, f: Features, deterministic: bool = True):
        del deterministic
        return nn.Dense(2, kernel_init=_INIT, name="dense")(f.hidden)


@HEADS.register("multiple_choice")
class MultipleChoiceHead(_Head):
    """One score per choice from its pooled vector: dropout -> Dense(hidden, 1), the layout of
    Transformers' ``BertForMultipleChoice`` classifier (pooler -> dropout -> Linear(hidden, 1),
    ``dense/kernel`` [H, 1] = ``classifier.weight`` transposed). ``num_labels`` is the task's
    number of choices: slots past it (a run whose other multiple-choice task has more) are cut."""

    @nn.compact
    def __call__(self, f: Features, deterministic: bool = True):
        if f.choices is None:
            raise ValueError("a multiple-choice head needs Features.choices (a batch with a "
                             "choice axis, see models/choices.py)")
        x = nn.Dropout(self.dropout)(f.choices[:, :self.num_labels], deterministic=deterministic)
        return nn.Dense(1, kernel_init=_INIT, name="dense")(x)[..., 0]


def build_head(task_type: str, num_labels: int, dropout: float,
               name: Optional[str] = None) -> nn.Module:
    return HEADS.get(task_type)(num_labels=num_labels, dropout=dropout, name=name)
