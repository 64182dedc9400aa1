"""The jitted train and eval steps.

One step: forward all task losses, combine them (or the per-task gradients) with the configured
weighting, one optimizer update, metrics as device scalars. The same body serves the jit path
(global arrays over a mesh, ``Reducer()``) and the pmap path (per-device shards,
``Reducer("batch")`` normalises losses by global counts and psums gradients).

Per-task gradients (pcgrad/cagrad/gradnorm) come from stacked batches [T, B//T, ...]: one
vjp per sub-batch, vmapped over the task axis, so the FLOPs are those of one backward pass over
the whole batch. Frozen parameters are not differentiated at all.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mtl_jax.errors import UserError
from mtl_jax.registry import Registry
from mtl_jax.training import optim as optim_lib
from mtl_jax.training import sharding as sharding_lib
from mtl_jax.training import weighting as weighting_lib
from mtl_jax.training.state import TrainState, task_names

NAN_POLICIES = ("stop", "skip")
TASK_GRAD_IMPLS: Registry[Callable] = Registry("weighting.task_grad_impl")
TASK_GRAD_IMPLS.register("vmap", lambda f, xs: jax.vmap(f)(*xs))
TASK_GRAD_IMPLS.register("map", lambda f, xs: jax.lax.map(lambda a: f(*a), xs))


@dataclasses.dataclass(frozen=True)
class Reducer:
    """Turns per-device losses/gradients into global ones. ``axis_name=None``: already global."""

    axis_name: str | None = None

    def global_losses(self, losses, counts):
        """-> (global mean losses, global counts, cotangent scale for the local losses)."""
        if self.axis_name is None:
            return losses, counts, jnp.ones_like(losses)
        total = jax.lax.psum(counts, self.axis_name)
        denom = jnp.maximum(total, 1.0)
        return jax.lax.psum(counts * losses, self.axis_name) / denom, total, counts / denom

    def sum(self, tree):
        return tree if self.axis_name is None else jax.lax.psum(tree, self.axis_name)

    def mean(self, x):
        return x if self.axis_name is None else jax.lax.pmean(x, self.axis_name)

    def penalty_cotangent(self):
        n = 1 if self.axis_name is None else jax.lax.psum(1, self.axis_name)
        return jnp.asarray(1.0 / n, jnp.float32)


# --- losses and gradients ----------------------------------------------------------------------

def _loss_fn(model):
    """(params, batch, rng, homogeneous) -> (losses [T], counts [T], soft_penalty)."""
    takes_homogeneous = "homogeneous" in inspect.signature(model.task_losses).parameters

    def loss_fn(params, batch, rng, homogeneous):
        kw = {"homogeneous": homogeneous} if takes_homogeneous else {}
        losses, counts, aux = model.task_losses(params, batch, rng, False, **kw)
        penalty = jnp.asarray(aux.get("soft_penalty", 0.0), jnp.float32)
        return losses.astype(jnp.float32), counts.astype(jnp.float32), penalty
    return loss_fn


def unstack(batch: dict) -> dict:
    """[T, b, ...] -> [T*b, ...]: a stacked batch as one mixed batch."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Split:
    """Params as (trainable leaves, frozen leaves); only the trainable ones are differentiated."""

    treedef: object
    trainable: tuple  # leaf indices

    @classmethod
    def of(cls, params, mask):
        flat, treedef = jax.tree.flatten(params)
        m = treedef.flatten_up_to(mask)
        return cls(treedef, tuple(i for i, t in enumerate(m) if t))

    def take(self, params) -> list:
        flat = self.treedef.flatten_up_to(params)
        return [flat[i] for i in self.trainable]

    def merge(self, params, leaves):
        flat = list(self.treedef.flatten_up_to(params))
        for i, x in zip(self.trainable, leaves):
            flat[i] = x
        return self.treedef.unflatten(flat)

    def full_grads(self, params, leaves):
        flat = [jnp.zeros_like(x) for x in self.treedef.flatten_up_to(params)]
        for i, g in zip(self.trainable, leaves):
            flat[i] = g
        return self.treedef.unflatten(flat)


