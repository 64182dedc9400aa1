"""Meta-learning trainers (train.algorithm reptile | fomaml): the math against hand computations
on quadratic tasks, the step through every parallel strategy, a tiny BERT with LoRA, the
episode iterator, and a kill -9 / resume that ends bit-identical."""
import json
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.base import get_base_config
from mtl_jax.data import batching
from mtl_jax.data.features import Features
from mtl_jax.data.iterator import TrainIterator
from mtl_jax.errors import UserError
from mtl_jax.tasks.spec import TaskSpec
from mtl_jax.training import meta_learning, parallel, sharding, trainers, validate
from mtl_jax.training import state as state_lib
from mtl_jax.training.metrics_window import HostWindow
from toy_mtl_model import ToyModel, make_batch

RNG = jax.random.PRNGKey(3)


# --- quadratic tasks: L_t(theta) = mean over rows of 0.5 ||theta + bias - target||^2 ----------

class QuadModel:
    """The MultiTaskModel contract for quadratic tasks; ``bias`` is a frozen parameter."""

    def __init__(self, num_tasks=3, dim=4):
        self.specs = [TaskSpec(f"q{t}", "sequence_regression", 1, t) for t in range(num_tasks)]
        self.dim = dim

    def init_params(self, rng):
        a, b = jax.random.split(rng)
        return {"theta": jax.random.normal(a, (self.dim,)),
                "bias": 0.5 * jax.random.normal(b, (self.dim,))}

    def param_labels(self, params):
        return {"theta": "encoder", "bias": "embeddings"}

    def task_losses(self, params, batch, rng=None, deterministic=False, homogeneous=None):
        residual = params["theta"] + params["bias"] - batch["target"]  # [b, D]
        per_row = 0.5 * jnp.sum(residual ** 2, -1)
        rows = (batch["task_id"][:, None] == jnp.arange(len(self.specs))) * \
            batch["weight"][:, None]  # [b, T]
        counts = rows.sum(0)
        losses = (per_row[:, None] * rows).sum(0) / jnp.maximum(counts, 1.0)
        return losses, counts, {"soft_penalty": jnp.zeros([])}


def _config(algorithm="reptile", tasks=2, steps=2, rows=8, inner_lr=0.1, eps=0.5, mode="jit",
            mesh=(1, 1, 1), **meta):
    """Exact Reptile/FOMAML outer rule: plain SGD, no momentum, decay, clipping or schedule."""
    c = get_base_config()
    c.train.algorithm = algorithm
    c.meta.update(dict(tasks_per_step=tasks, inner_steps=steps, inner_lr=inner_lr,
                       inner_batch_size=rows, **meta))
    c.optim.update(dict(name="sgd", lr=eps, b1=0.0, weight_decay=0.0, clip_norm=0.0,
                        schedule="constant", warmup_fraction=0.0))
    c.optim.groups.frozen = dict(labels="embeddings", frozen=True)
    c.optim.groups.rest = dict(labels="(?!embeddings$).*")
    c.parallel.mode = mode
    c.parallel.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
    return c


def quad_episode(seed, task_of_row, sub_batches, rows=8, dim=4):
    """An episode batch [K, S', b]: row k all task ``task_of_row[k]``, random targets."""
    r = np.random.RandomState(seed)
    k = len(task_of_row)
    centers = r.normal(size=(3, dim))
    target = centers[np.asarray(task_of_row)][:, None, None] + \
        0.3 * r.normal(size=(k, sub_batches, rows, dim))
    task_id = np.broadcast_to(np.asarray(task_of_row, np.int32)[:, None, None],
                              (k, sub_batches, rows)).copy()
    return {"task_id": task_id, "weight": np.ones(task_id.shape, np.float32),
            "target": target.astype(np.float32)}


def hand_step(theta, bias, batch, algorithm, inner_lr, steps, eps):
    """NumPy reference: S SGD inner steps per row, then the outer SGD step."""
    theta, bias = np.float64(theta), np.float64(bias)
    grads, logged = [], []
    for target in np.float64(batch["target"]):  # one task row [S', b, D]
        phi = theta.copy()
        for s in range(steps):
            residual = phi + bias - target[s]
            if s == 0:
                first_loss = 0.5 * (residual ** 2).sum(-1).mean()
            phi = phi - inner_lr * residual.mean(0)
        if algorithm == "reptile":
            grads.append(theta - phi)
            logged.append(first_loss)
        else:
            residual = phi + bias - target[steps]
            grads.append(residual.mean(0))
            logged.append(0.5 * (residual ** 2).sum(-1).mean())
    g = np.mean(grads, 0)
    return theta - eps * g, g, np.array(logged)


