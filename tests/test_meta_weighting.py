"""weighting.name=meta: the look-ahead meta-gradient against finite differences and against
second-order autodiff, the step's update against a hand-built reference, held-out batches that
never train, resumable, and the configuration checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config
from mtl_jax.data.heldout import HeldOut, split_prefixed
from mtl_jax.errors import UserError
from mtl_jax.training import parallel, sharding, state as state_lib, step as step_lib
from mtl_jax.training import validate, weighting as weighting_lib
from toy_mtl_model import ToyModel, make_batch

ETA = 0.5  # a large virtual step: M must move well above float32 noise for the differences


def _prefixed(batch):
    return {f"meta/{k}": v for k, v in batch.items()}


def _setup(penalty=1e-2):
    model = ToyModel(penalty=penalty)
    params = model.init_params(jax.random.PRNGKey(0))
    loss_fn = step_lib.make_loss_fn(model)
    split = step_lib.Split.of(params, jax.tree.map(lambda _: True, params))
    train, held = make_batch(0), make_batch(1)
    forward = lambda ls: loss_fn(split.merge(params, ls), train, None, False)  # noqa: E731
    held_forward = lambda ls: loss_fn(split.merge(params, ls), held, None, False)  # noqa: E731
    return model, params, split, train, held, forward, held_forward


def _held_loss_after_virtual_step(logits, params, split, forward, held_forward):
    """M(logits) written out directly: the virtual step by jax.grad of the weighted loss."""
    leaves = split.take(params)
    weights = weighting_lib.meta_weights({"logits": logits})

    def weighted(ls):
        out = forward(ls)
        return jnp.sum(weights * out.losses) + out.penalty
    grads = jax.grad(weighted)(leaves)
    virtual = [x - ETA * g for x, g in zip(leaves, grads)]
    return jnp.sum(held_forward(virtual).losses)


def _meta_gradient_wrt_logits(logits, params, split, forward, held_forward):
    weights, pullback = jax.vjp(lambda lg: weighting_lib.meta_weights({"logits": lg}), logits)
    look = step_lib.meta_lookahead(forward, held_forward, split.take(params), weights, ETA)
    return pullback(look.d_meta_d_weights)[0], look


def test_meta_gradient_equals_finite_differences_and_second_order_autodiff():
    _, params, split, _, _, forward, held_forward = _setup()
    logits = jnp.asarray([0.3, -0.2], jnp.float32)
    got, look = _meta_gradient_wrt_logits(logits, params, split, forward, held_forward)
    m = lambda lg: _held_loss_after_virtual_step(lg, params, split, forward,  # noqa: E731
                                                 held_forward)
    eps = 1e-2
    fd = np.array([(m(logits.at[t].add(eps)) - m(logits.at[t].add(-eps))) / (2 * eps)
                   for t in range(2)])
    assert np.abs(fd).max() > 1e-3  # the weights really move M: the comparison means something
    np.testing.assert_allclose(np.asarray(got), fd, rtol=2e-2, atol=1e-5)
    # Exact reference: reverse-over-reverse autodiff through the virtual step.
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(m)(logits)), rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(float(look.heldout_loss), float(m(logits)), rtol=1e-5)


def test_meta_lookahead_weighted_gradient_is_the_weighted_loss_gradient():
    _, params, split, _, _, forward, held_forward = _setup()
    weights = jnp.asarray([0.7, 1.3])
    look = step_lib.meta_lookahead(forward, held_forward, split.take(params), weights, ETA)
    other = jnp.asarray([1.5, 0.5])
    want = jax.grad(lambda ls: jnp.sum(other * forward(ls).losses) + forward(ls).penalty)(
        split.take(params))
    for a, b in zip(look.grad_of(other), want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _config(lr=1e-2, **weighting):
    c = get_base_config()
    c.weighting.name = "meta"
    c.weighting.update(dict(meta_lr=0.1, meta_virtual_lr=ETA, **weighting))
    c.data.batch_mode = "mixed"
    c.optim.update(dict(name="sgd", lr=lr, b1=0.0, warmup_fraction=0.0, schedule="constant",
                        clip_norm=0.0, weight_decay=0.0))
    return c


def _adam_step(logits_grad, lr):
    """Adam's first bias-corrected step: lr * g / (|g| + eps) = lr * sign(g)."""
    return lr * logits_grad / (np.abs(logits_grad) + 1e-8)


