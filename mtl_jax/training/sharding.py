"""Device mesh ("data", "fsdp", "tensor"), logical-axis rules, state and batch shardings.

Parameters carry logical axis names from ``model.logical_specs(params)`` (embed, mlp, heads, kv,
vocab, layers); ``config.parallel.rules`` maps them to mesh axes. The batch is split over
("data", "fsdp"), the gradient all-reduce / FSDP gathers are left to XLA, and the per-task Gram
matrix of gradient surgery is reduced per device with ``shard_map``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtl_jax.errors import UserError
from mtl_jax.registry import Registry
from mtl_jax.training import weighting as weighting_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class Rules:
    logical: dict  # logical axis name -> mesh axis
    fsdp_fallback: bool = False  # shard the largest divisible dim over fsdp when nothing matched


RULES: Registry[Rules] = Registry("parallel.rules")
RULES.register("replicated", Rules({}))
RULES.register("fsdp", Rules({"embed": "fsdp"}, fsdp_fallback=True))
# Megatron-style: attention heads and MLP hidden over "tensor", embed over "fsdp" (size 1 = none).
RULES.register("tensor", Rules({"heads": "tensor", "mlp": "tensor", "embed": "fsdp"}))


def make_mesh(config, devices=None) -> Mesh:
    """Mesh from ``config.parallel.mesh`` (data/fsdp/tensor sizes, one -1 = the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(config.parallel.mesh[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError(f"parallel.mesh {dict(zip(MESH_AXES, sizes))} has several -1; "
                        f"leave at most one axis as -1 (the rest of the devices)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise UserError(f"parallel.mesh {dict(zip(MESH_AXES, sizes))} does not divide "
                            f"{len(devices)} devices; pick sizes whose product divides it")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(f"parallel.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                        f"devices but {len(devices)} are present; set one axis to -1")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _spec_leaves(specs) -> list:
    return jax.tree.leaves(specs, is_leaf=lambda x: x is None or isinstance(x, P))


def _mesh_spec(logical, shape, rules: Rules, mesh: Mesh) -> P:
    """One leaf's PartitionSpec: logical names mapped, non-dividing or reused axes dropped."""
    names = tuple(logical) if logical is not None else ()
    names = names + (None,) * (len(shape) - len(names))
    out, used = [], set()
    for name, dim in zip(names, shape):
        axis = rules.logical.get(name) if isinstance(name, str) else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            out.append(None)
            continue
        used.add(axis)
        out.append(axis)
    if rules.fsdp_fallback and "fsdp" not in used and shape:
        n = mesh.shape["fsdp"]
        for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if out[d] is None and shape[d] % n == 0 and shape[d] >= n:
                out[d] = "fsdp"
                break
    return P(*out)


def param_specs(model, params, config, mesh: Mesh):
    """Params-shaped tree of mesh PartitionSpecs under ``config.parallel.rules``."""
    rules = RULES.get(config.parallel.rules)
    leaves, treedef = jax.tree.flatten(params)
    logical = getattr(model, "logical_specs", None)
    logical = _spec_leaves(logical(params)) if logical else [None] * len(leaves)
    if len(logical) != len(leaves):
        raise ValueError(f"logical_specs gave {len(logical)} leaves for {len(leaves)} params")
    specs = [_mesh_spec(s, jnp.shape(x), rules, mesh) for s, x in zip(logical, leaves)]
    return jax.tree.unflatten(treedef, specs)


def state_shardings(state, param_specs, mesh: Mesh):
    """TrainState-shaped tree of NamedSharding: params and optimizer moments as ``param_specs``
    (from ``param_specs(...)``), everything else replicated. Computed once per run, from the
    abstract state, by the jit strategy."""
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs,
                         is_leaf=lambda x: isinstance(x, P))
    rep = NamedSharding(mesh, P())
    # MaskedNode: a multi_transform group's (empty) state at another group's parameters.
    opt = optax.tree_map_params(
        state.tx, lambda v, s: v if isinstance(v, optax.MaskedNode) else s, state.opt_state,
        named, transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return state.replace(step=rep, params=named, opt_state=opt,
                         weighting_state=jax.tree.map(lambda _: rep, state.weighting_state),
                         rng=rep)


# --- batches -----------------------------------------------------------------------------------

def example_axis(batch) -> int:
    """The axis that counts a batch's examples, ``task_id.ndim - 1``: flat [B] 0, stacked
    [T, b] 1, meta-learning episodes [K, S', b] 2. The axes before it are replicated."""
    return np.ndim(batch["task_id"]) - 1


def batch_spec(ndim: int, axis: int) -> P:
    """The example axis ``axis`` over ("data", "fsdp"), every other axis replicated (a bool
    ``axis`` is the stacked flag: True = 1)."""
    axis = int(axis)
    return P(*([None] * axis), BATCH_AXES, *([None] * (ndim - axis - 1)))


def shard_batch(batch: dict, mesh: Mesh, axis: int | None = None) -> dict:
    """Host-local NumPy batch -> global jax.Arrays, the example axis (``example_axis``) split
    over ("data", "fsdp").

    Each process passes its own slice of the global batch (its rows, in process order);
    ``jax.make_array_from_process_local_data`` assembles the global array without a gather.
    """
    axis = example_axis(batch) if axis is None else int(axis)
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for key, x in batch.items():
        x = np.asarray(x)
        global_shape = list(x.shape)
        global_shape[axis] *= jax.process_count()
        if global_shape[axis] % n:
            setting = ("weighting.meta_batch_size (per task for stacked batches)"
                       if key.startswith("meta/") else
                       "train.batch_size (per task for stacked batches; meta.inner_batch_size "
                       "for meta-learning episodes)")
            raise UserError(f"batch key {key!r} has {global_shape[axis]} rows, not divisible by "
                            f"the {n} data x fsdp devices; make {setting} a multiple of {n}")
        sharding = NamedSharding(mesh, batch_spec(x.ndim, axis))
        out[key] = jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
    return out


# --- per-device Gram matrix --------------------------------------------------------------------

def _spec_axes(spec: P) -> tuple:
    axes = []
    for entry in spec:
        axes.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(a for a in axes if a is not None)


def sharded_gram_fn(mesh: Mesh, leaf_specs: list):
    """gram_fn(leaves [T, ...], indices) computing sum_leaf G G^T without gathering G.

    Each device forms the T x T partial Gram of its own shard of every gradient leaf; a psum over
    exactly the mesh axes that leaf is split along completes it (replicated leaves need none).
    The per-task gradients of an FSDP model therefore never leave their shards.
    """
    def gram_fn(leaves, idx):
        specs = [P(None, *leaf_specs[i]) for i in idx]

        def local(*gs):
            total = jnp.zeros([gs[0].shape[0]] * 2, jnp.float32)
            for g, spec in zip(gs, specs):
                part = weighting_lib.leaf_gram(g)
                axes = _spec_axes(spec)
                total = total + (jax.lax.psum(part, axes) if axes else part)
            return total

        return shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P())(*leaves)
    return gram_fn
