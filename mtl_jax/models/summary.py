"""Parameter labels (for optimizer groups), the trainable mask, and the one-line parameter summary.

Labels, by parameter path:
  prefix/...                                   "prefix"
  heads/<task>/...                             "heads/<task>"
  encoder/... with a lora_a|lora_b|*adapter* part "peft"
  encoder/pooler/...                           "pooler"
  encoder/<embeddings>/...                     "embeddings" (word/position/type, T5 "shared")
  any other encoder/...                        "encoder"
With a PEFT kind that freezes the checkpoint (``PeftKind.freezes_checkpoint``: prefix, adapter,
lora) "embeddings", "encoder" and "pooler" (``FROZEN_BY_PEFT``) are frozen by default.

``count``/``summary`` take a trainable mask: ``MultiTaskModel`` passes the optimizer's (from
``optim.groups``, which may freeze more than PEFT does); ``trainable_mask(params, peft_kind)`` is
the PEFT-only default the optimizer's default groups reproduce.
"""
from __future__ import annotations

import re

import jax
import numpy as np

from mtl_jax.models.peft_layers import PEFT_KINDS

PEFT_PATH = re.compile(r"(^|/)(lora_a|lora_b|[^/]*adapter[^/]*)(/|$)")
EMBEDDING_SCOPES = re.compile(r"^(embeddings|embedder|shared|token_embedder|word_embeddings)$")
FROZEN_BY_PEFT = ("embeddings", "encoder", "pooler")


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def label_for(names: list[str]) -> str:
    top = names[0]
    if top == "prefix":
        return "prefix"
    if top == "heads":
        return f"heads/{names[1]}"
    inner = names[1:]
    if PEFT_PATH.search("/".join(inner)):
        return "peft"
    if inner and inner[0] == "pooler":
        return "pooler"
    if inner and EMBEDDING_SCOPES.match(inner[0]):
        return "embeddings"
    return "encoder"


def param_labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: label_for(_names(p)), params)


def frozen_labels(peft_kind: str) -> tuple[str, ...]:
    """The labels ``peft_kind`` freezes by default: the pretrained checkpoint's, or none."""
    return FROZEN_BY_PEFT if PEFT_KINDS.get(peft_kind).freezes_checkpoint else ()


def trainable_mask(params, peft_kind: str):
    frozen = frozen_labels(peft_kind)
    return jax.tree.map(lambda label: label not in frozen, param_labels(params))


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e7 else f"{n / 1e6:.3g}M"  # 22.7M, 109.5M, 0.59M


def count(params, trainable) -> tuple[int, int]:
    """(total, trainable) parameter counts; ``trainable``: a params-shaped tree of bools. Works on
    arrays and ShapeDtypeStructs."""
    sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
    mask = jax.tree.structure(params).flatten_up_to(trainable)
    return sum(sizes), sum(s for s, m in zip(sizes, mask) if m)


def summary(params, trainable) -> str:
    """"params: total 22.7M, trainable 0.59M (2.6%)"; ``trainable`` as in ``count``."""
    total, n_trainable = count(params, trainable)
    pct = 100.0 * n_trainable / max(total, 1)
    pct_text = f"{pct:.1f}" if pct >= 1 else f"{pct:.2g}"
    return f"params: total {_millions(total)}, trainable {_millions(n_trainable)} ({pct_text}%)"


def trainable_fraction(params, peft_kind: str) -> float:
    total, trainable = count(params, trainable_mask(params, peft_kind))
    return trainable / max(total, 1)