def test_step_updates_weights_then_trains_on_the_updated_weights():
    model, params, split, train, held, forward, held_forward = _setup()
    c = _config()
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    abstract = state_lib.abstract_train_state(model, params, c, total_steps=10)
    strategy = parallel.build(model, c, mesh, abstract)
    state = strategy.init_state(params)
    batch = dict(train, **_prefixed(held))
    new, metrics = strategy.train_step(state, strategy.place_batch(batch),
                                       strategy.place_rng(jax.random.PRNGKey(0)))
    # Reference: the meta-gradient at logits 0, one Adam step, then SGD on the reweighted loss.
    grad, _ = _meta_gradient_wrt_logits(jnp.zeros(2), params, split, forward, held_forward)
    logits = -_adam_step(np.asarray(grad), 0.1)
    np.testing.assert_allclose(np.asarray(new.weighting_state["logits"]), logits, rtol=1e-5)
    weights = 2 * np.exp(logits) / np.exp(logits).sum()
    for t, name in enumerate(("t0", "t1")):
        np.testing.assert_allclose(float(metrics[f"train/weight/{name}"]), weights[t], rtol=1e-5)
    assert abs(weights[0] - 1) > 0.05  # the weights moved
    want = jax.tree.map(lambda p, g: p - 1e-2 * g, params, jax.grad(
        lambda p: jnp.sum(weights * model.task_losses(p, train)[0])
        + model.task_losses(p, train)[2]["soft_penalty"])(params))
    for a, b in zip(jax.tree.leaves(strategy.saved(new).params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_pmap_and_data_parallel_match_one_device():
    model, params, *_ = _setup()
    batches = [dict(make_batch(i), **_prefixed(make_batch(100 + i))) for i in range(2)]

    def run(c, devices=None):
        mesh = sharding.make_mesh(c, devices)
        abstract = state_lib.abstract_train_state(model, params, c, total_steps=10)
        strategy = parallel.build(model, c, mesh, abstract)
        state, rng = strategy.init_state(params), strategy.place_rng(jax.random.PRNGKey(0))
        for b in batches:
            state, m = strategy.train_step(state, strategy.place_batch(b), rng)
        saved = strategy.saved(state)
        return saved.params, saved.weighting_state["logits"], m

    ref_p, ref_w, ref_m = run(_config(), jax.devices()[:1])
    for mode in ("jit", "pmap"):
        c = _config()
        c.parallel.mode = mode
        c.parallel.mesh.data = -1
        p, w, m = run(c)
        np.testing.assert_allclose(np.asarray(w), np.asarray(ref_w), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(m["train/loss"]), float(ref_m["train/loss"]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_step_without_heldout_rows_is_one_line():
    model, params, *_ = _setup()
    c = _config()
    body = step_lib.make_train_step(model, c)
    state = state_lib.create_train_state(model, params, c, 10)
    with pytest.raises(UserError, match="held-out rows"):
        body(state, make_batch(0), jax.random.PRNGKey(0))


@pytest.mark.parametrize("split, fraction, size, message", [
    ("validation", 0.1, 32, "evaluation split"),
    ("test", 0.1, 32, "evaluation split"),
    ("train", 0.0, 32, "meta_holdout"),
    ("train", 0.1, 1, "at least one held-out row"),
    ("train", 0.1, 3, "multiple of the 2 tasks"),
    ("dev", 0.1, 4, "task a has no data.dev"),
])
def test_config_checks(split, fraction, size, message):
    c = _config(meta_split=split, meta_holdout=fraction, meta_batch_size=size)
    c.tasks = {"a": {"data": {"train": "x"}}, "b": {"data": {"train": "x", "dev": "y"}}}
    with pytest.raises(UserError, match=message):
        validate.check_config(c)


def test_heldout_of_only_for_meta():
    c = get_base_config()
    assert weighting_lib.heldout_of(c) is None
    c.weighting.name = "meta"
    c.train.batch_size = 24
    assert weighting_lib.heldout_of(c) == HeldOut("train", 0.1, 24)


def test_split_prefixed():
    train, held = split_prefixed({"input_ids": 1, "meta/input_ids": 2, "meta/weight": 3})
    assert train == {"input_ids": 1} and held == {"input_ids": 2, "weight": 3}


# --- held-out batches from the train split --------------------------------------------------

def _rows_of(batch, prefix=""):
    """The token sequences of a batch's real rows (weight > 0), as tuples."""
    ids, mask, weight = (batch[prefix + k] for k in ("input_ids", "attention_mask", "weight"))
    ids, mask, weight = (x.reshape((-1,) + x.shape[2:]) if weight.ndim == 2 else x
                         for x in (ids, mask, weight))
    return [tuple(r[m > 0]) for r, m, w in zip(ids, mask, weight) if w > 0]


def _heldout_run(tmp_path, minilm_path, mode="homogeneous"):
    import transformers

    from data_helpers import base_config, write_jsonl
    from mtl_jax.data.pipeline import build_data
    from mtl_jax.tasks.definitions import task_definition

    config = base_config(tmp_path, batch_mode=mode, buckets=(16, 32))
    for name in ("a", "b"):  # every sentence unique ("item i"), so rows identify examples
        rows = [dict(sentence=f"{name} item {i} sat on the mat", label=i % 2) for i in range(40)]
        config.tasks[name] = task_definition(
            "sequence_classification", text_fields=("sentence",), label_names=("n", "p"),
            max_length=16, data=dict(train=write_jsonl(tmp_path / f"{name}.jsonl", rows)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    return build_data(config, tokenizer, splits=("train",))


@pytest.mark.parametrize("mode", ["homogeneous", "stacked"])
def test_heldout_rows_never_train_and_resume(tmp_path, minilm_path, mode):
    data = _heldout_run(tmp_path, minilm_path, mode)
    heldout = HeldOut("train", 0.25, 4)
    make = lambda: data.train_iterator(4, seed=3, process_index=0, process_count=1,  # noqa: E731
                                       heldout=heldout)
    it = make()
    batches = [next(it) for _ in range(60)]  # several epochs of both tasks
    train_rows = {r for b in batches for r in _rows_of(b)}
    held_rows = {r for b in batches for r in _rows_of(b, "meta/")}
    assert len(held_rows) == 2 * 10  # 25 % of each task's 40 examples, every one drawn
    assert len(train_rows) == 2 * 30 and not train_rows & held_rows
    for b in batches:  # an equal share of every task in each held-out batch
        ids = b["meta/task_id"]
        assert sorted(ids.reshape(-1).tolist()) == [0, 0, 1, 1]
    again = make()  # deterministic
    for want in batches[:5]:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    paused = make()
    for _ in range(23):
        next(paused)
    resumed = make()
    resumed.set_state(paused.get_state())
    for want in batches[23:30]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_heldout_state_missing_on_resume_is_one_line(tmp_path, minilm_path):
    data = _heldout_run(tmp_path, minilm_path)
    plain = data.train_iterator(4, seed=3, process_index=0, process_count=1)
    with_heldout = data.train_iterator(4, seed=3, process_index=0, process_count=1,
                                       heldout=HeldOut("train", 0.25, 4))
    with pytest.raises(UserError, match="no held-out stream"):
        with_heldout.set_state(plain.get_state())


def test_meta_every_updates_only_on_its_steps():
    """meta_every=2: step 0 moves the weights; step 1 keeps them and is the plain weighted SGD
    step under them."""
    model, params, *_ = _setup()
    c = _config(meta_every=2)
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    abstract = state_lib.abstract_train_state(model, params, c, total_steps=10)
    strategy = parallel.build(model, c, mesh, abstract)
    state, rng = strategy.init_state(params), strategy.place_rng(jax.random.PRNGKey(0))
    batches = [dict(make_batch(i), **_prefixed(make_batch(100 + i))) for i in range(2)]
    state, _ = strategy.train_step(state, strategy.place_batch(batches[0]), rng)
    logits = np.asarray(state.weighting_state["logits"])
    assert np.abs(logits).max() > 0.05
    before = jax.tree.map(np.asarray, strategy.saved(state).params)  # the step donates state
    state, metrics = strategy.train_step(state, strategy.place_batch(batches[1]), rng)
    np.testing.assert_array_equal(np.asarray(state.weighting_state["logits"]), logits)
    weights = 2 * np.exp(logits) / np.exp(logits).sum()
    train = make_batch(1)
    want = jax.tree.map(lambda p, g: p - 1e-2 * g, before, jax.grad(
        lambda p: jnp.sum(weights * model.task_losses(p, train)[0])
        + model.task_losses(p, train)[2]["soft_penalty"])(before))
    for a, b in zip(jax.tree.leaves(strategy.saved(state).params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["train/weight/t0"]), weights[0], rtol=1e-6)


def test_heldout_from_another_split_trains_on_all_of_train(tmp_path, minilm_path):
    """meta_split=dev: held-out rows come from each task's dev file, every train example trains,
    and the held-out rows are at the longest bucket (one compile per train bucket)."""
    import transformers

    from data_helpers import base_config, write_jsonl
    from mtl_jax.data.pipeline import build_data
    from mtl_jax.tasks.definitions import task_definition

    config = base_config(tmp_path, buckets=(16, 32))
    for name in ("a", "b"):
        rows = [dict(sentence=f"{name} item {i} sat", label=i % 2) for i in range(12)]
        dev = [dict(sentence=f"{name} dev {i} sat", label=i % 2) for i in range(6)]
        config.tasks[name] = task_definition(
            "sequence_classification", text_fields=("sentence",), label_names=("n", "p"),
            max_length=16, data=dict(train=write_jsonl(tmp_path / f"{name}.jsonl", rows),
                                     dev=write_jsonl(tmp_path / f"{name}_dev.jsonl", dev)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    data = build_data(config, tokenizer, splits=("train", "dev"))
    it = data.train_iterator(4, seed=0, process_index=0, process_count=1,
                             heldout=HeldOut("dev", 0.0, 4))
    batches = [next(it) for _ in range(30)]
    assert len({r for b in batches for r in _rows_of(b)}) == 24  # all train rows
    held = {r for b in batches for r in _rows_of(b, "meta/")}
    assert len(held) == 12 and not held & {r for b in batches for r in _rows_of(b)}
    assert {b["meta/input_ids"].shape[1] for b in batches} == {32}
