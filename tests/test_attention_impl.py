"""Attention implementations: ``bnth`` (custom VJP, [B, N, T, H]) against jax.nn's XLA path and a
NumPy reference, forward and gradients, with padding / segment masks, T5 bias, prefix keys,
dropout and bf16; ``segment_mask`` against a loop; a tiny BERT and T5 built with either."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.models import attention as attn
from mtl_jax.models.attention_bnth import dropout_keep_mask
from mtl_jax.models.encoder import build_encoder
from mtl_jax.models.encoder_config import EncoderConfig

B, L, N, H, P = 2, 8, 3, 4, 2
TOL = dict(rtol=1e-5, atol=1e-5)
SEGMENTS = np.array([[1, 1, 1, 2, 2, 3, 0, 0],  # three packed segments, two padding tokens
                     [1, 1, 1, 1, 1, 1, 1, 2]], np.int32)
PADDING = np.array([[1] * 6 + [0] * 2, [1] * 8], np.int32)


def numpy_attention(q, k, v, bias=None, mask=None, scale=None, keep=None, keep_scale=1.0):
    """float64 reference; a fully masked row attends uniformly, as both JAX paths do."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if keep is not None:
        probs = np.where(np.asarray(keep), probs * keep_scale, 0.0)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def make_case(name, seed=0, dtype=jnp.float32):
    """(q, k, v, bias, mask, scale) for one masking/bias setup; k/v carry P prefix keys first
    where the case has a prefix."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    prefix = name.startswith("prefix")
    s = L + P if prefix else L
    q = jax.random.normal(keys[0], (B, L, N, H), dtype)
    k = jax.random.normal(keys[1], (B, s, N, H), dtype)
    v = jax.random.normal(keys[2], (B, s, N, H), dtype)
    prefix_mask = jnp.array([[1, 1], [1, 0]], jnp.int32)
    bias, mask, scale = None, None, None
    if name == "padding":
        mask = attn.build_mask(jnp.asarray(PADDING))
    elif name == "segments":
        mask = attn.segment_mask(jnp.asarray(SEGMENTS))
    elif name == "t5_bias":  # T5: unscaled logits, one [1, N, L, L] bias, padding mask
        bias = jax.random.normal(keys[3], (1, N, L, L))
        mask, scale = attn.build_mask(jnp.asarray(PADDING)), 1.0
    elif name == "prefix_padding_bias":  # prefix keys get zero bias, as T5 prefix tuning
        bias = attn.pad_bias_for_prefix(jax.random.normal(keys[3], (1, N, L, L)), P)
        mask, scale = attn.build_mask(jnp.asarray(PADDING), prefix_mask), 1.0
    elif name == "prefix_segments":
        mask = attn.segment_mask(jnp.asarray(SEGMENTS), prefix_mask)
    elif name == "batch_bias_segments":  # a per-example bias [B, N, T, S]
        bias = jax.random.normal(keys[3], (B, N, L, L))
        mask = attn.segment_mask(jnp.asarray(SEGMENTS))
    return q, k, v, bias, mask, scale


CASES = ["none", "padding", "segments", "t5_bias", "prefix_padding_bias", "prefix_segments",
         "batch_bias_segments"]


# Jitted: one compilation per function instead of one per op keeps the file fast.
_attention = jax.jit(attn.dot_product_attention,
                     static_argnames=("implementation", "scale", "dropout_rate"))


def run(impl, q, k, v, bias, mask, scale, **kw):
    return _attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl, **kw)


def jax_xla(q, k, v, bias, mask, scale):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        implementation="xla")


def output_and_grads(fn, q, k, v, bias, cotangent):
    """(fn(q, k, v, bias), d <fn, cotangent> / d(q, k, v[, bias])), one compilation."""
    def both(q, k, v, bias):
        out, pullback = jax.vjp(fn, q, k, v, bias)
        return out, pullback(cotangent.astype(out.dtype))
    out, grads = jax.jit(both)(q, k, v, bias)
    return out, grads if bias is not None else grads[:3]


@pytest.mark.parametrize("case", CASES)
def test_bnth_matches_numpy_and_jax_xla(case):
    """Forward against NumPy and jax.nn (xla); gradients w.r.t. q, k, v and bias against
    jax.nn's autodiff."""
    q, k, v, bias, mask, scale = make_case(case)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape)
    ours, g_ours = output_and_grads(lambda *a: run("bnth", *a, mask, scale), q, k, v, bias,
                                    cotangent)
    want, g_want = output_and_grads(lambda *a: jax_xla(*a, mask, scale), q, k, v, bias,
                                    cotangent)
    np.testing.assert_allclose(ours, numpy_attention(q, k, v, bias, mask, scale), **TOL)
    np.testing.assert_allclose(ours, want, **TOL)
    for name, g, w in zip("qkvb", g_ours, g_want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, err_msg=f"d{name}", **TOL)
        assert np.abs(w).max() > 1e-3, f"d{name} is trivially zero"