def weighted_loss_grads(loss_fn, combine, reducer, params, split, batch, rng, wstate):
    """Loss weightings: one backward whose cotangent is d total / d losses."""
    homogeneous = None
    if sharding_lib.is_stacked(batch):
        batch, homogeneous = unstack(batch), False

    def f(leaves):
        losses, counts, penalty = loss_fn(split.merge(params, leaves), batch, rng, homogeneous)
        return (losses, penalty), counts

    (losses, penalty), vjp, counts = jax.vjp(f, split.take(params), has_aux=True)
    losses, counts, scale = reducer.global_losses(losses, counts)
    (total, (wstate, weights)), d_losses = jax.value_and_grad(
        lambda l: (lambda t, s, w: (t, (s, w)))(*combine(l, counts, wstate, rng)),
        has_aux=True)(losses)
    grads = reducer.sum(vjp((d_losses * scale, reducer.penalty_cotangent()))[0])
    penalty = reducer.mean(penalty)
    return grads, losses, counts, total + penalty, penalty, wstate, weights


def per_task_grads(loss_fn, reducer, params, split, batch, rng, impl: str):
    """Stacked batch -> per-task gradients [T, ...] of the trainable leaves, global losses/counts.

    Sub-batch t only holds task t, so its vjp is task t's gradient; the soft penalty is split
    evenly (1/T per sub-batch) so the T gradients still sum to the full gradient.
    """
    num_tasks = batch["task_id"].shape[0]
    leaves = split.take(params)

    def one(t, sub, key):
        def f(ls):
            losses, counts, penalty = loss_fn(split.merge(params, ls), sub, key, True)
            return (losses[t], penalty), counts[t]
        (loss, penalty), vjp, count = jax.vjp(f, leaves, has_aux=True)
        loss, count, scale = reducer.global_losses(loss, count)
        g = vjp((scale, reducer.penalty_cotangent() / num_tasks))[0]
        return g, loss, count, penalty

    keys = jax.vmap(lambda t: jax.random.fold_in(rng, t))(jnp.arange(num_tasks))
    g, losses, counts, penalty = TASK_GRAD_IMPLS.get(impl)(one, (jnp.arange(num_tasks), batch, keys))
    return reducer.sum(g), losses, counts, reducer.mean(penalty[0])


