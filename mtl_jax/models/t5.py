"""T5 encoder: RMS norm, pre-LN layers, unscaled attention with one relative position bias.

Parameters: embeddings/word_embeddings/embedding (HF ``shared.weight``),
relative_attention_bias/embedding [buckets, heads] (HF block 0's, shared by every layer),
layers/..., final_norm/scale.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.attention import prepare_attention
from mtl_jax.models.bert import embed
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.models.layers import LayerStack, RMSNorm


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[L, L] bucket of (key - query) for bidirectional attention, as HF T5 (host constant)."""
    position = np.arange(length)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int32) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (np.log(np.maximum(distance, 1) / max_exact)
                             / math.log(max_distance / max_exact) * (half - max_exact))
    large = np.minimum(large.astype(np.int32), half - 1)
    return buckets + np.where(distance < max_exact, distance, large).astype(np.int32)


class RelativePositionBias(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, length: int):
        cfg = self.cfg
        table = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "heads")),
            (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
        buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]  # [1, heads, L, L] float32


class T5Embeddings(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.cfg
        return embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), cfg,
                     "word_embeddings")(input_ids)


class T5Encoder(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, task_ids=None,
                 prefix=None, deterministic: bool = True, segment_ids=None, position_ids=None):
        # T5 has no segment embeddings; packed rows (models/packing.py) need no position ids:
        # the relative bias depends on key - query only, the same inside a segment anywhere.
        del token_type_ids, position_ids
        cfg = self.cfg
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        dropout = lambda h: nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)  # noqa
        x = dropout(T5Embeddings(cfg, name="embeddings")(input_ids))
        position_bias = RelativePositionBias(cfg, name="relative_attention_bias")(
            input_ids.shape[1])
        mask, bias, prefix_kv = prepare_attention(attention_mask, prefix, cfg.num_layers,
                                                  cfg.num_heads, cfg.head_dim, position_bias,
                                                  segment_ids=segment_ids)
        x = LayerStack(cfg, name="layers")(x, prefix_kv, bias, mask, task_ids, deterministic)
        x = RMSNorm(cfg, name="final_norm")(x)
        return dropout(x).astype(jnp.float32)
