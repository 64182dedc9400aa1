"""Parameter groups, schedules, clipping, accumulation: updates checked against NumPy by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.base import get_base_config
from mtl_jax.errors import UserError
from mtl_jax.training import optim
from toy_mtl_model import ToyModel


def _setup(**groups):
    c = get_base_config()
    c.optim.warmup_fraction = 0.0
    c.optim.schedule = "constant"
    c.optim.clip_norm = 0.0
    for name, rule in groups.items():
        c.optim.groups[name] = rule
    m = ToyModel()
    params = m.init_params(jax.random.PRNGKey(0))
    return c, m, params


def _np_adamw(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW (decoupled decay) for a list of gradients, by hand."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    p = p.astype(np.float64)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p)
    return p


def test_default_groups():
    c, m, params = _setup()
    opt = optim.build_optimizer(c, params, m.param_labels(params), 100)
    assert set(jax.tree.leaves(opt.group_of)) == {"all"}
    c.peft.kind = "lora"
    opt = optim.build_optimizer(c, params, m.param_labels(params), 100)
    assert opt.group_of["encoder"]["layers_0"]["kernel"] == "frozen"
    assert opt.group_of["embeddings"]["word_embeddings"] == "frozen"
    assert opt.group_of["heads"]["t0"]["kernel"] == "trainable"
    assert opt.main_group == "trainable"


def test_unmatched_and_doubly_matched_named_in_one_error():
    c, m, params = _setup(enc=dict(labels="encoder"), heads=dict(match="^heads/"),
                          kern=dict(match="layers_1/kernel"))
    with pytest.raises(UserError) as e:
        optim.build_optimizer(c, params, m.param_labels(params), 10)
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 parameter(s) match no group: embeddings/word_embeddings [embeddings]" in msg
    assert "1 match several: encoder/layers_1/kernel [encoder] -> enc+kern" in msg


def test_group_needs_a_selector_and_known_fields():
    c, m, params = _setup(bad=dict(lr=1.0))
    with pytest.raises(UserError, match="selects nothing"):
        optim.build_optimizer(c, params, m.param_labels(params), 10)
    c, m, params = _setup(bad=dict(match=".*", lrr=1.0))
    with pytest.raises(UserError, match="unknown fields"):
        optim.build_optimizer(c, params, m.param_labels(params), 10)


def test_each_group_own_lr_decay_mask_and_frozen_bit_identical():
    c, m, params = _setup(
        frozen=dict(labels="embeddings", frozen=True),
        encoder=dict(labels="encoder", lr=1e-2, weight_decay=0.1),
        heads=dict(labels="heads/.*", lr=1e-3, weight_decay=0.5))
    opt = optim.build_optimizer(c, params, m.param_labels(params), 100)
    state = opt.tx.init(params)
    rng = np.random.RandomState(0)
    grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
             for _ in range(2)]
    p = params
    for g in grads:
        updates, state = opt.tx.update(g, state, p)
        p = optax.apply_updates(p, updates)

    def expect(path, lr, wd):
        def get(tree):
            return tree[path[0]][path[1]][path[2]] if len(path) == 3 else tree[path[0]][path[1]]

        want = _np_adamw(np.asarray(get(params)), [np.asarray(get(g)) for g in grads], lr, wd)
        np.testing.assert_allclose(np.asarray(get(p)), want, rtol=1e-5, atol=5e-7)

    expect(("encoder", "layers_0", "kernel"), 1e-2, 0.1)
    expect(("encoder", "layers_0", "bias"), 1e-2, 0.0)  # bias: no decay
    expect(("encoder", "LayerNorm", "scale"), 1e-2, 0.0)  # norm scale: no decay
    expect(("heads", "t1", "kernel"), 1e-3, 0.5)
    expect(("heads", "t1", "bias"), 1e-3, 0.0)
    np.testing.assert_array_equal(np.asarray(p["embeddings"]["word_embeddings"]),
                                  np.asarray(params["embeddings"]["word_embeddings"]))


def test_global_norm_clipping_sgd():
    c, m, params = _setup()
    c.optim.name, c.optim.b1, c.optim.weight_decay, c.optim.lr = "sgd", 0.0, 0.0, 0.5
    c.optim.clip_norm = 1.0
    opt = optim.build_optimizer(c, params, m.param_labels(params), 10)
    g = jax.tree.map(lambda x: jnp.full(x.shape, 3.0), params)
    norm = np.sqrt(sum(9.0 * x.size for x in jax.tree.leaves(params)))
    updates, _ = opt.tx.update(g, opt.tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["heads"]["t0"]["bias"]),
                               -0.5 * 3.0 / norm * np.ones(3), rtol=1e-6)


@pytest.mark.parametrize("schedule, expected", [
    # total 100 updates, warmup 10: lr 1.0 peak
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 99: 1.0}),
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
    ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
])
def test_schedules(schedule, expected):
    c, m, params = _setup()
    c.optim.lr, c.optim.schedule, c.optim.warmup_fraction = 1.0, schedule, 0.1
    opt = optim.build_optimizer(c, params, m.param_labels(params), 100)
    for step, lr in expected.items():
        np.testing.assert_allclose(float(opt.learning_rates(step)["all"]), lr, atol=1e-6)
    if schedule == "cosine":  # step 32 after warmup 10: 22/90 of the way
        want = 0.5 * (1 + np.cos(np.pi * 22 / 90))
        np.testing.assert_allclose(float(opt.learning_rates(32)["all"]), want, rtol=1e-5)


def test_gradient_accumulation_multisteps():
    c, m, params = _setup()
    c.optim.accumulate_steps = 2
    c.optim.lr, c.optim.weight_decay = 1e-2, 0.0
    opt = optim.build_optimizer(c, params, m.param_labels(params), 100)
    assert float(opt.learning_rates(3)["all"]) == pytest.approx(1e-2)  # counts updates, not steps
    state = opt.tx.init(params)
    g1 = jax.tree.map(lambda x: jnp.full(x.shape, 1.0), params)
    g2 = jax.tree.map(lambda x: jnp.full(x.shape, -3.0), params)
    u1, state = opt.tx.update(g1, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(u1))
    u2, state = opt.tx.update(g2, state, params)
    p = optax.apply_updates(params, u2)
    want = _np_adamw(np.asarray(params["heads"]["t0"]["bias"]), [np.full(3, -1.0)], 1e-2, 0.0)
    np.testing.assert_allclose(np.asarray(p["heads"]["t0"]["bias"]), want, rtol=1e-5, atol=5e-7)
