"""Weighting and gradient surgery against NumPy/SciPy references on small hand cases."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from configs.base import get_base_config
from mtl_jax.errors import UserError
from mtl_jax.training import weighting as W

NAMES = ("a", "b")


def _combine(name, names=NAMES, **overrides):
    c = get_base_config()
    c.weighting.name = name
    for k, v in overrides.items():
        c.weighting[k] = v
    w = W.WEIGHTINGS.get(name)
    make = w.make_combine_grads if w.uses_task_grads else w.make_combine_losses
    return w, w.init(len(names), c), make(c, names)


def _task_grads(shared, specific=None):
    """TaskGrads with one shared leaf [T, D] and (optionally) one task-specific leaf."""
    leaves = [jnp.asarray(shared, jnp.float32)]
    flags = [True]
    if specific is not None:
        leaves.append(jnp.asarray(specific, jnp.float32))
        flags.append(False)
    return W.TaskGrads(leaves, shared=flags, layer=list(flags))


def np_pcgrad(grads, orders):
    """Yu et al.'s reference loop: each g_i projected against the original g_j in its order."""
    out = []
    for i, g in enumerate(grads):
        gi = g.astype(np.float64).copy()
        for j in orders[i]:
            d = gi @ grads[j]
            if d < 0:
                gi -= d / (grads[j] @ grads[j]) * grads[j]
        out.append(gi)
    return np.sum(out, 0)


def np_cagrad(grads, c):
    """The authors' CAGrad (scipy SLSQP on the dual), mean-gradient form, rescale=1."""
    T = len(grads)
    A = grads @ grads.T
    g0_norm = np.sqrt(A.mean() + 1e-8)
    b = np.ones(T) / T
    cc = c * g0_norm + 1e-8
    obj = lambda x: x @ A @ b + cc * np.sqrt(x @ A @ x + 1e-8)  # noqa: E731
    res = scipy.optimize.minimize(obj, b, bounds=[(0, 1)] * T, method="SLSQP",
                                  constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                                  options={"ftol": 1e-12})
    gw = res.x @ grads
    g = grads.mean(0) + cc / (np.linalg.norm(gw) + 1e-8) * gw
    return g / (1 + c ** 2)


def test_registry_names_and_unknown():
    assert W.WEIGHTINGS.names() == sorted(
        ["equal", "static", "uncertainty", "gradnorm", "dwa", "pcgrad", "cagrad", "meta"])
    with pytest.raises(UserError, match="valid weighting names"):
        W.WEIGHTINGS.get("gradnrom")


def test_equal_and_static():
    losses, counts = jnp.array([0.5, 2.0]), jnp.array([3.0, 1.0])
    _, s, combine = _combine("equal")
    total, _, w = combine(losses, counts, s, None)
    assert float(total) == pytest.approx(2.5)
    np.testing.assert_allclose(np.asarray(w), [1, 1])
    _, s, combine = _combine("static", static_weights={"b": 3.0})
    total, _, w = combine(losses, counts, s, None)
    assert float(total) == pytest.approx(0.5 + 6.0)
    np.testing.assert_allclose(np.asarray(w), [1.0, 3.0])
    with pytest.raises(UserError, match="unknown tasks"):
        _combine("static", static_weights={"c": 1.0})


def test_uncertainty_gradient_and_sgd_on_log_variances():
    _, s, combine = _combine("uncertainty", uncertainty_lr=0.1)
    s = {"log_var": jnp.array([0.0, np.log(2.0)], jnp.float32)}
    losses, counts = jnp.array([1.0, 3.0]), jnp.array([4.0, 4.0])
    (total, (new, w)), d_losses = jax.value_and_grad(
        lambda task_losses: (lambda t, st, ww: (t, (st, ww)))(
            *combine(task_losses, counts, s, None)),
        has_aux=True)(losses)
    # sum exp(-s) L + s = 1 + 1.5 + log 2
    assert float(total) == pytest.approx(2.5 + np.log(2.0), rel=1e-6)
    np.testing.assert_allclose(np.asarray(d_losses), [1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w), [1.0, 0.5], rtol=1e-6)
    # d/ds [exp(-s) L + s] by autodiff, independent of the analytic step in the code
    grad_s = jax.grad(lambda v: jnp.sum(jnp.exp(-v) * losses + v))(s["log_var"])
    np.testing.assert_allclose(np.asarray(grad_s), [0.0, -0.5], atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["log_var"]),
                               np.asarray(s["log_var"]) - 0.1 * np.asarray(grad_s), rtol=1e-6)
    # an absent task's s does not move
    _, new, _ = combine(losses, jnp.array([4.0, 0.0]), s, None)
    assert float(new["log_var"][1]) == pytest.approx(np.log(2.0))


def test_dwa_weights_from_last_two_losses():
    _, s, combine = _combine("dwa", dwa_temperature=2.0)
    history = [[1.0, 2.0], [0.5, 1.5], [0.4, 1.4]]
    weights = []
    for step_losses in history:
        _, s, w = combine(jnp.asarray(step_losses), jnp.array([1.0, 1.0]), s, None)
        weights.append(np.asarray(w))
    np.testing.assert_allclose(weights[0], [1, 1])
    np.testing.assert_allclose(weights[1], [1, 1])
    r = np.array([0.5 / 1.0, 1.5 / 2.0])
    want = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(weights[2], want, rtol=1e-6)
    # task b absent: its history is kept, so its ratio is unchanged next step
    _, s2, _ = combine(jnp.array([0.2, 0.0]), jnp.array([1.0, 0.0]), s, None)
    np.testing.assert_allclose(np.asarray(s2["last"]), [0.2, 1.4], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s2["prev"]), [0.4, 1.5], rtol=1e-6)


