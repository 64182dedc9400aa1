"""PEFT: the ``peft.kind`` registry, a Dense with per-task LoRA, per-task bottleneck adapters, and
LoRA merging.

Per-task parameters are stacked on a leading task axis [num_tasks, ...] and gathered per example
by ``task_ids`` [B], so a batch may mix tasks without a Python loop over them; packed rows
(models/packing.py) route per token (``task_ids`` [B, L], ``_task_down``).

``PEFT_KINDS`` maps a ``peft.kind`` to a ``PeftKind``: everything the kind needs from the model,
as pure functions, so ``MultiTaskModel`` never tests the kind's name:

  encoder_overrides(peft_config, num_tasks) -> dict        EncoderConfig fields (adapter, LoRA)
  init_params(rng, peft_config, num_tasks, encoder_config) -> dict
      extra top-level parameters beside "encoder" and "heads" (prefix: {"prefix": ...})
  batch_prefix(params, batch) -> attention.Prefix | None   per-example prefix keys/values
  per_task_leaves: ((path, task axis), ...)                which of init_params' leaves are
      stacked per task ("prefix/embedding": [T, P, d]); the others are shared by the tasks.
      Encoder PEFT leaves name their task axis in their logical specs (TASK_AXIS) instead.
  freezes_checkpoint: bool                                  the default optimizer groups freeze
      the pretrained checkpoint (summary.FROZEN_BY_PEFT) and train the heads and the PEFT params
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.models import prefix as prefix_lib
from mtl_jax.models.attention import Prefix
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.registry import Registry

ACTIVATIONS: Registry[Callable] = Registry("activation")
ACTIVATIONS.register("gelu", lambda x: jax.nn.gelu(x, approximate=False))  # BERT's exact erf GELU
# tanh approximation (T5 v1.1)
ACTIVATIONS.register("gelu_new", lambda x: jax.nn.gelu(x, approximate=True))
ACTIVATIONS.register("gelu_pytorch_tanh", lambda x: jax.nn.gelu(x, approximate=True))
ACTIVATIONS.register("relu", jax.nn.relu)
ACTIVATIONS.register("silu", jax.nn.silu)
ACTIVATIONS.register("swish", jax.nn.silu)

ADAPTER_ACTIVATION = "relu"  # the bottleneck's nonlinearity (Pfeiffer et al., 2021)
TASK_AXIS = "tasks"  # logical name of the task axis (no sharding rule maps it: replicated)


def _lora_a_init(key, shape, dtype=jnp.float32):
    """Kaiming-uniform with a=sqrt(5) as in PEFT: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    fan_in = 1
    for d in shape[1:-1]:
        fan_in *= d
    bound = fan_in ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def require_task_ids(task_ids, who: str):
    if task_ids is None:
        raise UserError(f"{who} has per-task parameters; pass task_ids (int32 [B]) to the encoder")
    return task_ids


def _contract(x, kernel, n_in: int):
    """Contracts the last n_in axes of x with the first n_in axes of kernel."""
    x_axes = tuple(range(x.ndim - n_in, x.ndim))
    return jax.lax.dot_general(x, kernel, ((x_axes, tuple(range(n_in))), ((), ())))


def _per_example_contract(x, w, n_in: int):
    """x [B, L, *in], w [B, *in, *out] (one matrix per example) -> [B, L, *out]."""
    x_axes = tuple(range(x.ndim - n_in, x.ndim))
    return jax.lax.dot_general(x, w, ((x_axes, tuple(range(1, n_in + 1))), ((0,), (0,))))


def _task_down(x, w, task_ids, n_in: int, bias=None, activation=None):
    """x [B, L, *in] through its task's w[t] [*in, k] (+ bias[t], then ``activation``).

    task_ids [B] (one task per example): [B, L, k]. task_ids [B, L] (packed rows, one task per
    token): [B, L, T, k] with every task's product and zeros outside the token's own task, which
    ``_task_up`` contracts over (T, k): per-token routing with no [B, L, *in, k] gather, at T
    times the (small) k-wide work."""
    if task_ids.ndim == 1:
        h = _per_example_contract(x, w[task_ids], n_in)
        h = h if bias is None else h + bias[task_ids][:, None]
        return h if activation is None else activation(h)
    h = _contract(x, jnp.moveaxis(w, 0, n_in), n_in)  # [B, L, T, k]
    h = h if bias is None else h + bias
    h = h if activation is None else activation(h)
    own = jax.nn.one_hot(task_ids, w.shape[0], dtype=h.dtype)  # [B, L, T]
    return h * own[..., None]


