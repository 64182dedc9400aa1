"""The pure train step: per-task losses, their weighting, one optimizer update, metrics.

``make_train_step(model, config, reducer, gram_fn) -> train_step(state, batch, rng) ->
(state, metrics)``. The same body serves every parallel strategy (``training/parallel.py`` jits
or pmaps it and owns the shardings): on global arrays over a mesh ``Reducer()`` is the identity;
on per-device shards ``Reducer(axis_name)`` sums loss numerators and denominators over devices
before dividing and psums the gradients, so each device's step computes the global loss.

Per-task gradients (pcgrad/cagrad/gradnorm) come from stacked batches [T, B//T, ...]: one
vjp per sub-batch, vmapped over the task axis, so the FLOPs are those of one backward pass over
the whole batch. Frozen parameters are not differentiated at all.

This module is a leaf of ``mtl_jax/training``: no dispatch on the parallel mode, no shardings.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.data import heldout as heldout_lib
from mtl_jax.errors import UserError
from mtl_jax.models import param_groups
from mtl_jax.registry import Registry
from mtl_jax.training import weighting as weighting_lib
from mtl_jax.training.state import TrainState, task_names

TASK_GRAD_IMPLS: Registry[Callable] = Registry("weighting.task_grad_impl")
TASK_GRAD_IMPLS.register("vmap", lambda f, xs: jax.vmap(f)(*xs))
TASK_GRAD_IMPLS.register("map", lambda f, xs: jax.lax.map(lambda a: f(*a), xs))


def is_stacked(batch) -> bool:
    """Stacked batches ([T, B//T, ...]) have a 2-D task_id."""
    return np.ndim(batch["task_id"]) == 2


def unstack(batch: dict) -> dict:
    """[T, b, ...] -> [T*b, ...]: a stacked batch as one mixed batch."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


# --- what the step computes, named -------------------------------------------------------------

class TaskLosses(NamedTuple):
    """One forward pass's per-task losses (float32 [T] each)."""

    losses: jax.Array  # task t's mean loss over its labelled units in the batch (0 if absent)
    counts: jax.Array  # the summed weight of task t's examples
    denominators: jax.Array  # what losses[t] divides by (examples, or labelled tokens)
    penalty: jax.Array  # scalar: the soft-sharing penalty (0 for hard sharing)


class GlobalLosses(NamedTuple):
    """Per-task losses over the whole (global) batch, and d global / d local losses."""

    losses: jax.Array
    counts: jax.Array
    cotangent_scale: jax.Array  # [T]: 1 when the losses are already global


class StepGrads(NamedTuple):
    """What one step's backward gives the optimizer update and the metrics."""

    grads: list  # one gradient per trainable leaf
    losses: jax.Array  # [T] global per-task losses
    counts: jax.Array  # [T]
    total: jax.Array  # the weighted total the gradient is of (penalty included)
    penalty: jax.Array
    weighting_state: dict
    weights: jax.Array  # [T] as logged


class TaskGradients(NamedTuple):
    """Per-task gradients of the trainable leaves ([T, ...] each) and their global losses."""

    grads: list
    losses: jax.Array
    counts: jax.Array
    penalty: jax.Array


@dataclasses.dataclass(frozen=True)
class Reducer:
    """Turns per-device losses/gradients into global ones. ``axis_name=None``: already global."""

    axis_name: str | None = None

    def global_losses(self, losses, counts, denominators) -> GlobalLosses:
        """A task's global mean is (sum over devices of its loss sums) / (sum of denominators):
        a count-weighted mean of per-device means would differ wherever the units per example
        differ between devices (tokens of a token task, ignored labels)."""
        if self.axis_name is None:
            return GlobalLosses(losses, counts, jnp.ones_like(losses))
        total = jnp.maximum(jax.lax.psum(denominators, self.axis_name), 1e-9)
        # losses * denominators is the local loss sum (0 where the denominator is 0).
        global_losses = jax.lax.psum(losses * denominators, self.axis_name) / total
        return GlobalLosses(global_losses, jax.lax.psum(counts, self.axis_name),
                            denominators / total)

    def sum(self, tree):
        return tree if self.axis_name is None else jax.lax.psum(tree, self.axis_name)

    def mean(self, x):
        return x if self.axis_name is None else jax.lax.pmean(x, self.axis_name)

    def penalty_cotangent(self):
        n = 1 if self.axis_name is None else jax.lax.psum(1, self.axis_name)
        return jnp.asarray(1.0 / n, jnp.float32)


# --- losses and gradients ----------------------------------------------------------------------

def make_loss_fn(model):
    """``(params, batch, rng, homogeneous) -> TaskLosses`` (float32) from ``model.task_losses``."""
    takes_homogeneous = "homogeneous" in inspect.signature(model.task_losses).parameters

    def loss_fn(params, batch, rng, homogeneous) -> TaskLosses:
        kw = {"homogeneous": homogeneous} if takes_homogeneous else {}
        losses, counts, aux = model.task_losses(params, batch, rng, False, **kw)
        # A model without "loss_denominators" reports per-example means: counts divide them.
        denominators = aux.get("loss_denominators", counts)
        f32 = lambda x: jnp.asarray(x).astype(jnp.float32)  # noqa: E731
        return TaskLosses(f32(losses), f32(counts), f32(denominators),
                          f32(aux.get("soft_penalty", 0.0)))
    return loss_fn


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


def weighted_loss_grads(loss_fn, combine_losses, reducer, params, split, batch, rng,
                        wstate) -> StepGrads:
    """Loss weightings: the gradient of ``total = combine_losses(L) + penalty`` in one backward.

    Why one backward is enough: the forward gives the per-task losses L = (L_1..L_T) as a
    function of the parameters theta, and total depends on theta only through L (and the
    penalty P). By the chain rule, d total / d theta = sum_t (d total / d L_t) dL_t / d theta,
    which is exactly the vector-Jacobian product of the forward with the cotangent
    c = d total / d L (a [T] vector, cheap: ``combine_losses`` is a small function of T numbers).
    So: one ``jax.vjp`` of the forward, c from ``jax.value_and_grad`` of ``combine_losses`` at
    the (global) losses, one backward with cotangent (c * scale, d total / d P). On shards,
    ``scale`` = d global L_t / d local L_t (see ``Reducer.global_losses``) and the psum of the
    per-device vjps gives the global gradient.
    """
    homogeneous = None
    if is_stacked(batch):
        batch, homogeneous = unstack(batch), False

    def forward(leaves):
        out = loss_fn(split.merge(params, leaves), batch, rng, homogeneous)
        return (out.losses, out.penalty), (out.counts, out.denominators)

    (losses, penalty), vjp, (counts, denominators) = jax.vjp(
        forward, split.take(params), has_aux=True)
    glob = reducer.global_losses(losses, counts, denominators)

    def weighted_total(task_losses):
        out = combine_losses(task_losses, glob.counts, wstate, rng)
        return out.total, out
    (total, weighted), d_losses = jax.value_and_grad(weighted_total, has_aux=True)(glob.losses)
    grads = reducer.sum(vjp((d_losses * glob.cotangent_scale, reducer.penalty_cotangent()))[0])
    penalty = reducer.mean(penalty)
    return StepGrads(grads, glob.losses, glob.counts, total + penalty, penalty, weighted.state,
                     weighted.weights)


def per_task_grads(loss_fn, reducer, params, split, batch, rng, impl: str) -> TaskGradients:
    """Stacked batch -> per-task gradients [T, ...] of the trainable leaves, global losses/counts.

    Sub-batch t only holds task t, so its vjp is task t's gradient; the soft penalty is split
    evenly (1/T per sub-batch) so the T gradients still sum to the full gradient.
    """
    num_tasks = batch["task_id"].shape[0]
    leaves = split.take(params)

    def one(t, sub, key):
        def forward(ls):
            out = loss_fn(split.merge(params, ls), sub, key, True)
            return (out.losses[t], out.penalty), (out.counts[t], out.denominators[t])
        (loss, penalty), vjp, (count, denominator) = jax.vjp(forward, leaves, has_aux=True)
        glob = reducer.global_losses(loss, count, denominator)
        g = vjp((glob.cotangent_scale, reducer.penalty_cotangent() / num_tasks))[0]
        return g, glob.losses, glob.counts, penalty

    keys = jax.vmap(lambda t: jax.random.fold_in(rng, t))(jnp.arange(num_tasks))
    g, losses, counts, penalty = TASK_GRAD_IMPLS.get(impl)(
        one, (jnp.arange(num_tasks), batch, keys))
    return TaskGradients(reducer.sum(g), losses, counts, reducer.mean(penalty[0]))


class MetaLookahead(NamedTuple):
    """What the meta weighting's look-ahead gives the step (see ``meta_lookahead``)."""

    d_meta_d_weights: jax.Array  # [T]: dM/dw_t, M the held-out loss after the virtual step
    heldout_loss: jax.Array  # M at the virtual parameters
    grad_of: Callable  # weights [T] -> grad of sum_t w_t L_t + penalty (global, trainable)
    glob: GlobalLosses  # the train batch's global per-task losses
    penalty: jax.Array


def meta_lookahead(forward, held_forward, leaves, weights, virtual_lr,
                   reducer: Reducer = Reducer()) -> MetaLookahead:
    """d M / d w for M(w) = L_held(theta - lr grad_theta [sum_t w_t L_t(theta) + P(theta)]).

    Why it costs one jvp and not second derivatives: theta'(w) is linear in w with
    d theta' / d w_t = -lr grad L_t(theta), so dM/dw_t = -lr <grad M(theta'), grad L_t(theta)>,
    and <v, grad L_t(theta)> for every t at once is the forward-mode derivative of the train
    losses in the direction v = grad M(theta'). ``jax.linearize`` runs the train forward once;
    its jvp gives those T numbers and its transpose every weighted gradient (the virtual step's
    and, in the step, the real one with the updated weights) without another forward.

    ``forward(leaves)`` / ``held_forward(leaves)`` -> ``TaskLosses`` on the train / held-out
    batch; on shards, ``reducer`` makes losses, gradients and products global.
    """
    out, jvp_fn = jax.linearize(forward, leaves)
    vjp_fn = jax.linear_transpose(jvp_fn, leaves)
    glob = reducer.global_losses(out.losses, out.counts, out.denominators)
    zeros = jnp.zeros_like(out.losses)

    def grad_of(task_weights):
        cotangent = TaskLosses(task_weights * glob.cotangent_scale, zeros, zeros,
                               reducer.penalty_cotangent())
        return reducer.sum(vjp_fn(cotangent)[0])

    virtual = [x - virtual_lr * g for x, g in zip(leaves, grad_of(weights))]
    held, held_vjp = jax.vjp(held_forward, virtual)
    held_glob = reducer.global_losses(held.losses, held.counts, held.denominators)
    held_zeros = jnp.zeros_like(held.losses)
    direction = reducer.sum(held_vjp(TaskLosses(held_glob.cotangent_scale, held_zeros,
                                                held_zeros, jnp.zeros([], jnp.float32)))[0])
    directional = reducer.sum(jvp_fn(direction).losses * glob.cotangent_scale)
    return MetaLookahead(-virtual_lr * directional, jnp.sum(held_glob.losses), grad_of, glob,
                         reducer.mean(out.penalty))


def _leaf_masks(params, labels, split, config, weighting):
    """(shared, last-shared-layer) bool per trainable leaf, for surgery and GradNorm."""
    w = config.weighting
    paths = [param_groups.path_str(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
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
    if weighting.uses_layer_grads and not any(layer):
        raise UserError("weighting.gradnorm_layer selects no trainable shared parameter; set it "
                        "to a regex of the last shared layer's parameter paths")
    return shared, layer


# --- the step ----------------------------------------------------------------------------------

NAN_POLICIES = ("stop", "skip")


def skips_bad_steps(config) -> bool:
    """``train.nan_policy`` for a step body: True = a non-finite step keeps the old state. The
    one check of the name besides validate's (bench and tests build steps without validate)."""
    if config.train.nan_policy not in NAN_POLICIES:
        raise UserError(f"unknown train.nan_policy {config.train.nan_policy!r}; "
                        f"valid: {', '.join(NAN_POLICIES)}")
    return config.train.nan_policy == "skip"


def step_rng(rng, state, reducer: Reducer):
    """The step's dropout key: ``rng`` folded with the step (and the device, on shards)."""
    rng = jax.random.fold_in(rng, state.step)
    if reducer.axis_name is not None:  # distinct dropout per device
        rng = jax.random.fold_in(rng, jax.lax.axis_index(reducer.axis_name))
    return rng


def apply_step_grads(state: TrainState, split: Split, out: StepGrads, names, skip_bad: bool):
    """The end of every step body: the run's optimizer applies ``out.grads`` (trainable leaves;
    frozen ones get zeros), the NaN policy, the metrics -> (new state, metrics)."""
    grads = split.full_grads(state.params, out.grads)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(out.total) & jnp.isfinite(grad_norm)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        weighting_state=out.weighting_state)
    if skip_bad:  # keep the old params/optimizer/weighting state on a non-finite step
        kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                            (new.params, new.opt_state, new.weighting_state),
                            (state.params, state.opt_state, state.weighting_state))
        new = new.replace(params=kept[0], opt_state=kept[1], weighting_state=kept[2])
    return new, step_metrics(state, names, out, grad_norm, finite)


def _check_config(config):
    weighting = weighting_lib.get(config)
    if weighting.uses_task_grads and config.data.batch_mode != "stacked":
        raise UserError(f"weighting.name={config.weighting.name} needs per-task gradients; "
                        f"set data.batch_mode=stacked")
    TASK_GRAD_IMPLS.get(config.weighting.task_grad_impl)
    return weighting


def make_train_step(model, config, reducer: Reducer = Reducer(), gram_fn=None):
    """The pure step ``(state, batch, rng) -> (state, metrics)`` (jit/pmap it yourself).

    ``gram_fn(leaves, indices)`` computes the surgery Gram matrix of the trainable leaves
    (``sharding.sharded_gram_fn`` reduces per-device partial Grams); None: a plain sum.
    """
    weighting = _check_config(config)
    names = task_names(model)
    loss_fn = make_loss_fn(model)
    skip_bad = skips_bad_steps(config)
    make_grads_fn = _GRADS_FNS[type(weighting)]  # the weighting's kind picks the gradient path
    grads_fn = make_grads_fn(model, config, weighting, loss_fn, reducer, gram_fn, names)

    def train_step(state: TrainState, batch, rng):
        rng = step_rng(rng, state, reducer)
        split = Split.of(state.params, state.optimizer.trainable_mask())
        return apply_step_grads(state, split, grads_fn(state, split, batch, rng), names,
                                skip_bad)

    return train_step


def _loss_weighting_step(model, config, weighting, loss_fn, reducer, gram_fn, names):
    """Loss weightings: one backward with the weighting's cotangent."""
    del model, gram_fn
    combine_losses = weighting.make_combine_losses(config, names)

    def grads_fn(state, split, batch, rng) -> StepGrads:
        return weighted_loss_grads(loss_fn, combine_losses, reducer, state.params, split,
                                   batch, rng, state.weighting_state)
    return grads_fn


def _meta_weighting_step(model, config, weighting, loss_fn, reducer, gram_fn, names):
    """Meta-learned weights: update them by ``meta_lookahead`` on the batch's held-out rows,
    then take the gradient of the train loss under the updated weights."""
    del model, gram_fn, names
    update = weighting.make_update(config)
    fixed_lr = float(config.weighting.meta_virtual_lr)
    every = int(config.weighting.meta_every)

    def fixed_weights(state, split, batch, rng) -> StepGrads:
        """A step between weight updates: the plain weighted loss, held-out rows unused."""
        train, _ = heldout_lib.split_prefixed(batch)
        weights = weighting.weights(state.weighting_state)
        combine = lambda losses, counts, wstate, key: weighting_lib.WeightedLoss(  # noqa: E731
            jnp.sum(jax.lax.stop_gradient(weights) * losses), wstate, weights)
        return weighted_loss_grads(loss_fn, combine, reducer, state.params, split, train, rng,
                                   state.weighting_state)

    def grads_fn(state, split, batch, rng) -> StepGrads:
        if every == 1:
            return updating(state, split, batch, rng)
        # lax.cond runs one branch: the look-ahead's cost is paid every ``every`` steps only.
        return jax.lax.cond(state.step % every == 0,
                            lambda: updating(state, split, batch, rng),
                            lambda: fixed_weights(state, split, batch, rng))

    def updating(state, split, batch, rng) -> StepGrads:
        train, held = heldout_lib.split_prefixed(batch)
        if not held:
            raise UserError(f"weighting.name={config.weighting.name} needs held-out rows in the "
                            f"batch ({heldout_lib.PREFIX}* keys); build the iterator with "
                            f"heldout=weighting.heldout_of(config)")
        homogeneous = None
        if is_stacked(train):
            train, homogeneous = unstack(train), False
        held = unstack(held) if is_stacked(held) else held
        held_rng = jax.random.fold_in(rng, 0x4E1D)
        forward = lambda ls: loss_fn(split.merge(state.params, ls), train, rng,  # noqa: E731
                                     homogeneous)
        held_forward = lambda ls: loss_fn(split.merge(state.params, ls), held,  # noqa: E731
                                          held_rng, False)
        optimizer = state.optimizer
        virtual_lr = (fixed_lr if fixed_lr > 0 else  # 0: the optimizer's lr of this step
                      jnp.asarray(optimizer.learning_rates(state.step)[optimizer.main_group]))
        look = meta_lookahead(forward, held_forward, split.take(state.params),
                              weighting.weights(state.weighting_state), virtual_lr, reducer)
        new_state = update(state.weighting_state, look.d_meta_d_weights, look.glob.counts > 0)
        weights = weighting.weights(new_state)
        total = jnp.sum(weights * look.glob.losses) + look.penalty
        return StepGrads(look.grad_of(weights), look.glob.losses, look.glob.counts, total,
                         look.penalty, new_state, weights)
    return grads_fn


def _task_grads_step(model, config, weighting, loss_fn, reducer, gram_fn, names):
    """Gradient weightings: per-task gradients, then ``combine_grads`` mixes them."""
    combine_grads = weighting.make_combine_grads(config, names)

    def grads_fn(state, split, batch, rng) -> StepGrads:
        if not is_stacked(batch):
            raise UserError(f"weighting.name={config.weighting.name} needs stacked batches "
                            f"([T, B//T, ...]); set data.batch_mode=stacked")
        tg = per_task_grads(loss_fn, reducer, state.params, split, batch, rng,
                            config.weighting.task_grad_impl)
        shared, layer = _leaf_masks(state.params, model.param_labels(state.params), split,
                                    config, weighting)
        task_grads = weighting_lib.TaskGrads(tg.grads, shared, layer, gram_fn)
        mixed = combine_grads(task_grads, tg.losses, tg.counts, state.weighting_state, rng)
        return StepGrads(mixed.grads, tg.losses, tg.counts, jnp.sum(tg.losses) + tg.penalty,
                         tg.penalty, mixed.state, mixed.weights)
    return grads_fn


# weighting kind -> the step's gradient path (the one dispatch on the weighting's kind)
_GRADS_FNS = {weighting_lib.LossWeighting: _loss_weighting_step,
              weighting_lib.GradientWeighting: _task_grads_step,
              weighting_lib.MetaWeighting: _meta_weighting_step}


def step_metrics(state, names, out: StepGrads, grad_norm, finite) -> dict:
    """The step's device-scalar metrics (``train/loss``, ``train/loss/<task>``, ...: the list
    is in docs/architecture.md, Training); ``state`` is the state before the update."""
    lrs = state.optimizer.learning_rates(state.step)
    m = {"train/loss": out.total, "train/grad_norm": grad_norm,
         "train/soft_penalty": out.penalty, "train/finite": finite,
         "train/present": out.counts > 0,  # [T]: the global batch had the task (for the loop)
         "train/lr": jnp.asarray(lrs[state.optimizer.main_group])}
    if len(lrs) > 1:
        m.update({f"train/lr/{g}": jnp.asarray(v) for g, v in lrs.items()})
    for t, name in enumerate(names):
        m[f"train/loss/{name}"] = out.losses[t]
        m[f"train/weight/{name}"] = out.weights[t]
    return m


def make_eval_step(model):
    """The pure ``eval_step(state, batch) -> {task: head output}`` (deterministic)."""
    def eval_step(state, batch):
        return model.apply(state.params, batch, rng=None, deterministic=True)
    return eval_step