def test_segment_mask_matches_a_loop():
    prefix_mask = np.array([[1, 0], [1, 1]])
    got = np.asarray(attn.segment_mask(jnp.asarray(SEGMENTS), jnp.asarray(prefix_mask)))
    assert got.shape == (B, 1, L, P + L)
    for b in range(B):
        for t in range(L):
            own = SEGMENTS[b, t]
            for j in range(P):
                assert got[b, 0, t, j] == (own > 0 and prefix_mask[b, j] == 1)
            for s in range(L):
                assert got[b, 0, t, P + s] == (own > 0 and SEGMENTS[b, s] == own)


@pytest.mark.parametrize("impl", ["bnth", "xla"])
def test_no_attention_across_segments(impl):
    """Changing segment 2's tokens (and a prefix key row 0 cannot see) leaves every other
    token's output as it was, and their outputs have no gradient w.r.t. segment 2's inputs."""
    q, k, v, _, _, _ = make_case("prefix_segments")
    mask = attn.segment_mask(jnp.asarray(SEGMENTS), jnp.array([[1, 0], [1, 1]]))
    other = jnp.asarray(SEGMENTS[0] != 2)  # row 0's tokens outside segment 2 (padding too)
    seg2_keys = jnp.concatenate([jnp.array([False, True]), ~other])  # + prefix key 1 (masked)
    noise = jax.random.normal(jax.random.PRNGKey(3), k.shape[1:])
    k2 = k.at[0].add(jnp.where(seg2_keys[:, None, None], noise, 0.0))
    v2 = v.at[0].add(jnp.where(seg2_keys[:, None, None], noise, 0.0))
    q2 = q.at[0].add(jnp.where(~other[:, None, None], noise[P:], 0.0))
    before = run(impl, q, k, v, None, mask, None)
    after = run(impl, q2, k2, v2, None, mask, None)
    keep_rows = np.asarray(other & (jnp.asarray(SEGMENTS[0]) > 0))
    np.testing.assert_array_equal(before[0][keep_rows], after[0][keep_rows])
    assert not np.allclose(before[0][~other], after[0][~other])  # segment 2 itself did change

    def others_out(q, k, v):
        return jnp.sum(run(impl, q, k, v, None, mask, None)[0][keep_rows] ** 2)

    d_q, d_k, d_v = jax.jit(jax.grad(others_out, argnums=(0, 1, 2)))(q, k, v)
    assert np.all(np.asarray(d_k[0][seg2_keys]) == 0) and np.all(np.asarray(d_v[0][seg2_keys]) == 0)
    assert np.all(np.asarray(d_q[0][~other]) == 0)
    assert np.abs(d_k[0][~seg2_keys]).max() > 1e-3  # the visible keys do get a gradient


