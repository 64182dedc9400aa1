"""build_encoder(cfg) -> the family's Flax module, and a helper to initialise its parameters.

Call (docs/architecture.md):
    hidden = encoder.apply({"params": p}, input_ids, attention_mask, token_type_ids=None,
                           task_ids=None, prefix=None, deterministic=True, rngs=...)
returns [B, L, hidden] float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.bert import BertEncoder
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.models.t5 import T5Encoder
from mtl_jax.registry import Registry

ENCODERS: Registry[type] = Registry("encoder family")
ENCODERS.register("bert", BertEncoder)
ENCODERS.register("t5", T5Encoder)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    return ENCODERS.get(cfg.family)(cfg)


def init_encoder_params(encoder: nn.Module, rng, seq_len: int = 8, boxed: bool = False):
    """Random parameters (float32). boxed=True keeps the nn.Partitioned logical-axis metadata
    (what ``nn.get_partition_spec`` reads); the default returns plain arrays."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    task_ids = jnp.zeros((1,), jnp.int32)
    init = jax.jit(lambda r: encoder.init(r, ids, jnp.ones_like(ids), task_ids=task_ids))
    params = init(rng)["params"]
    return params if boxed else nn.meta.unbox(params)