def _task_up(h, w, task_ids):
    """``_task_down``'s output through its task's w[t] [k, *out] -> [B, L, *out]."""
    if task_ids.ndim == 1:
        return _per_example_contract(h, w[task_ids], 1)
    return jax.lax.dot_general(h, w, (((h.ndim - 2, h.ndim - 1), (0, 1)), ((), ())))


def _task_bias(b, task_ids):
    """b [T, *out] per example ([B, 1, *out]) or per token ([B, L, *out])."""
    return b[task_ids][:, None] if task_ids.ndim == 1 else b[task_ids]


class Dense(nn.Module):
    """Dense over the last ``n_in`` input axes, with optional per-task LoRA.

    LoRA is on when ``cfg.lora_rank > 0`` and ``cfg.lora_targets`` matches this module's path
    ("layers/layer_0/attention/query"): y += (alpha / r) * dropout(x) A_t B_t, A [T, *in, r]
    kaiming-uniform, B [T, r, *out] zeros.
    """

    features: Sequence[int]
    kernel_axes: Sequence[str | None]  # logical names: input axes then output axes
    cfg: EncoderConfig
    n_in: int = 1
    use_bias: bool = True
    allow_lora: bool = True
    kernel_init: Callable = nn.initializers.normal(0.02)

    def lora_enabled(self) -> bool:
        return (self.allow_lora and self.cfg.use_lora
                and re.search(self.cfg.lora_targets, "/".join(self.path)) is not None)

    @nn.compact
    def __call__(self, x, task_ids=None, deterministic: bool = True):
        dtype = self.cfg.compute_dtype
        features = tuple(self.features)
        in_shape = x.shape[x.ndim - self.n_in:]
        partitioned_init = nn.with_logical_partitioning(self.kernel_init, self.kernel_axes)
        kernel = self.param("kernel", partitioned_init, in_shape + features, jnp.float32)
        y = _contract(x.astype(dtype), kernel.astype(dtype), self.n_in)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, tuple(self.kernel_axes)[self.n_in:]), features, jnp.float32)
            y = y + bias.astype(dtype)
        if self.lora_enabled():
            y = y + self._lora(x, in_shape, features, task_ids, deterministic)
        return y

    def _lora(self, x, in_shape, features, task_ids, deterministic):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        task_ids = require_task_ids(task_ids, "LoRA")
        axes_in, axes_out = tuple(self.kernel_axes)[:self.n_in], tuple(self.kernel_axes)[self.n_in:]
        lora_a = self.param("lora_a", nn.with_logical_partitioning(
            _lora_a_init, (TASK_AXIS,) + axes_in + (None,)),
            (cfg.num_tasks,) + in_shape + (cfg.lora_rank,), jnp.float32)
        lora_b = self.param("lora_b", nn.with_logical_partitioning(
            nn.initializers.zeros, (TASK_AXIS, None) + axes_out),
            (cfg.num_tasks, cfg.lora_rank) + features, jnp.float32)
        x = nn.Dropout(cfg.lora_dropout)(x, deterministic=deterministic).astype(dtype)
        h = _task_down(x, lora_a.astype(dtype), task_ids, self.n_in)  # [B, L, (T,) r]
        y = _task_up(h, lora_b.astype(dtype), task_ids)
        return y * (cfg.lora_alpha / cfg.lora_rank)


