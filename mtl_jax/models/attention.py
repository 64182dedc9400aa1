"""The one attention function of BERT and T5, on top of ``jax.nn.dot_product_attention``.

Shapes follow jax.nn: q [B, T, N, H], k/v [B, S, N, H]; ``bias`` is additive and broadcastable to
[B, N, T, S]; ``mask`` is boolean (True = attend), broadcastable to [B, N, T, S]. Keys of a
``Prefix`` sit before the sequence keys (S = P + L).

Implementations (``model.attention_impl``) are entries of ``ATTENTION_IMPLEMENTATIONS``; every
one takes the same arguments, including a ``segment_mask`` as ``mask``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.models.attention_bnth import bnth_attention
from mtl_jax.registry import Registry


class Prefix(NamedTuple):
    """Per-layer key/value prefixes (prefix tuning).

    keys, values: [num_layers, B, P, num_heads, head_dim]; mask: [B, P], 1 = attend.
    T5: prefix keys get zero relative position bias (they have no position).
    Packed rows (models/packing.py) hold every task's prefix slots: ``key_tasks`` [B, P] is each
    slot's task and ``query_tasks`` [B, L] each token's, and a query sees its own task's slots
    only. Without them (None) every query of a row sees the row's prefix.
    """

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    key_tasks: Optional[jax.Array] = None
    query_tasks: Optional[jax.Array] = None


def resolve_attention_impl(name: str, dtype) -> str:
    """auto = cuDNN flash attention on GPU for 16-bit compute (cuDNN has no float32 kernel),
    else XLA. On CPU auto stays on xla until bench/train_step.py has measured bnth against it
    on a quiet machine; that measurement decides whether auto picks bnth there."""
    if name != "auto":
        return name
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype).itemsize == 2 else "xla"


def build_mask(attention_mask: jax.Array, prefix_mask: Optional[jax.Array] = None) -> jax.Array:
    """[B, L] padding mask (and [B, P] prefix mask) -> boolean [B, 1, 1, P + L] key mask."""
    keys = attention_mask if prefix_mask is None else jnp.concatenate(
        [prefix_mask.astype(attention_mask.dtype), attention_mask], axis=1)
    return (keys > 0)[:, None, None, :]


def pad_bias_for_prefix(bias: jax.Array, prefix_length: int) -> jax.Array:
    """[.., T, S] bias -> [.., T, P + S] with zeros on the prefix keys (no relative position)."""
    if prefix_length == 0:
        return bias
    pad = [(0, 0)] * (bias.ndim - 1) + [(prefix_length, 0)]
    return jnp.pad(bias, pad)


def segment_mask(segment_ids: jax.Array, prefix_mask: Optional[jax.Array] = None) -> jax.Array:
    """[B, L] segment ids (0 = padding) -> boolean [B, 1, L, P + L] mask for packed rows: a query
    sees the keys of its own segment only, and (with a [B, P] ``prefix_mask``, 1 = attend) the
    row's prefix keys; a padding query sees nothing. Rows of several tasks' segments with
    per-task prefix slots: ``packed_mask``."""
    keys = _same_segment(segment_ids, segment_ids)
    if prefix_mask is not None:
        keys = jnp.concatenate([_row_prefix_visible(segment_ids, prefix_mask), keys], axis=-1)
    return keys[:, None]


def packed_mask(segment_ids: jax.Array, prefix: Optional[Prefix] = None) -> jax.Array:
    """``segment_mask`` of packed rows whose prefix slots belong to tasks (``Prefix.key_tasks``):
    a query sees its own segment and the slots of its own token's task."""
    if prefix is None or prefix.key_tasks is None:
        return segment_mask(segment_ids, None if prefix is None else prefix.mask)
    query = jnp.where(segment_ids > 0, prefix.query_tasks + 1, 0)
    visible = _same_segment(query, prefix.key_tasks + 1) & (prefix.mask[:, None, :] > 0)
    keys = jnp.concatenate([visible, _same_segment(segment_ids, segment_ids)], axis=-1)
    return keys[:, None]


