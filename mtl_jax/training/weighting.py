"""Task-loss weighting and gradient surgery: pure functions over a small state.

Three kinds of registry entry, each with its own protocol:

* ``LossWeighting`` (equal, static, uncertainty, dwa): ``make_combine_losses(config, names)``
  gives ``combine_losses(losses[T], counts[T], state, rng) -> WeightedLoss(total, state,
  weights[T])``; ``total`` is differentiable in ``losses`` (the step takes its gradient with
  respect to the losses as the backward cotangent, so one backward over the whole batch serves
  any batch mode).
* ``GradientWeighting`` (gradnorm, pcgrad, cagrad) needs per-task gradients (stacked batches):
  ``make_combine_grads(config, names)`` gives ``combine_grads(task_grads: TaskGrads, losses,
  counts, state, rng) -> WeightedGrads(grads, state, weights)``. They work in the T x T Gram
  space of the shared gradients, so the only full-size work is the Gram matrix and one weighted
  sum of the T gradients. ``uses_layer_grads`` marks the entries that read the last shared
  layer's gradients (GradNorm), which the step then requires to select a parameter.

* ``MetaWeighting`` (meta) learns the weights from held-out batches of the train data: the step
  differentiates the held-out loss after a virtual SGD step on the weighted train loss with
  respect to the weights (``step.meta_lookahead``); the entry owns the weights' form and
  their update.

``total`` uses the *sum* of task losses (equal weighting = sum_t L_t, all weights 1), so every
method's weights are comparable; ``weights`` are what the step logs as ``train/weight/<task>``.
State is a dict of float32 arrays (checkpointed with the TrainState).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol, Union

import jax
import jax.numpy as jnp

from mtl_jax.data.heldout import HeldOut
from mtl_jax.errors import UserError
from mtl_jax.registry import Registry


class WeightedLoss(NamedTuple):
    total: jax.Array  # scalar, differentiable in the task losses
    state: dict  # the new weighting state
    weights: jax.Array  # [T], logged as train/weight/<task>


class WeightedGrads(NamedTuple):
    grads: list  # one combined gradient per trainable leaf
    state: dict
    weights: jax.Array  # [T]


class CombineLosses(Protocol):
    def __call__(self, losses, counts, state, rng) -> WeightedLoss: ...


class CombineGrads(Protocol):
    def __call__(self, task_grads: "TaskGrads", losses, counts, state,
                 rng) -> WeightedGrads: ...


@dataclasses.dataclass(frozen=True)
class LossWeighting:
    init: Callable[[int, Any], dict]  # (num_tasks, config) -> state
    make_combine_losses: Callable[[Any, tuple], CombineLosses]  # (config, task_names)
    uses_task_grads = False
    uses_layer_grads = False


@dataclasses.dataclass(frozen=True)
class GradientWeighting:
    init: Callable[[int, Any], dict]
    make_combine_grads: Callable[[Any, tuple], CombineGrads]
    uses_layer_grads: bool = False  # reads TaskGrads.layer_sq_norms (the last shared layer)
    uses_task_grads = True


@dataclasses.dataclass(frozen=True)
class MetaWeighting:
    """Task weights learned from held-out data by a look-ahead (see ``_meta_*`` below).

    The step (``step.meta_lookahead``) computes ``d M / d w``, M the held-out loss after
    one virtual SGD step on the weighted train loss, and ``make_update(config)(state, dM_dw,
    present)`` moves the weights' parameters; ``heldout(config)`` says where the held-out
    batches come from (``data.heldout.HeldOut``: the loop asks the iterator for them).
    """

    init: Callable[[int, Any], dict]
    weights: Callable[[dict], jax.Array]  # state -> [T] weights of this step
    make_update: Callable[[Any], Callable]  # config -> update(state, dM_dw, present) -> state
    heldout: Callable[[Any], HeldOut]
    uses_task_grads = False
    uses_layer_grads = False


Weighting = Union[LossWeighting, GradientWeighting, MetaWeighting]

WEIGHTINGS: Registry[Weighting] = Registry("weighting")


def _present(counts):
    return counts > 0


def _sg(x):
    return jax.lax.stop_gradient(x)


def _weighted_total(weights, losses):
    return jnp.sum(_sg(weights) * losses)


# --- loss weightings ---------------------------------------------------------------------------

def _no_state(num_tasks, config):
    del num_tasks, config
    return {}


def _equal_combine(config, names):
    del config, names

    def combine(losses, counts, state, rng):
        weights = jnp.ones_like(losses)
        return WeightedLoss(_weighted_total(weights, losses), state, weights)
    return combine


def _static_combine(config, names):
    given = dict(config.weighting.static_weights)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UserError(f"weighting.static_weights names unknown tasks {unknown}; "
                        f"the run's tasks are {list(names)}")
    fixed = jnp.asarray([float(given.get(n, 1.0)) for n in names], jnp.float32)

    def combine(losses, counts, state, rng):
        return WeightedLoss(_weighted_total(fixed, losses), state, fixed)
    return combine


def _uncertainty_init(num_tasks, config):
    return {"log_var": jnp.zeros([num_tasks], jnp.float32)}


def _uncertainty_combine(config, names):
    """Kendall et al. 2018: sum_t exp(-s_t) L_t + s_t with s_t = log sigma_t^2.

    The s_t are not optimizer parameters: each step takes its own SGD step on them
    (``weighting.uncertainty_lr``) with the analytic gradient d/ds_t = 1 - exp(-s_t) L_t, only
    for tasks present in the batch. The model sees the weights exp(-s_t) of *this* step.
    """
    lr = float(config.weighting.uncertainty_lr)

    def combine(losses, counts, state, rng):
        s = state["log_var"]
        present = _present(counts)
        weights = jnp.exp(-s)
        total = _weighted_total(weights, losses) + jnp.sum(jnp.where(present, s, 0.0))
        grad_s = jnp.where(present, 1.0 - weights * _sg(losses), 0.0)
        return WeightedLoss(total, {"log_var": s - lr * grad_s}, weights)
    return combine


def _dwa_init(num_tasks, config):
    return {"last": jnp.ones([num_tasks], jnp.float32), "prev": jnp.ones([num_tasks], jnp.float32),
            "seen": jnp.zeros([num_tasks], jnp.float32)}


def _dwa_combine(config, names):
    """Liu et al. 2019: w_t = T softmax_t(r_t / temp), r_t = L_t(k-1) / L_t(k-2).

    Uses each task's last two *observed* losses (steps where it had examples); weights are 1
    until a task has two observations.
    """
    temp = float(config.weighting.dwa_temperature)

    def combine(losses, counts, state, rng):
        num_tasks = losses.shape[0]
        ready = state["seen"] >= 2
        ratio = jnp.where(ready, state["last"] / jnp.maximum(state["prev"], 1e-12), 1.0)
        weights = num_tasks * jax.nn.softmax(ratio / temp)
        present = _present(counts)
        new = {"prev": jnp.where(present, state["last"], state["prev"]),
               "last": jnp.where(present, _sg(losses), state["last"]),
               "seen": jnp.minimum(state["seen"] + present, 2.0)}
        return WeightedLoss(_weighted_total(weights, losses), new, weights)
    return combine


WEIGHTINGS.register("equal", LossWeighting(_no_state, _equal_combine))
WEIGHTINGS.register("static", LossWeighting(_no_state, _static_combine))
WEIGHTINGS.register("uncertainty", LossWeighting(_uncertainty_init, _uncertainty_combine))
WEIGHTINGS.register("dwa", LossWeighting(_dwa_init, _dwa_combine))


# --- per-task gradients ------------------------------------------------------------------------

def leaf_gram(g: jax.Array) -> jax.Array:
    """G G^T (float32 [T, T]) of one leaf [T, ...].

    For few tasks, T(T+1)/2 fused multiply-reduce passes beat a [T, N] x [N, T] matmul (N is
    millions for an embedding table) by 2-3x on CPU; many tasks use the matmul.
    """
    T = g.shape[0]
    flat = g.reshape(T, -1).astype(jnp.float32)
    if T > 4:
        return flat @ flat.T
    rows = [[None] * T for _ in range(T)]
    for i in range(T):
        for j in range(i, T):
            rows[i][j] = rows[j][i] = jnp.vdot(flat[i], flat[j])
    return jnp.stack([jnp.stack(r) for r in rows])


def plain_gram(grads: list) -> jax.Array:
    """sum over leaves of G_leaf G_leaf^T for leaves [T, ...]."""
    return sum(leaf_gram(g) for g in grads)


@dataclasses.dataclass
class TaskGrads:
    """Per-task gradients of the trainable leaves, each [T, ...], split into shared/specific.

    ``gram_fn`` computes sum_leaf G G^T (the jit path passes a shard_map version that reduces
    per-device partial Gram matrices instead of gathering the gradients).
    """

    leaves: list  # [T, ...] per trainable leaf
    shared: list  # bool per leaf: surgery applies
    layer: list  # bool per leaf: GradNorm's "last shared layer"
    gram_fn: Callable[[list, list], jax.Array] = None

    def _gram(self, mask) -> jax.Array:
        idx = [i for i, m in enumerate(mask) if m]
        T = self.num_tasks
        if not idx:
            return jnp.zeros([T, T], jnp.float32)
        if self.gram_fn is None:
            return plain_gram([self.leaves[i] for i in idx])
        return self.gram_fn([self.leaves[i] for i in idx], idx)

    @property
    def num_tasks(self) -> int:
        return self.leaves[0].shape[0]

    def gram(self) -> jax.Array:
        return self._gram(self.shared)

    def layer_sq_norms(self) -> jax.Array:
        return jnp.diagonal(self._gram(self.layer))

    def mix(self, shared_coeffs, specific_coeffs) -> list:
        """sum_t c_t g_t per leaf, with the shared or the task-specific coefficients."""
        return [jnp.tensordot(shared_coeffs if s else specific_coeffs, g, axes=1).astype(g.dtype)
                for g, s in zip(self.leaves, self.shared)]


def pcgrad_coeffs(gram: jax.Array, rng) -> jax.Array:
    """PCGrad (Yu et al. 2020) in Gram space: returns a with sum_i g_i' = sum_j a_j g_j.

    Each g_i is projected, in a random order of the tasks (its own permutation from ``rng``),
    onto the normal plane of every original g_j it conflicts with (g_i' . g_j < 0). Every g_i'
    stays a combination c_i of the original g's, and g_i' . g_j = c_i . gram[:, j].
    """
    T = gram.shape[0]
    eye = jnp.eye(T, dtype=gram.dtype)

    def project_one(i, key):
        order = jax.random.permutation(key, T)

        def body(k, c):
            j = order[k]
            dot = c @ gram[:, j]
            sq = gram[j, j]
            coef = jnp.where((dot < 0) & (sq > 0), dot / jnp.where(sq > 0, sq, 1.0), 0.0)
            return c - coef * eye[j]
        return jax.lax.fori_loop(0, T, body, eye[i])

    coeffs = jax.vmap(project_one)(jnp.arange(T), jax.random.split(rng, T))
    return coeffs.sum(0)


def _project_simplex(v):
    """Euclidean projection onto {w >= 0, sum w = 1} (sort-based, Duchi et al. 2008)."""
    n = v.shape[0]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    idx = jnp.arange(1, n + 1, dtype=v.dtype)
    rho = jnp.sum(u - css / idx > 0)
    theta = css[rho - 1] / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def cagrad_coeffs(gram: jax.Array, c: float, steps: int) -> jax.Array:
    """CAGrad (Liu et al. 2021), returned as coefficients a with d = sum_j a_j g_j.

    Solves min_{w in simplex} w^T G b + sqrt(phi) ||g_w|| (b = 1/T, phi = c^2 ||g_0||^2) on the
    scale-free Gram matrix (||g_0|| = 1) by accelerated projected gradient (FISTA) with the
    local step 1 / (||G|| (1 + c / ||g_w||)); then d = g_0 + sqrt(phi)/||g_w|| g_w, rescaled by
    1/(1+c^2) as in the authors' code, and multiplied by T so that c = 0 is the equal weighting
    (sum of task gradients).
    """
    T = gram.shape[0]
    A = gram / jnp.maximum(jnp.mean(gram), 1e-20)
    b = jnp.full([T], 1.0 / T, gram.dtype)
    Ab = A @ b
    top = jnp.maximum(jnp.linalg.eigvalsh(A)[-1], 1e-12)

    def objective(w):
        return w @ Ab + c * jnp.sqrt(jnp.maximum(w @ A @ w, 1e-12))

    def body(k, carry):
        w, y, t = carry
        lr = 1.0 / (top * (1.0 + c / jnp.sqrt(jnp.maximum(y @ A @ y, 1e-6))))
        w_next = _project_simplex(y - lr * jax.grad(objective)(y))
        t_next = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
        return w_next, w_next + ((t - 1.0) / t_next) * (w_next - w), t_next

    w, _, _ = jax.lax.fori_loop(0, steps, body, (b, b, jnp.ones([], gram.dtype)))
    gw_norm = jnp.sqrt(jnp.maximum(w @ A @ w, 0.0))
    lam = c / (gw_norm + 1e-8)
    return T * (b + lam * w) / (1.0 + c ** 2)


def _pcgrad_combine(config, names):
    del config, names

    def combine(task_grads: TaskGrads, losses, counts, state, rng):
        coeffs = pcgrad_coeffs(task_grads.gram(), rng)
        ones = jnp.ones_like(coeffs)
        return WeightedGrads(task_grads.mix(coeffs, ones), state, coeffs)
    return combine


def _cagrad_combine(config, names):
    c = float(config.weighting.cagrad_c)
    steps = int(config.weighting.cagrad_steps)

    def combine(task_grads: TaskGrads, losses, counts, state, rng):
        coeffs = cagrad_coeffs(task_grads.gram(), c, steps)
        return WeightedGrads(task_grads.mix(coeffs, jnp.ones_like(coeffs)), state, coeffs)
    return combine


def _gradnorm_init(num_tasks, config):
    return {"weights": jnp.ones([num_tasks], jnp.float32),
            "initial_loss": jnp.zeros([num_tasks], jnp.float32)}


def gradnorm_update(weights, layer_norms, losses, initial_loss, alpha, lr):
    """One GradNorm (Chen et al. 2018) step on the task weights.

    G_t = w_t ||grad_W L_t||, target_t = mean(G) r_t^alpha with r_t = (L_t/L_t(0)) / mean(...)
    (held constant); d/dw_t sum |G - target| = sign(G_t - target_t) ||grad_W L_t||; then an SGD
    step, clamp to positive and renormalise to sum T.
    """
    T = weights.shape[0]
    G = weights * layer_norms
    ratio = losses / jnp.maximum(initial_loss, 1e-12)
    rel = ratio / jnp.maximum(jnp.mean(ratio), 1e-12)
    target = jnp.mean(G) * rel ** alpha
    grad_w = jnp.sign(G - target) * layer_norms
    new = jnp.maximum(weights - lr * grad_w, 1e-6)
    return T * new / jnp.sum(new)


def _gradnorm_combine(config, names):
    alpha = float(config.weighting.gradnorm_alpha)
    lr = float(config.weighting.gradnorm_lr)

    def combine(task_grads: TaskGrads, losses, counts, state, rng):
        weights = state["weights"]
        losses = _sg(losses)
        first = (state["initial_loss"] <= 0) & _present(counts)
        initial = jnp.where(first, losses, state["initial_loss"])
        norms = jnp.sqrt(jnp.maximum(task_grads.layer_sq_norms(), 0.0))
        new_w = gradnorm_update(weights, norms, losses, initial, alpha, lr)
        new_w = jnp.where(jnp.all(_present(counts)), new_w, weights)
        grads = task_grads.mix(weights, weights)
        return WeightedGrads(grads, {"weights": new_w, "initial_loss": initial},
                             weights)
    return combine


WEIGHTINGS.register("pcgrad", GradientWeighting(_no_state, _pcgrad_combine))
WEIGHTINGS.register("cagrad", GradientWeighting(_no_state, _cagrad_combine))
WEIGHTINGS.register("gradnorm", GradientWeighting(_gradnorm_init, _gradnorm_combine,
                                                  uses_layer_grads=True))


# --- meta-learned weights ----------------------------------------------------------------------

def _meta_init(num_tasks, config):
    del config
    zeros = jnp.zeros([num_tasks], jnp.float32)
    return {"logits": zeros, "adam_m": zeros, "adam_v": zeros,
            "count": jnp.zeros([], jnp.float32)}


def meta_weights(state) -> jax.Array:
    """w = T softmax(logits): positive, summing to T (all 1 at the start, as ``equal``)."""
    logits = state["logits"]
    return logits.shape[0] * jax.nn.softmax(logits)


def _meta_update(config):
    """Adam (Kingma & Ba 2015, bias-corrected) on the logits with the chain rule through the
    softmax: the held-out gradient's scale is that of lr x <grad, grad>, which varies by orders
    of magnitude between models; Adam makes ``weighting.meta_lr`` the step size of the logits."""
    lr = float(config.weighting.meta_lr)
    b1, b2, eps = 0.9, 0.999, 1e-8

    def update(state, d_meta_d_weights, present):
        # Every logit moves, absent tasks' too: dM/dw is 0 for a task absent from the batch
        # (its train loss is 0), but the softmax couples the logits, and dM/dlogits is the true
        # gradient of M. Masking it to present tasks would follow another objective.
        del present
        _, pullback = jax.vjp(meta_weights, state)
        grad = pullback(d_meta_d_weights)[0]["logits"]
        count = state["count"] + 1.0
        m = b1 * state["adam_m"] + (1 - b1) * grad
        v = b2 * state["adam_v"] + (1 - b2) * grad * grad
        step = lr * (m / (1 - b1 ** count)) / (jnp.sqrt(v / (1 - b2 ** count)) + eps)
        return {"logits": state["logits"] - step, "adam_m": m, "adam_v": v, "count": count}
    return update


def _meta_heldout(config) -> HeldOut:
    w = config.weighting
    return HeldOut(split=w.meta_split, fraction=float(w.meta_holdout),
                   batch_size=int(w.meta_batch_size or config.train.batch_size))


WEIGHTINGS.register("meta", MetaWeighting(_meta_init, meta_weights, _meta_update,
                                          _meta_heldout))


def heldout_of(config) -> HeldOut | None:
    """Where the run's held-out batches come from; None when its weighting needs none."""
    weighting = get(config)
    return weighting.heldout(config) if isinstance(weighting, MetaWeighting) else None


def get(config) -> Weighting:
    return WEIGHTINGS.get(config.weighting.name)
