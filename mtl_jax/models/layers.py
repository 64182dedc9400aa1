"""Transformer pieces shared by BERT and T5: norms, self-attention, MLP, layer, layer stack.

The two families differ only in the traits below (norm kind and position, biases, attention
scale, MLP dropout); every other line is shared, and so are the submodule names
(``attention/{query,key,value,output}``, ``mlp/{wi|wi_0,wi_1,wo}``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.attention import dot_product_attention, resolve_attention_impl
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.models.peft_layers import ACTIVATIONS, Adapter, Dense
from mtl_jax.registry import Registry


def LayerNorm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:  # noqa: N802 (used like a class)
    """BERT's LayerNorm (statistics in float32, two-pass variance as in PyTorch)."""
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name)


class RMSNorm(nn.Module):
    """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale, no mean subtraction and no bias."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                                  + self.cfg.layer_norm_eps)
        return (x32 * scale).astype(self.cfg.compute_dtype)


@dataclasses.dataclass(frozen=True)
class FamilyTraits:
    norm: Callable  # LayerNorm | RMSNorm, called as norm(cfg, name=...)
    pre_norm: bool  # T5: x + f(norm(x)); BERT: norm(x + f(x))
    use_bias: bool  # biases on the dense projections
    attention_scale: Optional[float]  # None = 1/sqrt(head_dim); T5 folds it into its init: 1.0
    mlp_inner_dropout: bool  # T5 drops out between wi and wo
    mlp_activation: Callable[[EncoderConfig], tuple[str, bool]]  # cfg -> (activation, gated)
    # The longest input the family can position: BERT's absolute table; None (T5's relative
    # bias has no limit).
    max_positions: Callable[[EncoderConfig], Optional[int]] = lambda cfg: None


def _t5_activation(cfg: EncoderConfig) -> tuple[str, bool]:
    """'relu' -> (relu, False); 'gated-gelu' -> (gelu_new, True), as HF T5Config does."""
    gated = cfg.feed_forward_proj.startswith("gated-")
    act = cfg.feed_forward_proj.split("-")[-1]
    return ("gelu_new" if act == "gelu" else act), gated


FAMILY_TRAITS: Registry[FamilyTraits] = Registry("encoder family")
FAMILY_TRAITS.register("bert", FamilyTraits(
    norm=LayerNorm, pre_norm=False, use_bias=True, attention_scale=None,
    mlp_inner_dropout=False, mlp_activation=lambda cfg: (cfg.hidden_act, False),
    max_positions=lambda cfg: cfg.max_position_embeddings))
FAMILY_TRAITS.register("t5", FamilyTraits(
    norm=RMSNorm, pre_norm=True, use_bias=False, attention_scale=1.0,
    mlp_inner_dropout=True, mlp_activation=_t5_activation))


class SelfAttention(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x, bias, mask, prefix_kv, task_ids, deterministic: bool):
        cfg = self.cfg
        traits = FAMILY_TRAITS.get(cfg.family)
        heads = (cfg.num_heads, cfg.head_dim)

        def project(name):
            dense = Dense(heads, ("embed", "heads", "kv"), cfg, use_bias=traits.use_bias, name=name)
            return dense(x, task_ids, deterministic)

        q, k, v = project("query"), project("key"), project("value")
        if prefix_kv is not None:  # prefix keys/values go before the sequence's own
            k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
        use_dropout = not deterministic and cfg.attention_dropout > 0.0
        out = dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=traits.attention_scale,
            implementation=resolve_attention_impl(cfg.attention_impl, cfg.compute_dtype),
            dropout_rate=cfg.attention_dropout if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None)
        output = Dense((cfg.hidden_size,), ("heads", "kv", "embed"), cfg, n_in=2,
                       use_bias=traits.use_bias, name="output")
        return output(out, task_ids, deterministic)


class Mlp(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x, task_ids, deterministic: bool):
        cfg = self.cfg
        traits = FAMILY_TRAITS.get(cfg.family)
        act_name, gated = traits.mlp_activation(cfg)

        def dense(features, axes, name):
            return Dense((features,), axes, cfg, use_bias=traits.use_bias, name=name)

        wi = dense(cfg.intermediate_size, ("embed", "mlp"), "wi_0" if gated else "wi")
        h = ACTIVATIONS.get(act_name)(wi(x, task_ids, deterministic))
        if gated:
            h = h * dense(cfg.intermediate_size, ("embed", "mlp"), "wi_1")(x, task_ids,
                                                                           deterministic)
        if traits.mlp_inner_dropout:
            h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
        return dense(cfg.hidden_size, ("mlp", "embed"), "wo")(h, task_ids, deterministic)


def _residual(x, sublayer, norm, adapter, dropout, pre_norm: bool, task_ids):
    """Pre-LN: x + adapter(drop(f(norm(x)))); post-LN: norm(x + adapter(drop(f(x))))."""
    h = dropout(sublayer(norm(x) if pre_norm else x))
    if adapter is not None:
        h = adapter(h, task_ids)
    return x + h if pre_norm else norm(x + h)


class EncoderLayer(nn.Module):
    """Self-attention then MLP, each with residual, norm and optional per-task adapter."""

    cfg: EncoderConfig
    deterministic: bool = True
    scanned: bool = False  # under nn.scan: return (carry, None)

    @nn.compact
    def __call__(self, x, prefix_kv, bias, mask, task_ids):
        cfg, det = self.cfg, self.deterministic
        traits = FAMILY_TRAITS.get(cfg.family)
        dropout = lambda h: nn.Dropout(cfg.hidden_dropout)(h, deterministic=det)  # noqa: E731
        attention_adapter = (Adapter(cfg, name="attention_adapter")
                             if cfg.adapter_kind == "houlsby" else None)
        mlp_adapter = Adapter(cfg, name="mlp_adapter") if cfg.use_adapters else None
        attention = SelfAttention(cfg, name="attention")
        x = _residual(x, lambda h: attention(h, bias, mask, prefix_kv, task_ids, det),
                      traits.norm(cfg, name="attention_norm"), attention_adapter, dropout,
                      traits.pre_norm, task_ids)
        mlp = Mlp(cfg, name="mlp")
        x = _residual(x, lambda h: mlp(h, task_ids, det), traits.norm(cfg, name="mlp_norm"),
                      mlp_adapter, dropout, traits.pre_norm, task_ids)
        return (x, None) if self.scanned else x


class LayerStack(nn.Module):
    """num_layers EncoderLayers: a Python loop (params layer_0..) or nn.scan (params `layer`,
    stacked on a leading `layers` axis); per-layer prefix keys/values are the scanned xs."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x, prefix_kv, bias, mask, task_ids, deterministic: bool):
        cfg = self.cfg
        layer_cls = EncoderLayer
        if cfg.remat:
            layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, deterministic, scanned=True, name="layer")(
                x, prefix_kv, bias, mask, task_ids)
            return x
        for i in range(cfg.num_layers):
            kv = None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i])
            x = layer_cls(cfg, deterministic, name=f"layer_{i}")(x, kv, bias, mask, task_ids)
        return x
