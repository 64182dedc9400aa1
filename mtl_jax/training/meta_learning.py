"""First-order meta-learning (``train.algorithm`` reptile | fomaml) as pure functions.

One outer step at theta (the trainable leaves), on an episode batch [K, S', b, ...]:

    for each of the K sampled tasks (vmapped; row k holds S' sub-batches of one task):
        phi_k <- theta; S inner steps of ``meta.inner_optimizer`` (lr ``meta.inner_lr``, its
        state fresh for every task at every outer step) on sub-batches 0..S-1 (jax.lax.scan)
    reptile  g = mean_k (theta - phi_k)                       (S' = S)
    fomaml   g = mean_k grad L_k(phi_k) on sub-batch S, the task's query batch (S' = S + 1;
             first order: no derivative through the inner steps)

The run's own optimizer (``optim.*``: its schedule, parameter groups, frozen masks, clipping)
then applies g as it would a gradient. With ``optim.name=sgd optim.lr=eps optim.b1=0
optim.weight_decay=0 optim.clip_norm=0 optim.schedule=constant optim.warmup_fraction=0`` that
is exactly Reptile's theta <- theta + eps (mean_k phi_k - theta) (Nichol et al. 2018, the
batched version); the default adamw on g is the paper's "Adam on the Reptile gradient".
``optim.accumulate_steps=n`` averages the outer gradients of n outer steps (all adapted from the
same theta) into one update: n * K tasks per update. The loop's examples/s count every example
of an episode (K * S' * b per outer step).

``reptile`` / ``fomaml`` only need ``grad_fn(leaves, sub_batch, key) -> (loss, grads, aux)``;
``make_meta_step`` builds it from the model's per-task losses (global over devices through the
``Reducer``, as in the standard step) and hands the outer gradient to the standard step's tail,
``step.apply_step_grads`` (the update, the NaN policy, the metrics).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.registry import Registry
from mtl_jax.training import step as step_lib
from mtl_jax.training.state import TrainState, task_names

# meta.inner_optimizer -> (lr -> the inner transformation); adam takes optax's defaults
# (b1 0.9, b2 0.999, eps 1e-8).
INNER_OPTIMIZERS: Registry[Callable[[float], optax.GradientTransformation]] = Registry(
    "meta.inner_optimizer")
INNER_OPTIMIZERS.register("sgd", optax.sgd)
INNER_OPTIMIZERS.register("adam", optax.adam)

# (leaves, sub_batch, key) -> (scalar loss, grads like leaves, aux)
GradFn = Callable[[list, Any, jax.Array], tuple]


def inner_optimizer(config) -> optax.GradientTransformation:
    return INNER_OPTIMIZERS.get(config.meta.inner_optimizer)(float(config.meta.inner_lr))


class Adapted(NamedTuple):
    leaves: list  # phi after the inner steps
    losses: jax.Array  # [S]: the loss before each inner update
    aux: Any  # grad_fn's aux of every inner step, stacked [S, ...]


class OuterGrad(NamedTuple):
    grads: list  # the outer "gradient" of each leaf, a mean over the K tasks
    losses: jax.Array  # [K]: each task row's logged loss
    aux: Any  # [K, ...]: grad_fn's aux where the loss is logged


def adapt(grad_fn: GradFn, leaves, batches, keys, inner_tx) -> Adapted:
    """S inner steps of ``inner_tx`` from ``leaves`` (its state fresh), step s on sub-batch
    ``batches[s]`` (every leaf [S, ...]) with dropout key ``keys[s]``."""
    def inner_step(carry, xs):
        phi, opt_state = carry
        batch, key = xs
        loss, grads, aux = grad_fn(phi, batch, key)
        updates, opt_state = inner_tx.update(grads, opt_state, phi)
        return (optax.apply_updates(phi, updates), opt_state), (loss, aux)

    (phi, _), (losses, aux) = jax.lax.scan(inner_step, (leaves, inner_tx.init(leaves)),
                                           (batches, keys))
    return Adapted(phi, losses, aux)


def _index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def reptile(grad_fn: GradFn, leaves, episode, keys, inner_tx) -> OuterGrad:
    """g = mean_k (theta - phi_k); logged: each task's loss at theta (its first inner step,
    the loss before adaptation). ``episode``: leaves [K, S, ...]; ``keys``: [K, S]."""
    def one_task(batches, task_keys):
        adapted = adapt(grad_fn, leaves, batches, task_keys, inner_tx)
        # theta - phi per task, then the mean: the difference is small next to theta, so
        # subtracting first keeps its precision.
        deltas = [x - phi for x, phi in zip(leaves, adapted.leaves)]
        return deltas, adapted.losses[0], _index(adapted.aux, 0)

    deltas, losses, aux = jax.vmap(one_task)(episode, keys)
    return OuterGrad([jnp.mean(d, axis=0) for d in deltas], losses, aux)


def fomaml(grad_fn: GradFn, leaves, episode, keys, inner_tx) -> OuterGrad:
    """g = mean_k grad L(phi_k) on each task's query batch (its last sub-batch, after S inner
    steps on the others); logged: the query loss at the adapted parameters.
    ``episode``: leaves [K, S + 1, ...]; ``keys``: [K, S + 1]."""
    def one_task(batches, task_keys):
        support = jax.tree.map(lambda x: x[:-1], batches)
        adapted = adapt(grad_fn, leaves, support, task_keys[:-1], inner_tx)
        loss, grads, aux = grad_fn(adapted.leaves, _index(batches, -1), task_keys[-1])
        return grads, loss, aux

    grads, losses, aux = jax.vmap(one_task)(episode, keys)
    return OuterGrad([jnp.mean(g, axis=0) for g in grads], losses, aux)


# --- the step on a MultiTaskModel --------------------------------------------------------------

class RowLosses(NamedTuple):
    """One sub-batch's global losses (the aux of ``task_grad_fn``)."""

    losses: jax.Array  # [T]: only the row's task is non-zero
    counts: jax.Array  # [T]
    penalty: jax.Array  # the soft-sharing penalty at these parameters


