"""BERT encoder: word + position + token-type embeddings, post-LN layers, exact-GELU MLP, pooler.

Parameters: embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding,
embeddings/layer_norm, layers/..., pooler/dense/{kernel,bias} (``pool`` applies the pooler).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.models.attention import prepare_attention
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.models.layers import LayerNorm, LayerStack
from mtl_jax.models.peft_layers import Dense


def embed(num: int, features: int, axes, cfg: EncoderConfig, name: str) -> nn.Embed:
    return nn.Embed(num, features, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                    name=name)


class BertEmbeddings(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool, position_ids=None):
        cfg = self.cfg
        length = input_ids.shape[1]
        # packed rows (position_ids given) restart positions per segment: any row length fits
        if position_ids is None and length > cfg.max_position_embeddings:
            raise UserError(f"sequence length {length} exceeds the encoder's "
                            f"max_position_embeddings={cfg.max_position_embeddings}; use shorter "
                            "buckets (data.buckets)")
        e = cfg.hidden_size
        x = embed(cfg.vocab_size, e, ("vocab", "embed"), cfg, "word_embeddings")(input_ids)
        x = x + embed(cfg.max_position_embeddings, e, (None, "embed"), cfg,
                      "position_embeddings")(
            jnp.arange(length)[None] if position_ids is None else position_ids)
        x = x + embed(cfg.type_vocab_size, e, (None, "embed"), cfg,
                      "token_type_embeddings")(token_type_ids)
        x = LayerNorm(cfg, name="layer_norm")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class BertPooler(nn.Module):
    """tanh(dense(hidden[:, 0])): BERT's next-sentence pooler, params pooler/dense."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, hidden):
        dense = Dense((self.cfg.hidden_size,), ("embed", "mlp"), self.cfg, allow_lora=False,
                      name="dense")
        return jnp.tanh(dense(hidden[:, 0])).astype(jnp.float32)


class BertEncoder(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, task_ids=None,
                 prefix=None, deterministic: bool = True, segment_ids=None, position_ids=None):
        # segment_ids / position_ids: packed rows (models/packing.py)
        cfg = self.cfg
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic,
                                                   position_ids)
        mask, bias, prefix_kv = prepare_attention(attention_mask, prefix, cfg.num_layers,
                                                  cfg.num_heads, cfg.head_dim,
                                                  segment_ids=segment_ids)
        x = LayerStack(cfg, name="layers")(x, prefix_kv, bias, mask, task_ids, deterministic)
        if self.is_initializing():  # create pooler/dense; heads apply it through `pool`
            BertPooler(cfg, name="pooler")(x)
        return x.astype(jnp.float32)


def pool(params, hidden, cfg: EncoderConfig):
    """BERT pooler output [B, hidden] from the encoder's params (needs params["pooler"])."""
    if "pooler" not in params:
        raise UserError("this encoder has no pooler weights; use heads.pooling=cls or mean")
    return BertPooler(cfg).apply({"params": params["pooler"]}, hidden)