def _leaf_masks(params, labels, split, config):
    """(shared, last-shared-layer) bool per trainable leaf, for surgery and GradNorm."""
    w = config.weighting
    paths = [optim_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    flat_labels = split.treedef.flatten_up_to(labels)
    paths = [paths[i] for i in split.trainable]
    shared = [re.fullmatch(w.shared_labels, flat_labels[i]) is not None for i in split.trainable]
    if w.gradnorm_layer:
        layer = [s and re.search(w.gradnorm_layer, p) is not None for s, p in zip(shared, paths)]
    else:
        idx = [int(m.group(1)) if s and (m := re.search(r"layers?_(\d+)", p)) else -1
               for s, p in zip(shared, paths)]
        top = max(idx, default=-1)
        layer = [i == top for i in idx] if top >= 0 else list(shared)
    if config.weighting.name == "gradnorm" and not any(layer):
        raise UserError("weighting.gradnorm_layer selects no trainable shared parameter; set it "
                        "to a regex of the last shared layer's parameter paths")
    return shared, layer


# --- the step ----------------------------------------------------------------------------------

def _check_config(config):
    if config.train.nan_policy not in NAN_POLICIES:
        raise UserError(f"unknown train.nan_policy {config.train.nan_policy!r}; "
                        f"valid: {', '.join(NAN_POLICIES)}")
    weighting = weighting_lib.get(config)
    if weighting.uses_task_grads and config.data.batch_mode != "stacked":
        raise UserError(f"weighting.name={config.weighting.name} needs per-task gradients; "
                        f"set data.batch_mode=stacked")
    TASK_GRAD_IMPLS.get(config.weighting.task_grad_impl)
    return weighting


def make_train_step(model, config, mesh=None, reducer: Reducer = Reducer()):
    """The pure step ``(state, batch, rng) -> (state, metrics)`` (jit/pmap it yourself).

    ``mesh`` (jit path) adds sharding constraints on the new state and computes the surgery
    Gram matrix per device with shard_map; None for single-device or pmap use.
    """
    weighting = _check_config(config)
    names = task_names(model)
    combine = weighting.make_combine(config, names)
    loss_fn = _loss_fn(model)
    skip_bad = config.train.nan_policy == "skip"

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        if reducer.axis_name is not None:  # distinct dropout per device
            rng = jax.random.fold_in(rng, jax.lax.axis_index(reducer.axis_name))
        split = Split.of(state.params, state.optimizer.trainable_mask())
        if weighting.uses_task_grads:
            if not sharding_lib.is_stacked(batch):
                raise UserError(f"weighting.name={config.weighting.name} needs stacked batches "
                                f"([T, B//T, ...]); set data.batch_mode=stacked")
            g, losses, counts, penalty = per_task_grads(
                loss_fn, reducer, state.params, split, batch, rng,
                config.weighting.task_grad_impl)
            shared, layer = _leaf_masks(state.params, model.param_labels(state.params),
                                        split, config)
            gram_fn = None
            if mesh is not None:
                specs = sharding_lib.param_specs(model, state.params, config, mesh)
                gram_fn = sharding_lib.sharded_gram_fn(mesh, split.take(specs))
            task_grads = weighting_lib.TaskGrads(g, shared, layer, gram_fn)
            grad_leaves, wstate, weights = combine(task_grads, losses, counts,
                                                   state.weighting_state, rng)
            total = jnp.sum(losses) + penalty
        else:
            grad_leaves, losses, counts, total, penalty, wstate, weights = weighted_loss_grads(
                loss_fn, combine, reducer, state.params, split, batch, rng, state.weighting_state)
        grads = split.full_grads(state.params, grad_leaves)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            weighting_state=wstate)
        if skip_bad:  # keep the old params/optimizer/weighting state on a non-finite step
            kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                (new.params, new.opt_state, new.weighting_state),
                                (state.params, state.opt_state, state.weighting_state))
            new = new.replace(params=kept[0], opt_state=kept[1], weighting_state=kept[2])
        if mesh is not None:
            new = jax.lax.with_sharding_constraint(
                new, sharding_lib.state_shardings(new, model, config, mesh))
        return new, _metrics(state, names, total, losses, weights, grad_norm, penalty, finite)

    return train_step


def _metrics(state, names, total, losses, weights, grad_norm, penalty, finite):
    lrs = state.optimizer.learning_rates(state.step)
    m = {"train/loss": total, "train/grad_norm": grad_norm, "train/soft_penalty": penalty,
         "train/finite": finite, "train/lr": jnp.asarray(lrs[state.optimizer.main_group])}
    if len(lrs) > 1:
        m.update({f"train/lr/{g}": jnp.asarray(v) for g, v in lrs.items()})
    for t, name in enumerate(names):
        m[f"train/loss/{name}"] = losses[t]
        m[f"train/weight/{name}"] = weights[t]
    return m


def build_train_step(model, config, mesh=None):
    """``train_step(state, batch, rng) -> (state, metrics)``, jitted (once per batch shape),
    state donated. ``config.parallel.mode == "pmap"`` gives the pmap version (same results)."""
    if config.parallel.mode == "pmap":
        from mtl_jax.training import pmap_step
        return pmap_step.build_pmap_train_step(model, config)
    if config.parallel.mode != "jit":
        raise UserError(f"unknown parallel.mode {config.parallel.mode!r}; valid: jit, pmap")
    return jax.jit(make_train_step(model, config, mesh), donate_argnums=0)


def build_eval_step(model, config, mesh=None):
    """``eval_step(state, batch) -> {task: head output}`` (deterministic, jitted)."""
    if config.parallel.mode == "pmap":
        from mtl_jax.training import pmap_step
        return pmap_step.build_pmap_eval_step(model, config)

    def eval_step(state, batch):
        return model.apply(state.params, batch, rng=None, deterministic=True)
    return jax.jit(eval_step)