def task_grad_fn(loss_fn, reducer: step_lib.Reducer, params, split: step_lib.Split) -> GradFn:
    """The gradient, wrt the trainable leaves, of a one-task sub-batch's loss: its task's
    global mean (``reducer``: summed over devices as in the standard step) + the soft penalty.
    The sub-batch holds one task, so the soft encoder of that task runs (homogeneous)."""
    def grad_fn(leaves, batch, key):
        def forward(ls):
            out = loss_fn(split.merge(params, ls), batch, key, True)
            return (out.losses, out.penalty), (out.counts, out.denominators)

        (losses, penalty), vjp, (counts, denominators) = jax.vjp(forward, leaves, has_aux=True)
        glob = reducer.global_losses(losses, counts, denominators)
        grads = reducer.sum(vjp((glob.cotangent_scale, reducer.penalty_cotangent()))[0])
        penalty = reducer.mean(penalty)
        return (jnp.sum(glob.losses) + penalty, grads,
                RowLosses(glob.losses, glob.counts, penalty))
    return grad_fn


def episode_keys(rng, num_tasks: int, num_steps: int) -> jax.Array:
    """[K, S'] dropout keys: ``rng`` (already folded with the step) folded with (k, s)."""
    def task_keys(k):
        task = jax.random.fold_in(rng, k)
        return jax.vmap(lambda s: jax.random.fold_in(task, s))(jnp.arange(num_steps))
    return jax.vmap(task_keys)(jnp.arange(num_tasks))


def logged_losses(out: OuterGrad, weighting_state) -> step_lib.StepGrads:
    """The standard step's metric inputs from the K rows: a task's loss is the mean over the
    rows that sampled it, its weight its share of the K rows, ``total`` the mean row loss
    (penalty included)."""
    rows: RowLosses = out.aux
    sampled = (rows.counts > 0).astype(jnp.float32)  # [K, T]: row k is task t
    per_task = sampled.sum(0)
    losses = jnp.sum(rows.losses * sampled, 0) / jnp.maximum(per_task, 1.0)
    return step_lib.StepGrads(out.grads, losses, rows.counts.sum(0), jnp.mean(out.losses),
                              jnp.mean(rows.penalty), weighting_state,
                              per_task / sampled.shape[0])


def make_meta_step(model, config, outer_fn, reducer: step_lib.Reducer = step_lib.Reducer()):
    """The pure outer step ``(state, batch [K, S', b, ...], rng) -> (state, metrics)`` of
    ``outer_fn`` (``reptile`` | ``fomaml``). Only the trainable leaves
    (``state.optimizer.trainable_mask()``) are adapted and meta-learned; the metrics are the
    standard step's (``train/loss``: reptile's pre-adaptation loss, fomaml's query loss)."""
    names = task_names(model)
    loss_fn = step_lib.make_loss_fn(model)
    inner_tx = inner_optimizer(config)
    skip_bad = step_lib.skips_bad_steps(config)

    def train_step(state: TrainState, batch, rng):
        rng = step_lib.step_rng(rng, state, reducer)
        split = step_lib.Split.of(state.params, state.optimizer.trainable_mask())
        keys = episode_keys(rng, *batch["task_id"].shape[:2])
        out = outer_fn(task_grad_fn(loss_fn, reducer, state.params, split),
                       split.take(state.params), batch, keys, inner_tx)
        # The weighting state passes through unchanged (meta-learning weighs tasks equally).
        return step_lib.apply_step_grads(state, split, logged_losses(out, state.weighting_state),
                                         names, skip_bad)

    return train_step