def test_pcgrad_conflicting_pair_by_hand():
    _, s, combine = _combine("pcgrad")
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    specific = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    grads, _, w = combine(_task_grads(g, specific), None, None, s, jax.random.PRNGKey(0))
    # g1' = g1 + 1/2 g2 = [.5, .5]; g2' = g2 + g1 = [0, 1]
    np.testing.assert_allclose(np.asarray(grads[0]), [0.5, 1.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[0]), np_pcgrad(g, [[0, 1], [0, 1]]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), [2.0, 0.0, 5.0])  # task-specific: plain sum
    np.testing.assert_allclose(np.asarray(w), [2.0, 1.5], rtol=1e-6)  # 2 g1 + 1.5 g2
    # no conflict: plain sum
    g = np.array([[1.0, 0.0], [1.0, 1.0]])
    grads, _, _ = combine(_task_grads(g), None, None, s, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(grads[0]), [2.0, 1.0])


def test_pcgrad_three_tasks_random_order_matches_reference():
    _, s, combine = _combine("pcgrad", names=("a", "b", "c"))
    g = np.random.RandomState(3).normal(size=(3, 5))
    g[2] = -0.8 * g[0] + 0.3 * g[1]  # conflicts with task 0
    perms = list(itertools.permutations(range(3)))
    candidates = [np_pcgrad(g, orders) for orders in itertools.product(perms, repeat=3)]
    seen = set()
    for seed in range(6):
        out, _, _ = combine(_task_grads(g), None, None, s, jax.random.PRNGKey(seed))
        dist = [np.abs(np.asarray(out[0]) - c).max() for c in candidates]
        assert min(dist) < 1e-5
        seen.add(np.round(np.asarray(out[0]), 4).tobytes())
    assert len(seen) > 1  # the order really depends on the step rng


@pytest.mark.parametrize("g, c", [
    (np.array([[1.0, 0.0], [-0.5, 1.0]]), 0.5),
    (np.array([[3.0, 1.0, 0.0], [-1.0, 0.5, 2.0], [0.5, -2.0, 1.0]]), 0.4),
    (np.random.RandomState(0).normal(size=(4, 6)), 0.8),
])
def test_cagrad_matches_scipy_reference(g, c):
    T = len(g)
    names = tuple("abcd"[:T])
    _, s, combine = _combine("cagrad", names=names, cagrad_c=c)
    out, _, _ = combine(_task_grads(g * 1e-3), None, None, s, None)  # scale-free solver
    want = T * np_cagrad(g, c) * 1e-3  # our convention: x T (c=0 -> sum of task gradients)
    np.testing.assert_allclose(np.asarray(out[0]), want, atol=2e-4 * np.abs(want).max())


def test_cagrad_c_zero_is_sum():
    _, s, combine = _combine("cagrad", names=("a", "b", "c"), cagrad_c=0.0)
    g = np.random.RandomState(1).normal(size=(3, 4))
    out, _, _ = combine(_task_grads(g), None, None, s, None)
    np.testing.assert_allclose(np.asarray(out[0]), g.sum(0), rtol=1e-5)


def test_gradnorm_weight_update_by_hand():
    _, s, combine = _combine("gradnorm", gradnorm_alpha=1.5, gradnorm_lr=0.1)
    s = {"weights": jnp.array([1.0, 1.0]), "initial_loss": jnp.array([1.0, 1.0])}
    g = np.array([[2.0, 0.0], [0.0, 1.0]])  # ||grad_W L_t|| = 2, 1
    grads, new, w = combine(_task_grads(g), jnp.array([0.5, 1.0]), jnp.array([2.0, 2.0]), s, None)
    # G = [2, 1]; r = [.5, 1]/.75; target = 1.5 r^1.5 = [0.816, 2.309]; sign(G - target) = [+, -]
    # dL/dw = [2, -1]; w = [1 - .2, 1 + .1] = [.8, 1.1] -> renormalised to sum 2
    np.testing.assert_allclose(np.asarray(new["weights"]), [1.6 / 1.9, 2.2 / 1.9], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w), [1.0, 1.0])  # this step used the old weights
    np.testing.assert_allclose(np.asarray(grads[0]), [2.0, 1.0])
    # next step: the model gradient uses the new weights
    grads, _, _ = combine(_task_grads(g), jnp.array([0.5, 1.0]), jnp.array([2.0, 2.0]), new, None)
    np.testing.assert_allclose(np.asarray(grads[0]), [2 * 1.6 / 1.9, 2.2 / 1.9], rtol=1e-6)


def test_gradnorm_records_initial_losses():
    _, s, combine = _combine("gradnorm")
    _, new, _ = combine(_task_grads(np.eye(2)), jnp.array([0.7, 0.3]), jnp.ones(2), s, None)
    np.testing.assert_allclose(np.asarray(new["initial_loss"]), [0.7, 0.3])
    # equal layer norms and rel = 1: G = target for both -> weights stay 1
    np.testing.assert_allclose(np.asarray(new["weights"]), [1.0, 1.0])


def test_simplex_projection():
    v = jnp.array([0.5, 2.0, -1.0])
    np.testing.assert_allclose(np.asarray(W._project_simplex(v)), [0.0, 1.0, 0.0])
    v = jnp.array([0.4, 0.3, 0.1])  # shift by (1 - 0.8)/3
    np.testing.assert_allclose(np.asarray(W._project_simplex(v)), [0.4 + 0.2 / 3, 0.3 + 0.2 / 3,
                                                                    0.1 + 0.2 / 3], rtol=1e-6)