class Adapter(nn.Module):
    """Bottleneck adapter per task: x + up(act(down(x))), up-projection initialised to zeros."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x, task_ids):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        task_ids = require_task_ids(task_ids, "the adapter")
        t, e, s = cfg.num_tasks, x.shape[-1], cfg.adapter_size
        param = lambda name, init, shape, axes: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, (TASK_AXIS,) + axes), shape, jnp.float32)
        down_k = param("down_kernel", nn.initializers.normal(0.02), (t, e, s), ("embed", None))
        down_b = param("down_bias", nn.initializers.zeros, (t, s), (None,))
        up_k = param("up_kernel", nn.initializers.zeros, (t, s, e), (None, "embed"))
        up_b = param("up_bias", nn.initializers.zeros, (t, e), ("embed",))
        h = _task_down(x.astype(dtype), down_k.astype(dtype), task_ids, 1,
                       bias=down_b.astype(dtype), activation=ACTIVATIONS.get(ADAPTER_ACTIVATION))
        h = _task_up(h, up_k.astype(dtype), task_ids)
        return x + h + _task_bias(up_b.astype(dtype), task_ids)


def merge_lora(params: Mapping[str, Any], cfg: EncoderConfig, task_index: int) -> dict:
    """Folds task ``task_index``'s LoRA into the base kernels and drops every lora_a/lora_b.

    The result is the parameter tree of ``cfg.replace(lora_rank=0)`` (adapters, if any, stay).
    Works on the plain and the scanned (leading layer axis) layouts.
    """
    if not 0 <= task_index < max(cfg.num_tasks, 1):
        raise UserError(f"task_index {task_index} is out of range for num_tasks={cfg.num_tasks}")
    scaling = cfg.lora_alpha / max(cfg.lora_rank, 1)

    def merge(a, b, kernel):
        delta = jnp.tensordot(a[task_index], b[task_index], axes=1)  # [*in, r] x [r, *out]
        return kernel + scaling * delta

    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {k: walk(v) for k, v in tree.items() if k not in ("lora_a", "lora_b")}
        if "lora_a" in tree:
            a, b, kernel = tree["lora_a"], tree["lora_b"], tree["kernel"]
            stacked = a.ndim + b.ndim - 4 - kernel.ndim  # 1 under nn.scan (leading layer axis)
            fn = jax.vmap(merge) if stacked else merge
            out["kernel"] = fn(a, b, kernel)
        return out

    return walk(params)


# --- peft.kind entries -------------------------------------------------------------------------

def _no_params(rng, peft_config, num_tasks: int, encoder_config: EncoderConfig) -> dict:
    del rng, peft_config, num_tasks, encoder_config
    return {}


def _no_prefix(params, batch) -> Optional[Prefix]:
    del params, batch
    return None


@dataclasses.dataclass(frozen=True)
class PeftKind:
    """One ``peft.kind``; the fields are described in the module docstring."""

    encoder_overrides: Callable[[Any, int], dict]
    freezes_checkpoint: bool = True
    init_params: Callable[[Any, Any, int, EncoderConfig], dict] = _no_params
    batch_prefix: Callable[[Any, Mapping[str, Any]], Optional[Prefix]] = _no_prefix
    per_task_leaves: tuple[tuple[str, int], ...] = ()  # a tuple: the entry stays hashable


PEFT_KINDS: Registry[PeftKind] = Registry("peft kind")


def _no_overrides(peft_config, num_tasks: int) -> dict:
    del peft_config, num_tasks
    return {}


def _adapter_overrides(peft_config, num_tasks: int) -> dict:
    return dict(num_tasks=num_tasks, adapter_kind=peft_config.adapter_kind,
                adapter_size=peft_config.adapter_size)


def _lora_overrides(peft_config, num_tasks: int) -> dict:
    return dict(num_tasks=num_tasks, lora_rank=peft_config.lora_rank,
                lora_alpha=peft_config.lora_alpha, lora_dropout=peft_config.lora_dropout,
                lora_targets=peft_config.lora_targets)


def _init_prefix(rng, peft_config, num_tasks: int, encoder_config: EncoderConfig) -> dict:
    c = encoder_config
    return {"prefix": prefix_lib.init_prefix_params(
        rng, num_tasks=num_tasks, prefix_length=peft_config.prefix_length,
        hidden_size=c.hidden_size, prefix_hidden=peft_config.prefix_hidden,
        num_layers=c.num_layers, num_heads=c.num_heads, head_dim=c.head_dim)}


def _gather_prefix(params, batch) -> Prefix:
    """Each example's task prefix (either prefix form); packed rows hold every task's."""
    if "packed_task_ids" in batch:
        return prefix_lib.packed_prefix(params["prefix"], batch["packed_task_ids"])
    return prefix_lib.gather_prefix(params["prefix"], batch["task_id"])


PEFT_KINDS.register("none", PeftKind(encoder_overrides=_no_overrides, freezes_checkpoint=False))
# prefix.py's training form: one embedding row block per task, an MLP shared by all
PEFT_KINDS.register("prefix", PeftKind(encoder_overrides=_no_overrides, init_params=_init_prefix,
                                       batch_prefix=_gather_prefix,
                                       per_task_leaves=(("prefix/embedding", 0),)))
PEFT_KINDS.register("adapter", PeftKind(encoder_overrides=_adapter_overrides))
PEFT_KINDS.register("lora", PeftKind(encoder_overrides=_lora_overrides))
