"""The FLOPs count and model FLOPs utilisation (MFU), in one place.

Per token of an encoder with N non-embedding parameters, L layers, attention width d (heads x
head_dim: the hidden size for BERT) and sequence length s (Kaplan et al. 2020; PaLM appendix B),
where a matmul with n weights costs 2n FLOPs forward, 2n for the activation gradients and 2n for
the weight gradients:

    training:      6 N + 12 L d s     (forward 2N + 4Lds for the matmuls and attention scores,
                                       backward twice the forward)
    forward only:  2 N +  4 L d s     (= training / 3)

``TrainCost`` refines the training count for what this model really runs (``train_cost``):

  - N counts the parameters ONE example multiplies. Soft sharing stores T encoders but each
    example is its own task's, so an encoder leaf [T, ...] counts 1/T; so do the per-task
    adapter/LoRA tables [T, ...] (each example gathers its task's rows). Every head runs on every
    example, so heads count fully. Embedding tables and the prefix MLP (once per step on the
    T x P table, not per token) count 0. In mixed soft-sharing batches the step runs all T
    encoders on every example; the other T-1 are waste, not model FLOPs (lower MFU).
  - Weight gradients (2n) only for trainable parameters (``frozen``: the optimizer's groups, so
    PEFT and frozen ``optim.groups`` alike). Activation gradients (2N, and the attention-score
    backward 8 L d s', which has no weights) whenever a parameter in or below the encoder trains;
    when only the heads and pooler train, only theirs.
  - Prefix tuning adds P keys per layer: the attention terms use s' = s + P.

    training per token = 4N + 2 N_trainable + 12 L d s'              (encoder backward)
                       = 2N + 2 N_heads + 2 N_trainable + 4 L d s'   (only heads/pooler train)

which is 6N + 12Lds for full fine-tuning. Conventions kept from the plain count: heads and the
pooler count per token although sequence heads run once per example, and the lowest layer's
activation gradients are counted although nothing below it may train (both slightly high).

MFU = achieved model FLOPs/s / (device peak x devices), with the dense bf16 peak of the device.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from mtl_jax.models import param_groups

# Dense bf16 peak FLOPs/s per device (vendor data sheets), matched on jax's device_kind.
# Ordered: the first pattern found in the lower-cased device kind wins.
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
)

_EMBEDDING_PATH = re.compile(r"(^|/)(embeddings|embed_tokens|shared)(/|$)")


def train_flops_per_token(non_embedding_params: int, num_layers: int, hidden_size: int,
                          seq_len: int) -> float:
    return 6.0 * non_embedding_params + 12.0 * num_layers * hidden_size * seq_len


def forward_flops_per_token(non_embedding_params: int, num_layers: int, hidden_size: int,
                            seq_len: int) -> float:
    return train_flops_per_token(non_embedding_params, num_layers, hidden_size, seq_len) / 3.0


def train_flops_per_example(non_embedding_params: int, num_layers: int, hidden_size: int,
                            seq_len: int) -> float:
    """FLOPs of one training example padded to ``seq_len`` (padding is computed, so counted)."""
    return seq_len * train_flops_per_token(non_embedding_params, num_layers, hidden_size, seq_len)


@dataclasses.dataclass(frozen=True)
class TrainCost:
    """Per-token parameter counts of one example's path through the model (see the module
    docstring), computed once per run from shapes."""

    params: float  # N: parameters one example multiplies per token
    trainable: float  # the part of N that gets weight gradients
    head_params: float  # the part of N after the encoder (heads, pooler)
    encoder_backward: bool  # a parameter in or below the encoder trains
    num_layers: int
    attention_dim: int  # num_heads * head_dim (the hidden size for BERT)
    prefix_length: int = 0

    def per_token(self, seq_len: int) -> float:
        attention = 4.0 * self.num_layers * self.attention_dim * (seq_len + self.prefix_length)
        if self.encoder_backward:
            activation_grads = 2.0 * self.params + 2.0 * attention
        else:
            activation_grads = 2.0 * self.head_params
        return 2.0 * self.params + attention + activation_grads + 2.0 * self.trainable

    def per_example(self, seq_len: int) -> float:
        """FLOPs of one training example padded to ``seq_len`` (padding is computed, so counted)."""
        return seq_len * self.per_token(seq_len)


# Label kind (``param_labels`` up to the first "/") -> the share of a leaf's parameters one example
# multiplies per token, given (the sharing strategy's encoder share, number of tasks).
PER_TOKEN_SHARE: dict[str, Callable[[float, int], float]] = {
    "embeddings": lambda share, t: 0.0,  # table lookups
    "prefix": lambda share, t: 0.0,  # the prefix MLP runs once per step, not per token
    "peft": lambda share, t: 1.0 / t,  # [T, ...]: each example gathers its own task's rows
    "encoder": lambda share, t: share,  # soft: T stacked encoders, one used (share 1/T)
    "pooler": lambda share, t: share,
    "heads": lambda share, t: 1.0,  # every head runs on every example
}
HEAD_SIDE = ("heads", "pooler")  # after the encoder: training only these needs no encoder backward


def train_cost(params: Any, labels: Any, frozen: Any, *, encoder_share: float, num_tasks: int,
               num_layers: int, attention_dim: int, prefix_length: int = 0) -> TrainCost:
    """``TrainCost`` from the params (arrays or ShapeDtypeStructs), their labels
    (``MultiTaskModel.param_labels``) and the optimizer's frozen mask
    (``param_groups.frozen_mask``)."""
    treedef = jax.tree.structure(params)
    n = trainable = heads = 0.0
    encoder_backward = False
    for leaf, label, is_frozen in zip(jax.tree.leaves(params), treedef.flatten_up_to(labels),
                                      treedef.flatten_up_to(frozen)):
        kind = label.split("/")[0]
        size = int(np.prod(np.shape(leaf))) * PER_TOKEN_SHARE[kind](encoder_share, num_tasks)
        n += size
        heads += size if kind in HEAD_SIDE else 0.0
        trainable += 0.0 if is_frozen else size
        encoder_backward |= not is_frozen and kind not in HEAD_SIDE
    return TrainCost(params=n, trainable=trainable, head_params=heads,
                     encoder_backward=encoder_backward, num_layers=num_layers,
                     attention_dim=attention_dim, prefix_length=prefix_length)


def train_cost_of(model) -> TrainCost:
    """``train_cost`` of a ``MultiTaskModel`` (shapes only: nothing is initialised)."""
    shapes = model.abstract_params()
    labels = model.param_labels(shapes)
    enc = model.encoder_config
    prefix = shapes.get("prefix", {}).get("embedding")  # [T, P, hidden]
    return train_cost(shapes, labels, param_groups.frozen_mask(model.config, shapes, labels),
                      encoder_share=model.sharing_strategy.encoder_share(model.num_tasks),
                      num_tasks=model.num_tasks,
                      num_layers=enc.num_layers, attention_dim=enc.num_heads * enc.head_dim,
                      prefix_length=0 if prefix is None else prefix.shape[1])


def non_embedding_params(params: Any, labels: Any = None) -> int:
    """Parameters outside the embedding tables (token, position, segment, T5 ``shared``).

    ``labels``: optional tree of the same structure (``MultiTaskModel.param_labels``); then
    every leaf labelled "embeddings" is excluded instead of matching paths.
    """
    if labels is not None:
        sizes = jax.tree.leaves(jax.tree.map(
            lambda p, label: 0 if label == "embeddings" else int(np.size(p)), params, labels))
        return int(sum(sizes))
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)
        if not _EMBEDDING_PATH.search(name):
            total += int(np.prod(np.shape(leaf)))
    return total


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOPs/s of ``device`` (default: the first); None on CPU or unknown."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for pattern, peak in PEAK_FLOPS:
        if pattern in kind:
            return peak
    return None


def mfu(examples_per_sec: float, flops_per_example: float, peak_flops_per_device: float | None,
        num_devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown (omit it from logs)."""
    if not peak_flops_per_device:
        return None
    return examples_per_sec * flops_per_example / (peak_flops_per_device * num_devices)