def _strategy(c, model, params, devices=None):
    abstract = state_lib.abstract_train_state(model, params, c, total_steps=10)
    return parallel.build(model, c, sharding.make_mesh(c, devices), abstract)


def _steps(c, model, batches, devices=None, params=None):
    """Runs ``batches`` through the strategy from ``params`` (default: the model's init with key
    0); -> (params as NumPy, metrics per step, strategy)."""
    params = model.init_params(jax.random.PRNGKey(0)) if params is None else params
    strategy = _strategy(c, model, params, devices)
    state, rng = strategy.init_state(params), strategy.place_rng(RNG)
    metrics = []
    for batch in batches:
        state, m = strategy.train_step(state, strategy.place_batch(batch), rng)
        metrics.append(jax.tree.map(np.asarray, m))
    return jax.tree.map(np.asarray, strategy.saved(state).params), metrics, strategy


# --- the pure functions -------------------------------------------------------------------------

def _quad_grad_fn(leaves, center, key):
    """grad_fn of 0.5 ||theta - c||^2 (``center``: the sub-batch)."""
    del key
    (theta,) = leaves
    return 0.5 * jnp.sum((theta - center) ** 2), [theta - center], ()


def test_reptile_closed_form_and_fixed_point_at_the_mean_of_task_optima():
    """phi after S SGD steps of lr a is c + (1-a)^S (theta - c); theta' - theta equals
    eps mean_k (phi_k - theta); repeated outer steps converge to the mean of the c_k."""
    a, steps, eps = 0.3, 3, 0.5
    centers = jnp.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]])
    theta = jnp.array([5.0, 5.0])
    episode = jnp.broadcast_to(centers[:, None], (3, steps, 2))
    keys = meta_learning.episode_keys(RNG, 3, steps)
    outer = jax.jit(lambda th: meta_learning.reptile(_quad_grad_fn, [th], episode, keys,
                                                     optax.sgd(a)))
    out = outer(theta)
    phi = centers + (1 - a) ** steps * (theta - centers)
    np.testing.assert_allclose(out.grads[0], np.mean(theta - phi, 0), rtol=1e-6)
    np.testing.assert_allclose(out.losses, 0.5 * np.sum((theta - centers) ** 2, -1), rtol=1e-6)
    tx = optax.sgd(eps)
    opt = tx.init([theta])
    for _ in range(100):
        updates, opt = tx.update(outer(theta).grads, opt)
        new = optax.apply_updates([theta], updates)[0]
        if _ == 0:
            np.testing.assert_allclose(new - theta, eps * np.mean(phi - theta, 0), rtol=1e-6)
        theta = new
    np.testing.assert_allclose(theta, centers.mean(0), atol=1e-5)


def test_fomaml_outer_gradient_is_the_query_gradient_at_the_adapted_parameters():
    a, steps = 0.2, 2
    support = jnp.array([[1.0, 2.0], [-3.0, 0.0]])
    query = jnp.array([[0.0, 1.0], [2.0, 2.0]])
    theta = jnp.array([0.5, -0.5])
    episode = jnp.concatenate([jnp.broadcast_to(support[:, None], (2, steps, 2)),
                               query[:, None]], axis=1)  # [K, S + 1, D]
    keys = meta_learning.episode_keys(RNG, 2, steps + 1)
    out = meta_learning.fomaml(_quad_grad_fn, [theta], episode, keys, optax.sgd(a))
    phi = support + (1 - a) ** steps * (theta - support)
    np.testing.assert_allclose(out.grads[0], np.mean(phi - query, 0), rtol=1e-6)
    np.testing.assert_allclose(out.losses, 0.5 * np.sum((phi - query) ** 2, -1), rtol=1e-5)


