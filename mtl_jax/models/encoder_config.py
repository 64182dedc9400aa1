"""EncoderConfig: every size and switch of a BERT or T5 encoder, frozen and hashable
(jit-static)."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.models.attention import ATTENTION_IMPLEMENTATIONS

FAMILIES = ("bert", "t5")
ADAPTER_KINDS = ("houlsby", "pfeiffer")
ATTENTION_IMPLS = ("auto", *ATTENTION_IMPLEMENTATIONS.names())
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    family: str = "bert"  # bert | t5
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    head_dim: int = 64  # T5 allows num_heads * head_dim != hidden_size
    intermediate_size: int = 3072
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1  # dropout on attention probabilities (training only)
    layer_norm_eps: float = 1e-12
    # BERT.
    hidden_act: str = "gelu"  # gelu (exact erf) | gelu_new (tanh) | relu | silu
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    # T5.
    feed_forward_proj: str = "relu"  # relu | gated-gelu (T5 v1.1) | gated-<act>
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # Runtime.
    dtype: str = "float32"  # compute dtype; parameters are always float32
    attention_impl: str = "auto"  # auto (cudnn on GPU for 16-bit, else xla) | xla | cudnn | bnth
    remat: bool = False
    scan_layers: bool = False
    # In-encoder PEFT, one set of parameters per task (0 / None = off).
    num_tasks: int = 0
    adapter_kind: Optional[str] = None  # None | houlsby | pfeiffer
    adapter_size: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = r"(query|value)"  # re.search over "/"-joined module paths

    def __post_init__(self):
        # Accept jnp dtypes (jnp.bfloat16) as well as names, store the name (hashable, printable).
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        _check(self.family in FAMILIES, f"model family {self.family!r}; use one of {FAMILIES}")
        _check(self.dtype in DTYPES, f"compute dtype {self.dtype!r}; use one of {DTYPES}")
        _check(self.attention_impl in ATTENTION_IMPLS,
               f"attention_impl {self.attention_impl!r}; use one of {ATTENTION_IMPLS}")
        _check(self.adapter_kind in (None,) + ADAPTER_KINDS,
               f"adapter kind {self.adapter_kind!r}; use one of {ADAPTER_KINDS} (or None)")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim",
                     "intermediate_size"):
            _check(getattr(self, name) > 0, f"{name}={getattr(self, name)}; it must be > 0")
        peft_on = self.adapter_kind is not None or self.lora_rank > 0
        _check(not peft_on or self.num_tasks > 0,
               "adapters/LoRA need num_tasks > 0 (one parameter set per task)")
        _check(self.adapter_kind is None or self.adapter_size > 0,
               f"adapter_kind={self.adapter_kind!r} needs adapter_size > 0")
        try:
            re.compile(self.lora_targets)
        except re.error as e:
            raise UserError(f"lora_targets {self.lora_targets!r} is not a valid regex ({e}); "
                            "fix the pattern, e.g. '(query|value)'") from None

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def use_adapters(self) -> bool:
        return self.adapter_kind is not None

    @property
    def use_lora(self) -> bool:
        return self.lora_rank > 0

    def replace(self, **changes) -> "EncoderConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UserError(f"unknown EncoderConfig field(s) {unknown}; valid fields: "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)


def _check(ok: bool, what: str):
    if not ok:
        raise UserError(f"invalid encoder config: {what}")
