"""Flax encoder parameters -> Hugging Face tensors and config.json: the inverse of
``checkpoints/hf.py``.

The tensor names, Flax paths and layouts come from hf.py's own tables (``FAMILY_CONVERTERS``:
``tensor_map`` and each entry's ``Transform``, whose ``to_hf`` undoes ``to_flax``), so an import
and an export cannot drift apart. The config fields are checked by reading them back with
``hf.encoder_config_from_hf``: the export must rebuild this very encoder, or it is refused.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from mtl_jax.checkpoints import hf
from mtl_jax.errors import UserError
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.registry import Registry

# EncoderConfig fields a Hugging Face config.json does not hold (runtime switches, PEFT): taken
# from the encoder as they are when its config is read back.
NOT_IN_HF_CONFIG = ("dtype", "attention_impl", "remat", "scan_layers", "num_tasks",
                    "adapter_kind", "adapter_size", "lora_rank", "lora_alpha", "lora_dropout",
                    "lora_targets")
# Keys of a source config.json that describe its own head or provenance, not the encoder.
SOURCE_ONLY_KEYS = ("architectures", "id2label", "label2id", "num_labels", "problem_type",
                    "finetuning_task", "_name_or_path", "transformers_version",
                    "classifier_dropout")


# --- tensors -------------------------------------------------------------------------------------

def unstack_layers(params: dict, num_layers: int) -> dict:
    """layers/layer/... on a leading [num_layers] axis -> layers/layer_{i}/... (undoes
    ``hf.stack_layers``)."""
    stacked = params["layers"]["layer"]
    layers = {f"layer_{i}": jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
              for i in range(num_layers)}
    return {**params, "layers": layers}


def encoder_tensors(encoder_params, cfg: EncoderConfig) -> dict[str, np.ndarray]:
    """{HF tensor name: float32 array} of a plain encoder (BertModel / T5EncoderModel names).

    Every Flax leaf must have a HF name (PEFT leaves left over are an error) and every HF
    tensor a leaf, except those the family's converter marks optional (BERT's pooler).
    """
    converter = hf.FAMILY_CONVERTERS.get(cfg.family)
    plain = unstack_layers(encoder_params, cfg.num_layers) if cfg.scan_layers else encoder_params
    flat = traverse_util.flatten_dict(dict(plain))
    mapping = converter.tensor_map(cfg)
    unmapped = sorted("/".join(p) for p in set(flat) - {path for path, _ in mapping.values()})
    if unmapped:
        raise UserError(f"encoder parameter {unmapped[0]} has no Transformers counterpart "
                        f"({len(unmapped)} such); export a run without encoder PEFT, or LoRA")
    tensors = {}
    for name, (path, transform) in mapping.items():
        if path not in flat:
            if name in converter.optional:
                continue
            raise UserError(f"the checkpoint's encoder lacks {'/'.join(path)} (HF {name}); it "
                            f"does not match its config: export another checkpoint")
        leaf = np.asarray(flat[path], np.float32)
        tensors[name] = np.ascontiguousarray(transform.to_hf(leaf, transform.hf_shape(leaf.shape)))
    return tensors


# --- config.json ----------------------------------------------------------------------------------

def _bert_fields(cfg: EncoderConfig) -> dict:
    """The inverse of ``hf._bert_fields``."""
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise UserError(f"this BERT encoder has head_dim={cfg.head_dim} x {cfg.num_heads} heads "
                        f"!= hidden_size={cfg.hidden_size}, which Transformers' BERT cannot "
                        f"express; train with model.size.head_dim=0")
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
                hidden_dropout_prob=cfg.hidden_dropout,
                attention_probs_dropout_prob=cfg.attention_dropout,
                layer_norm_eps=cfg.layer_norm_eps,
                max_position_embeddings=cfg.max_position_embeddings,
                type_vocab_size=cfg.type_vocab_size, position_embedding_type="absolute")


def _t5_fields(cfg: EncoderConfig) -> dict:
    """The inverse of ``hf._t5_fields`` (T5 has one dropout rate for both)."""
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, num_layers=cfg.num_layers,
                num_heads=cfg.num_heads, d_kv=cfg.head_dim, d_ff=cfg.intermediate_size,
                feed_forward_proj=cfg.feed_forward_proj, dropout_rate=cfg.hidden_dropout,
                layer_norm_epsilon=cfg.layer_norm_eps,
                relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                relative_attention_max_distance=cfg.relative_attention_max_distance)


@dataclasses.dataclass(frozen=True)
class ConfigExport:
    model_type: str  # the Transformers config class (AutoConfig.for_model)
    fields: Callable[[EncoderConfig], dict]


HF_CONFIGS: Registry[ConfigExport] = Registry("encoder family")
HF_CONFIGS.register("bert", ConfigExport("bert", _bert_fields))
HF_CONFIGS.register("t5", ConfigExport("t5", _t5_fields))


def source_hf_config(config) -> dict:
    """The config.json of the weights the run started from (its extra keys, e.g. pad_token_id,
    carry over); {} for a random encoder."""
    if config.model.random_init:
        return {}
    path = hf.resolve_model_path(config.model.name_or_path) / "config.json"
    record = json.loads(path.read_text())
    return {k: v for k, v in record.items() if k not in SOURCE_ONLY_KEYS}


def hf_config(cfg: EncoderConfig, base: Mapping, **extra):
    """The ``transformers`` config of ``cfg`` (on top of ``base``, a source config.json), with
    ``extra`` fields (architectures, labels); refused when it would not rebuild ``cfg``."""
    from transformers import AutoConfig  # slow import: only an export pays for it

    export = HF_CONFIGS.get(cfg.family)
    fields = {**base, **export.fields(cfg), **extra, "model_type": export.model_type}
    config = AutoConfig.for_model(**fields)
    check_round_trip(cfg, config.to_dict())
    return config


def check_round_trip(cfg: EncoderConfig, record: Mapping) -> None:
    """``record`` (a config.json dict) must read back as ``cfg``, field for field."""
    back = hf.encoder_config_from_hf(record, **{k: getattr(cfg, k) for k in NOT_IN_HF_CONFIG})
    for field in dataclasses.fields(EncoderConfig):
        ours, theirs = getattr(cfg, field.name), getattr(back, field.name)
        if ours != theirs:
            raise UserError(f"the encoder's {field.name}={ours!r} reads back from the exported "
                            f"config.json as {theirs!r}: Transformers' {cfg.family} config "
                            f"cannot express this encoder; retrain without that setting")
