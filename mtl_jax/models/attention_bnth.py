"""Attention in [B, N, T, H] layout with a hand-written backward (``model.attention_impl=bnth``).

Aimed at XLA:CPU, where the autodiff of the einsum/softmax/dropout path spends much of a train
step on [B, N, T, S] passes and layout copies. What differs from that path:

- q, k, v are transposed to [B, N, T, H] once (the scale folded into the q transpose), so both
  matmuls and their four backward matmuls are plain batched matmuls over (B, N).
- ``jax.custom_vjp`` keeps only the probabilities P (float32; never the logits), the inputs and
  the [B, N, T, H] output, and the backward is the textbook one: dV = Pd^T dO, dPd = dO V^T,
  dS = P * (dP - D) with D = rowsum(dO * O) (FlashAttention's identity: it replaces the
  [B, N, T, S] reduction sum(dP * P) by one over H), then dQ = dS K, dK = dS^T Q, dBias = dS
  summed over the bias's broadcast axes.
- Dropout's keep mask is stored (1 byte per score), not regenerated in the backward: on CPU the
  threefry hashes cost far more than reading a bool array, and the autodiff path stores it too.
  The mask takes a quarter of the hashes of ``jax.random.bernoulli`` (each hash gives 64 bits,
  four 16-bit uniforms; see ``dropout_keep_mask``).

Shapes as mtl_jax.models.attention: q [B, T, N, H], k/v [B, S, N, H], bias broadcastable to
[B, N, T, S], mask boolean broadcastable to [B, N, T, S] (True = attend).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

from mtl_jax.errors import UserError

MASKED_LOGIT = jnp.finfo(jnp.float32).min  # as the explicit XLA dropout path
F32 = jnp.float32
UNIFORM_BITS = 16  # resolution of the dropout draw: a keep probability is a multiple of 2^-16


def to_heads_first(x: jax.Array) -> jax.Array:
    """[B, T, N, H] <-> [B, N, T, H] (the permutation is its own inverse)."""
    return jnp.transpose(x, (0, 2, 1, 3))


def dropout_keep_mask(rng, rate: float, shape) -> tuple[jax.Array, float]:
    """(boolean keep mask of ``shape``, 1 / keep probability): each element kept with probability
    round((1 - rate) * 2^16) / 2^16 (within 2^-17 of 1 - rate), the scale its exact inverse so
    the dropped probabilities stay unbiased. One threefry hash gives four 16-bit uniforms, where
    ``jax.random.bernoulli`` spends one hash per element."""
    *lead, last = shape
    words = _random_words(rng, (*lead, -(-last // 4)))
    threshold = round((1.0 - rate) * 2 ** UNIFORM_BITS)
    # Compare before concatenating: XLA materialises the concatenation, better as bools.
    quarters = [part < threshold for w in words for part in (w & 0xFFFF, w >> UNIFORM_BITS)]
    return jnp.concatenate(quarters, axis=-1)[..., :last], 2 ** UNIFORM_BITS / threshold


def _random_words(rng, shape) -> tuple[jax.Array, jax.Array]:
    """Two uint32 arrays of ``shape``: both output words of one threefry2x32 hash per element
    (``jax.random.bits`` keeps only their xor). The counter is the element's index, so the draw
    is elementwise and shards like jax.random.bits. A non-threefry key (e.g. rbg) draws twice."""
    key = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    if key.shape != (2,):
        return tuple(jax.random.bits(r, shape, jnp.uint32) for r in jax.random.split(rng))
    size = math.prod(shape)
    if size >= 2 ** 32:
        raise UserError(f"attention_impl=bnth: the attention dropout mask needs {size} threefry "
                        "counters, more than 2^32; use smaller batches or attention_impl=xla")
    counts = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
    return tuple(threefry2x32_p.bind(key[0], key[1], jnp.zeros_like(counts), counts))


def _probabilities(q, k, bias, mask):
    """softmax(q k^T + bias, masked) in float32, [B, N, T, S] (q already scaled)."""
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=F32)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, MASKED_LOGIT)
    return jax.nn.softmax(logits, axis=-1)


def _dropped(x, keep, keep_scale: float):
    return x if keep is None else jnp.where(keep, x * keep_scale, 0.0)


def _sum_to_shape(x, shape):
    """Sums x over the axes where ``shape`` broadcasts (size 1), keeping them."""
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape)) if n == 1 and m != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, bias, mask, keep, keep_scale):
    return _attention_fwd(q, k, v, bias, mask, keep, keep_scale)[0]


def _attention_fwd(q, k, v, bias, mask, keep, keep_scale):
    probs = _probabilities(q, k, bias, mask)
    out = jnp.einsum("bnts,bnsh->bnth", _dropped(probs, keep, keep_scale).astype(v.dtype), v,
                     preferred_element_type=F32)
    return out.astype(v.dtype), (q, k, v, bias, mask, keep, probs, out)


def _attention_bwd(keep_scale, residuals, d_out):
    q, k, v, bias, mask, keep, probs, out = residuals
    d_v = jnp.einsum("bnts,bnth->bnsh", _dropped(probs, keep, keep_scale).astype(v.dtype),
                     d_out, preferred_element_type=F32)
    d_probs = _dropped(jnp.einsum("bnth,bnsh->bnts", d_out, v, preferred_element_type=F32),
                       keep, keep_scale)
    row = jnp.sum(d_out.astype(F32) * out, axis=-1, keepdims=True)  # = sum_s dP * P
    d_logits = probs * (d_probs - row)
    if mask is not None:  # a fully masked row has uniform P; its masked logits get no gradient
        d_logits = jnp.where(mask, d_logits, 0.0)
    d_q = jnp.einsum("bnts,bnsh->bnth", d_logits.astype(k.dtype), k, preferred_element_type=F32)
    d_k = jnp.einsum("bnts,bnth->bnsh", d_logits.astype(q.dtype), q, preferred_element_type=F32)
    d_bias = None if bias is None else _sum_to_shape(d_logits, bias.shape).astype(bias.dtype)
    return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def bnth_attention(query, key, value, *, bias=None, mask=None, scale=None,
                   dropout_rate: float = 0.0, dropout_rng=None):
    """softmax(scale * q k^T + bias, masked) v with dropout on the probabilities when
    ``dropout_rate > 0`` and an rng is given. Returns [B, T, N, H] in value's dtype."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q = to_heads_first(query * jnp.asarray(scale, query.dtype) if scale != 1.0 else query)
    k, v = to_heads_first(key), to_heads_first(value)
    keep, keep_scale = None, 1.0
    if dropout_rate > 0.0 and dropout_rng is not None:
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        keep, keep_scale = dropout_keep_mask(dropout_rng, dropout_rate, shape)
    if bias is not None:
        bias = bias.astype(F32)
    return to_heads_first(_attention(q, k, v, bias, mask, keep, keep_scale))