def explicit_dropout_attention(q, k, v, bias, mask, scale, keep, keep_scale):
    """The plain einsum/softmax/where attention, differentiated by jax.grad."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, -1e30)
    probs = jnp.where(keep, jax.nn.softmax(logits, axis=-1) * keep_scale, 0.0)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("case", ["segments", "prefix_padding_bias"])
def test_bnth_dropout_matches_an_explicit_reference_with_the_same_keep_mask(case):
    """Forward (NumPy) and gradients (jax.grad of the explicit einsum path) with the keep mask
    that bnth draws; the same rng gives the same result, another rng another."""
    q, k, v, bias, mask, scale = make_case(case)
    rate, shape = 0.3, (B, N, L, k.shape[1])
    cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    @jax.jit  # one compilation (threefry compiles slowly on CPU) for every rng below
    def dropped(rng):
        keep, keep_scale = dropout_keep_mask(rng, rate, shape)
        out, pullback = jax.vjp(lambda q, k, v, bias: attn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, implementation="bnth",
            dropout_rate=rate, dropout_rng=rng), q, k, v, bias)
        return keep, keep_scale, out, pullback(cotangent)

    keep, keep_scale, ours, got = dropped(jax.random.PRNGKey(5))
    keep_scale = float(keep_scale)
    assert 0 < np.mean(np.asarray(keep)) < 1
    np.testing.assert_allclose(
        ours, numpy_attention(q, k, v, bias, mask, scale, keep, keep_scale), **TOL)
    np.testing.assert_array_equal(ours, dropped(jax.random.PRNGKey(5))[2])
    assert not np.allclose(ours, dropped(jax.random.PRNGKey(6))[2])
    _, want = output_and_grads(
        lambda *a: explicit_dropout_attention(*a, mask, scale, keep, keep_scale),
        q, k, v, bias, cotangent)
    for name, g, w in zip("qkvb", got, want):
        np.testing.assert_allclose(g, w, err_msg=f"d{name}", **TOL)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_dropout_keep_mask_is_bernoulli_with_the_right_rate(impl):
    """Every 16-bit quarter of the hashes keeps at 1 - rate, the four quarters of one hash are
    uncorrelated, and the scale is the inverse keep probability (the dropout stays unbiased)."""
    # Odd last axis: the last quarter is cut short. (Some draw shapes, e.g. 9 words a row,
    # take XLA:CPU 5x longer to compile; 8 does not.)
    rate, shape = 0.1, (16, 4, 32, 31)
    rng = jax.random.key(0, impl=impl)
    keep, keep_scale = jax.jit(dropout_keep_mask, static_argnums=(1, 2))(rng, rate, shape)
    keep = np.asarray(keep)
    assert keep.shape == shape and keep.dtype == bool
    sigma = np.sqrt(rate * (1 - rate) / keep.size)
    assert abs(keep.mean() - (1 - rate)) < 4 * sigma
    assert keep_scale == pytest.approx(1 / (1 - rate), rel=1e-4)
    width = -(-shape[-1] // 4)  # words per row; quarter i fills columns [i * width, ...)
    last = shape[-1] - 3 * width
    quarters = [keep[..., i * width:i * width + last].astype(float).ravel() for i in range(4)]
    for part in quarters:
        assert abs(part.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / part.size)
    correlation = np.corrcoef(np.stack(quarters))[np.triu_indices(4, 1)]
    assert np.abs(correlation).max() < 4 / np.sqrt(quarters[0].size), correlation


def test_bf16_inputs_close_to_float32():
    q, k, v, bias, mask, scale = make_case("prefix_padding_bias", dtype=jnp.bfloat16)
    exact = numpy_attention(q, k, v, bias, mask, scale)
    ours = run("bnth", q, k, v, bias, mask, scale)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), exact, rtol=2e-2, atol=2e-2)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.bfloat16)
    _, got = output_and_grads(lambda *a: run("bnth", *a, mask, scale), q, k, v, bias, cotangent)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _, want = output_and_grads(lambda *a: jax_xla(*a, mask, scale), *f32, bias, cotangent)
    for name, g, w in zip("qkvb", got, want):
        assert g.dtype == (jnp.float32 if name == "b" else jnp.bfloat16), name
        scale_of = np.abs(np.asarray(w)).max()
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=3e-2 * scale_of,
                                   err_msg=f"d{name}")


def random_params(encoder):
    """Normal(0, 0.2) parameters of the encoder's shapes, drawn by NumPy: the jitted flax init
    would compile threefry for every initializer, the slowest part of this test otherwise."""
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), ids)))
    draw = np.random.default_rng(0)
    return jax.tree.map(lambda x: jnp.asarray(draw.normal(0, 0.2, x.shape), x.dtype),
                        shapes["params"])


TINY = dict(vocab_size=60, hidden_size=24, num_layers=1, num_heads=3, head_dim=8,
            intermediate_size=32, max_position_embeddings=16)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_tiny_encoder_with_bnth_equals_xla(family):
    """Forward and parameter gradients of a tiny encoder (padding in the batch; T5 also trains
    its relative bias) are the same with attention_impl=bnth as with xla."""
    cfg = EncoderConfig(family=family, attention_impl="xla", **TINY)
    params = random_params(build_encoder(cfg))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 1, 60)
    mask = jnp.array([[1] * 12, [1] * 7 + [0] * 5], jnp.int32)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 12, 24))

    def loss_and_grads(impl):
        encoder = build_encoder(cfg.replace(attention_impl=impl))

        def loss(p):
            hidden = encoder.apply({"params": p}, ids, mask)
            return jnp.sum(hidden * cotangent), hidden

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    g_ours, h_ours = loss_and_grads("bnth")
    g_xla, h_xla = loss_and_grads("xla")
    np.testing.assert_allclose(h_ours, h_xla, **TOL)
    flat_ours = jax.tree_util.tree_leaves_with_path(g_ours)
    for (path, g), w in zip(flat_ours, jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_registry_names_and_errors():
    assert {"xla", "cudnn", "bnth"} <= set(attn.ATTENTION_IMPLEMENTATIONS.names())
    assert attn.resolve_attention_impl("bnth", jnp.float32) == "bnth"
    assert attn.resolve_attention_impl("auto", jnp.float32) == "xla"  # CPU: xla until measured
    q, k, v, *_ = make_case("none")
    with pytest.raises(UserError, match="bnth"):
        attn.dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(UserError, match="bnth"):
        EncoderConfig(attention_impl="flash")
