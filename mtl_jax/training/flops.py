"""The FLOPs count and model FLOPs utilisation (MFU), in one place.

Per token of an encoder with N non-embedding parameters, L layers, hidden size d and sequence
length s (Kaplan et al. 2020; PaLM appendix B):

    training:      6 N + 12 L d s     (forward 2N + 4Lds for the matmuls and attention scores,
                                       backward twice the forward)
    forward only:  2 N +  4 L d s     (= training / 3)

MFU = achieved model FLOPs/s / (device peak x devices), with the dense bf16 peak of the device.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

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