def test_inner_adam_steps_match_adam_by_hand():
    """Two inner Adam steps from a fresh state: m, v and the bias corrections by hand."""
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    c = get_base_config()
    c.meta.inner_optimizer, c.meta.inner_lr = "adam", lr
    center, theta = jnp.array([1.0, -2.0, 0.25]), jnp.array([0.0, 0.5, 3.0])
    adapted = meta_learning.adapt(_quad_grad_fn, [theta], jnp.stack([center, center]),
                                  meta_learning.episode_keys(RNG, 1, 2)[0],
                                  meta_learning.inner_optimizer(c))
    phi, m, v = np.float64(theta), 0.0, 0.0
    for t in (1, 2):
        g = phi - np.float64(center)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
        phi = phi - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        if t == 1:  # the first update is -lr * sign(g) (mhat = g, vhat = g^2)
            np.testing.assert_allclose(phi, theta - lr * np.sign(theta - center), rtol=1e-6)
    np.testing.assert_allclose(adapted.leaves[0], phi, rtol=1e-5)


# --- the step, through the parallel strategies --------------------------------------------------

@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
@pytest.mark.parametrize("layout", ["jit1", "jit8", "pmap8"])
def test_step_matches_hand_computation(algorithm, layout):
    """One outer step on quadratic tasks equals the NumPy reference on 1 device, a mesh of 8 and
    pmap over 8: params (the frozen leaf untouched) and every metric."""
    steps, a, eps = 2, 0.1, 0.5
    mode = "pmap" if layout.startswith("pmap") else "jit"
    c = _config(algorithm, tasks=3, steps=steps, inner_lr=a, eps=eps, mode=mode,
                mesh=(1, 1, 1) if layout == "jit1" else (-1, 1, 1))
    model = QuadModel()
    rows = [2, 0, 2]  # task 2 twice, task 1 not sampled
    batch = quad_episode(0, rows, steps + (algorithm == "fomaml"))
    params, (m,), _ = _steps(c, model, [batch],
                             devices=jax.devices()[:1] if layout == "jit1" else None)
    p0 = jax.tree.map(np.asarray, model.init_params(jax.random.PRNGKey(0)))
    want, g, logged = hand_step(p0["theta"], p0["bias"], batch, algorithm, a, steps, eps)
    np.testing.assert_allclose(params["theta"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params["bias"], p0["bias"])
    np.testing.assert_allclose(m["train/loss"], logged.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["train/loss/q2"], logged[[0, 2]].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["train/loss/q0"], logged[1], rtol=1e-5)
    np.testing.assert_allclose(m["train/grad_norm"], np.linalg.norm(g), rtol=1e-5)
    np.testing.assert_array_equal(m["train/present"], [True, False, True])
    np.testing.assert_allclose([m[f"train/weight/q{t}"] for t in range(3)], [1 / 3, 0, 2 / 3],
                               rtol=1e-6)
    assert float(m["train/lr"]) == pytest.approx(eps) and bool(m["train/finite"])
    assert float(m["train/soft_penalty"]) == 0.0


def test_nan_policy_skip_keeps_the_parameters():
    c = _config(tasks=2, steps=2)
    c.train.nan_policy = "skip"
    good = quad_episode(0, [0, 1], 2)
    bad = quad_episode(1, [0, 1], 2)
    bad["target"][1, 1] = np.nan  # the second inner step of task 1 goes NaN
    p1, _, _ = _steps(c, QuadModel(), [good], devices=jax.devices()[:1])
    p2, ms, _ = _steps(c, QuadModel(), [good, bad], devices=jax.devices()[:1])
    assert not bool(ms[-1]["train/finite"])
    np.testing.assert_array_equal(p2["theta"], p1["theta"])


def _toy_episode(seed, length=8, tasks=(0, 1), steps=2, rows=8):
    """An episode of the toy model's classification tasks [K, S, b, L]."""
    subs = []
    for k, t in enumerate(tasks):
        row = [make_batch(seed * 100 + 10 * k + s, rows, length, mixed=False)
               for s in range(steps)]
        for b in row:
            b["task_id"][:] = t
            b["label"] = np.minimum(b["label"], 1)
        subs.append({key: np.stack([b[key] for b in row]) for key in row[0]})
    return {key: np.stack([s[key] for s in subs]) for key in subs[0]}


def test_jit_and_pmap_agree_on_8_devices():
    """Dropout off: jit over a mesh of 8 and pmap over 8 give the same reptile steps (pmap
    psums the inner gradients: each inner loss is the global one, as under jit)."""
    model = ToyModel()
    batches = [_toy_episode(0), _toy_episode(1, tasks=(1, 1))]
    runs = {mode: _steps(_config("reptile", inner_lr=0.05, eps=0.5, mode=mode, mesh=(-1, 1, 1)),
                         model, batches)[:2] for mode in ("jit", "pmap")}
    p0 = jax.tree.map(np.asarray, model.init_params(jax.random.PRNGKey(0)))
    (jit_params, jit_metrics), (pmap_params, pmap_metrics) = runs["jit"], runs["pmap"]
    assert np.abs(jit_params["encoder"]["layers_0"]["kernel"]
                  - p0["encoder"]["layers_0"]["kernel"]).max() > 1e-4
    np.testing.assert_array_equal(jit_params["embeddings"]["word_embeddings"],
                                  p0["embeddings"]["word_embeddings"])  # the frozen group
    for a, b in zip(jax.tree.leaves(pmap_params), jax.tree.leaves(jit_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for got, want in zip(pmap_metrics, jit_metrics):
        for key in ("train/loss", "train/loss/t0", "train/loss/t1", "train/grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


def test_step_traces_once_per_batch_shape():
    model, c = ToyModel(), _config("fomaml")
    params = model.init_params(jax.random.PRNGKey(0))
    state = state_lib.create_train_state(model, params, c, 10)
    body = chex.assert_max_traces(trainers.get(c).make_step(model, c), n=2)
    train_step = jax.jit(body, donate_argnums=0)
    for i, length in enumerate([8, 16, 8, 16]):
        state, _ = train_step(state, _toy_episode(i, length, steps=3), RNG)
    assert int(state.step) == 4


def _bert_episode(seed, tasks, length=16):
    """A [K, S=2, b=8] episode of tiny_bert's tasks (0: 3-class cls, 1: 5-tag ner)."""
    r = np.random.RandomState(seed)
    shape = (len(tasks), 2, 8)
    mask = (np.arange(length) < r.randint(4, length + 1, shape + (1,))).astype(np.int32)
    task = np.broadcast_to(np.asarray(tasks, np.int32)[:, None, None], shape).copy()
    tags = np.where(mask > 0, r.randint(0, 5, shape + (length,)), -100)
    return {"input_ids": (r.randint(1, 50, shape + (length,)) * mask).astype(np.int32),
            "attention_mask": mask, "token_type_ids": np.zeros_like(mask),
            "task_id": task, "weight": np.ones(shape, np.float32),
            "label": np.where(task == 0, r.randint(0, 3, shape), -100).astype(np.int32),
            "tag_ids": np.where(task[..., None] == 1, tags, -100).astype(np.int32)}


def _bert_steps(batches, **sections):
    """tiny_bert's BERT with one layer, meta-trained by reptile through the jit strategy on 1
    device -> (initial params, params, metrics, strategy). What these tests check depends on
    neither the depth nor the mesh (the 8-device layouts are checked on the quadratic and toy
    models above), and the meta step's compile dominates their time."""
    from mtl_jax.models.multitask import MultiTaskModel
    from tiny_bert import tiny_bert

    model = tiny_bert(train__algorithm="reptile", **sections)
    model = MultiTaskModel(model.config, model.specs, model.encoder_config.replace(num_layers=1))
    c = model.config
    c.meta.update(dict(tasks_per_step=2, inner_steps=2, inner_lr=1e-2, inner_batch_size=8))
    c.optim.update(dict(name="sgd", lr=0.5, b1=0.0, weight_decay=0.0, schedule="constant",
                        warmup_fraction=0.0))
    c.parallel.mesh.update(dict(data=1, fsdp=1, tensor=1))
    # One init (NumPy: the donated step state never aliases it) serves as start and reference.
    p0 = jax.tree.map(np.asarray, model.init_params(jax.random.PRNGKey(0)))
    params, metrics, strategy = _steps(c, model, batches, devices=jax.devices()[:1], params=p0)
    assert strategy.train_step._cache_size() == 1  # one episode shape, one compile
    assert all(np.isfinite(m["train/loss"]) for m in metrics)
    return p0, params, metrics, strategy


def test_tiny_bert_lora_meta_learns_only_its_trainable_parameters():
    """PEFT (LoRA): the frozen encoder leaves stay bit-identical, LoRA and heads move."""
    p0, params, metrics, strategy = _bert_steps(
        [_bert_episode(0, (0, 1)), _bert_episode(1, (1, 0))], peft__kind="lora")
    assert all(m["train/present"].all() for m in metrics)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(p0)[0]]
    moved = {}
    for path, trainable, a, b in zip(paths, jax.tree.leaves(strategy.optimizer.trainable_mask()),
                                     jax.tree.leaves(params), jax.tree.leaves(p0)):
        if trainable:
            moved[path] = np.abs(a - b).max() > 0
        else:
            np.testing.assert_array_equal(a, b, err_msg=path)
    assert any("lora_b" in p and m for p, m in moved.items())
    assert all(m for p, m in moved.items() if "heads" in p and "kernel" in p)
    assert len(moved) < len(paths)  # the encoder itself is frozen


def test_tiny_bert_soft_sharing_adapts_the_sampled_tasks_own_encoder():
    """Soft sharing runs one task's encoder on a one-task sub-batch: with the tie off
    (soft_lambda 0), episodes of task 0 only move encoder row 0; row 1 stays bit-identical."""
    p0, params, metrics, _ = _bert_steps([_bert_episode(0, (0, 0))], sharing__mode="soft",
                                         sharing__soft_lambda=0.0)
    assert metrics[0]["train/present"].tolist() == [True, False]
    rows = list(zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(p0["encoder"])))
    assert max(np.abs(a[0] - b[0]).max() for a, b in rows) > 1e-4
    for a, b in rows:
        np.testing.assert_array_equal(a[1], b[1])


def test_refused_combinations_are_one_line_user_errors():
    cases = [(dict(weighting=("name", "pcgrad")), "weighting.name=equal"),
             (dict(data=("batch_mode", "stacked")), "data.batch_mode=homogeneous"),
             (dict(data=("batch_mode", "mixed")), "data.batch_mode=homogeneous"),
             (dict(meta=("inner_steps", 0)), "meta.inner_steps=0"),
             (dict(meta=("inner_optimizer", "lion")), "meta.inner_optimizer"),
             (dict(train=("algorithm", "maml")), "train.algorithm")]
    for change, message in cases:
        c = _config()
        ((section, (key, value)),) = change.items()
        c[section][key] = value
        with pytest.raises(UserError, match=message.replace(".", r"\.")) as err:
            validate.check_config(c)
        assert "\n" not in str(err.value)
    validate.check_config(_config())  # the meta defaults pass


def test_a_flat_batch_still_fits_and_a_stray_episode_is_refused():
    model, spec = ToyModel(), jax.sharding.PartitionSpec
    params = model.init_params(jax.random.PRNGKey(0))
    meta = _strategy(_config(mesh=(-1, 1, 1)), model, params)
    flat = meta.place_batch(make_batch(0))  # evaluation batches
    assert flat["task_id"].sharding.spec == spec(("data", "fsdp"))
    placed = meta.place_batch(_toy_episode(0))
    assert placed["input_ids"].sharding.spec == spec(None, None, ("data", "fsdp"), None)
    c = _config(mesh=(-1, 1, 1))
    c.train.algorithm = "standard"
    with pytest.raises(UserError, match="train.algorithm=reptile or fomaml"):
        _strategy(c, model, params).place_batch(_toy_episode(0))
    episode = _toy_episode(0)
    split = parallel.split_batch(episode, 4)
    assert split["input_ids"].shape == (4, 2, 2, 2, 8)
    np.testing.assert_array_equal(split["input_ids"][1, 0, 1], episode["input_ids"][0, 1, 2:4])


def test_host_window_counts_every_example_of_an_episode():
    batch = _toy_episode(0, length=8, steps=3)
    batch["weight"][1, 2, :3] = 0.0  # three padding rows
    host = HostWindow()
    host.add(batch, lambda length: 10.0 * length)
    real = batch["weight"] > 0
    assert host.examples == 2 * 3 * 8 - 3
    assert host.tokens == batch["attention_mask"][real].sum()
    assert host.flops == host.examples * 80.0


# --- the episode iterator ------------------------------------------------------------------------

def _fake_tasks(sizes):
    """Tasks whose feature i of task t has tokens [t, i, i] (length 3)."""
    tasks = []
    for t, n in enumerate(sizes):
        ids = np.stack([np.full(n, t), np.arange(n), np.arange(n)], 1).reshape(-1)
        arrays = dict(lengths=np.full(n, 3, np.int32), input_ids=ids.astype(np.int32),
                      token_type_ids=np.zeros_like(ids, np.int32),
                      label=np.arange(n, dtype=np.int32) % 2)
        tasks.append(types.SimpleNamespace(name=f"task{t}", index=t, features=Features(arrays)))
    return tasks


def test_iterator_episode_rows_follow_the_sampler_and_each_tasks_stream_and_replay():
    sizes, seed, episode = [7, 5, 11], 4, batching.Episode(tasks=3, steps=2, rows=4)
    data = get_base_config().data
    data.sampler, data.buckets = "temperature", (8,)
    keys = batching.batch_keys(["label"])

    def iterator():
        return TrainIterator(_fake_tasks(sizes), 8, seed, data, keys, episode=episode)

    it = iterator()
    rates = np.array(sizes) ** 0.5 / (np.array(sizes) ** 0.5).sum()  # temperature 2
    orders = {t: [] for t in range(3)}  # each task's stream, reshuffled per epoch, by hand
    for t, n in enumerate(sizes):
        for epoch in range(40):
            orders[t].extend(np.random.default_rng([seed, t, epoch]).permutation(n).tolist())
    used = {t: 0 for t in range(3)}
    batches = []
    for step in range(12):
        batch = next(it)
        batches.append(batch)
        assert batch["input_ids"].shape == (3, 2, 4, 8) and batch["label"].shape == (3, 2, 4)
        tasks = np.random.default_rng([seed, step, 0x5A3]).choice(3, size=3, p=rates)
        for k, t in enumerate(tasks):
            assert (batch["task_id"][k] == t).all() and (batch["input_ids"][k, :, :, 0] == t).all()
            want = orders[t][used[t]:used[t] + 8]
            used[t] += 8
            np.testing.assert_array_equal(batch["input_ids"][k, :, :, 1].reshape(-1), want)
    assert it.get_state()["episode"] == [3, 2, 4] and it.get_state()["mode"] == "episode"
    first = iterator()
    for _ in range(5):
        next(first)
    resumed = iterator()
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    for want in batches[5:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other = TrainIterator(_fake_tasks(sizes), 8, seed, data, keys,
                          episode=batching.Episode(tasks=2, steps=2, rows=4))
    with pytest.raises(UserError, match="episodes"):
        other.set_state(first.get_state())


# --- kill -9 during meta-training, then resume ---------------------------------------------------

def _start_paused(config, workdir, env, step, flags):
    """test_resume.start_paused with an environment: a run that waits after ``step``."""
    import subprocess

    from run_helpers import REPO, pausing_command

    command = pausing_command(step, f"--config={config}", f"--workdir={workdir}", *flags)
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.strip() == f"paused at step {step}":
            return proc
    proc.wait()
    raise AssertionError("the run ended before pausing:\n" + "".join(seen))


@pytest.mark.slow  # the default tier resumes the standard trainer (tests/test_resume.py)
def test_reptile_run_killed_and_resumed_is_bit_identical(tmp_path_factory):
    """On 1 device with a 1-layer encoder: what is checked (the episode iterator's state and the
    meta step resume exactly) does not depend on either, and the compile dominates."""
    from run_helpers import cache_dir_for, main_env, run_main, write_config_file
    from test_resume import assert_same_params, checkpoint_steps, train_events

    root = tmp_path_factory.mktemp("meta_resume")
    config, env = write_config_file(root), main_env(1, cache_dir=cache_dir_for(tmp_path_factory))
    flags = ("--config.train.algorithm=reptile", "--config.data.batch_mode=homogeneous",
             "--config.meta.tasks_per_step=2", "--config.meta.inner_steps=2",
             "--config.meta.inner_batch_size=8", "--config.meta.inner_lr=0.01",
             "--config.model.size.num_layers=1")
    straight = root / "straight"
    proc = run_main(f"--config={config}", f"--workdir={straight}", *flags, env=env)
    assert proc.returncode == 0, proc.stderr
    workdir = root / "killed"
    paused = _start_paused(config, workdir, env, step=3, flags=flags)
    paused.kill()
    paused.wait()
    assert checkpoint_steps(workdir) == [2]
    resumed = run_main(f"--config={config}", f"--workdir={workdir}", *flags, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {workdir / 'checkpoints'}/2" in resumed.stderr
    assert_same_params(workdir, straight)
    keys = ("step", "train/loss", "train/loss/sent", "train/loss/ner", "train/grad_norm",
            "train/examples_per_s")
    ours = [[e.get(k) for k in keys[:-1]] for e in train_events(workdir)]
    assert ours == [[e.get(k) for k in keys[:-1]] for e in train_events(straight)]
    assert [e["step"] for e in train_events(workdir)] == [1, 2, 3, 4]
    data_state = json.loads((workdir / "checkpoints" / "4" / "data" / "metadata").read_text())
    assert data_state["mode"] == "episode" and data_state["episode"] == [2, 2, 8]