def _same_segment(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """[B, T], [B, S] -> [B, T, S]: True where query and key share a (non-padding) segment."""
    q, k = query_segments[:, :, None], key_segments[:, None, :]
    return (q == k) & (q > 0)


def _row_prefix_visible(segment_ids: jax.Array, prefix_mask: jax.Array) -> jax.Array:
    """[B, L], [B, P] -> [B, L, P]: every non-padding query of a row sees the row's prefix."""
    return (segment_ids[:, :, None] > 0) & (prefix_mask[:, None, :] > 0)


# An implementation: (q, k, v, *, bias, mask, scale, dropout_rate, dropout_rng) -> [B, T, N, H];
# dropout_rng is None when there is no dropout.
AttentionFn = Callable[..., jax.Array]
ATTENTION_IMPLEMENTATIONS: Registry[AttentionFn] = Registry("attention implementation")


def dot_product_attention(query, key, value, *, bias=None, mask=None, scale=None,
                          implementation: str = "xla", dropout_rate: float = 0.0,
                          dropout_rng=None):
    """softmax(scale * q k^T + bias, masked) v, per head. Returns [B, T, N, H] in query's dtype.

    scale=None is 1/sqrt(head_dim) (BERT); T5 passes scale=1.0. The fused kernels have no
    probability dropout, so training with ``dropout_rate > 0`` takes the explicit XLA path below
    (set the attention dropout to 0 to keep the fused kernel in training); ``bnth`` has its own.
    """
    if not (dropout_rate > 0.0 and dropout_rng is not None):
        dropout_rate, dropout_rng = 0.0, None
    return ATTENTION_IMPLEMENTATIONS.get(implementation)(
        query, key, value, bias=bias, mask=mask, scale=scale, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng)


def _fused(implementation: str, bias_dtype: Optional[str] = None) -> AttentionFn:
    """jax.nn.dot_product_attention(implementation=...) without dropout, the explicit path with
    it. cuDNN takes the mask as is (jax turns a boolean mask into an additive bias; its
    query/key_value_seq_lengths describe right padding only, not segments)."""
    def attention(query, key, value, *, bias, mask, scale, dropout_rate, dropout_rng):
        if bias is not None:
            bias = bias.astype(bias_dtype or query.dtype)
        if dropout_rng is not None:
            return _attention_with_dropout(query, key, value, bias, mask, scale, dropout_rate,
                                           dropout_rng)
        return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                            scale=scale, implementation=implementation)
    return attention


ATTENTION_IMPLEMENTATIONS.register("xla", _fused("xla", bias_dtype="float32"))
ATTENTION_IMPLEMENTATIONS.register("cudnn", _fused("cudnn"))
ATTENTION_IMPLEMENTATIONS.register("bnth", bnth_attention)


def _attention_with_dropout(query, key, value, bias, mask, scale, rate, rng):
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", query, key,
                        preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(value.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, value)


def prepare_attention(attention_mask, prefix: Optional[Prefix], num_layers: int, num_heads: int,
                      head_dim: int, position_bias=None, segment_ids=None):
    """-> (mask [B,1,1,P+L] ([B,1,L,P+L] for packed rows, ``segment_ids`` [B, L]),
    bias [1,N,L,P+L] | None, (keys, values) | None) for the layer stack."""
    if prefix is None:
        mask = (build_mask(attention_mask) if segment_ids is None
                else segment_mask(segment_ids))
        return mask, position_bias, None
    batch = attention_mask.shape[0]
    want = (num_layers, batch, prefix.keys.shape[2], num_heads, head_dim)
    if prefix.keys.shape != want or prefix.values.shape != want:
        raise UserError(f"prefix keys/values have shapes "
                        f"{prefix.keys.shape}/{prefix.values.shape}; "
                        f"the encoder needs [num_layers, B, P, num_heads, head_dim] = {want}")
    if prefix.mask.shape != (batch, want[2]):
        raise UserError(f"prefix mask has shape {prefix.mask.shape}; it must be [B, P] = "
                        f"{(batch, want[2])}")
    mask = (build_mask(attention_mask, prefix.mask) if segment_ids is None
            else packed_mask(segment_ids, prefix))
    if position_bias is not None:
        position_bias = pad_bias_for_prefix(position_bias, want[2])
    return mask, position_bias, (prefix.keys, prefix.values)
