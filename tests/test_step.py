"""Train/eval steps: 1 vs 8 devices (data parallel, FSDP, pmap), frozen groups, NaN skip,
compile-once, per-task gradients, metrics, batch sharding, distributed start-up."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs.base import get_base_config
from mtl_jax.errors import UserError
from mtl_jax.tasks.spec import TaskSpec
from mtl_jax.training import distributed, parallel, sharding, state as state_lib, step as step_lib
from toy_mtl_model import ToyModel, make_batch

RNG = jax.random.PRNGKey(7)


def _config(weighting="equal", stacked=False, mode="jit", mesh=(1, 1, 1), rules="replicated",
            **optim):
    c = get_base_config()
    c.weighting.name = weighting
    c.data.batch_mode = "stacked" if stacked else "mixed"
    c.parallel.mode = mode
    c.parallel.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
    c.parallel.rules = rules
    c.optim.lr, c.optim.warmup_fraction, c.optim.schedule = 1e-2, 0.0, "linear"
    c.optim.update(optim)
    return c


def _strategy(c, model, params, mesh):
    abstract = state_lib.abstract_train_state(model, params, c, total_steps=10)
    return parallel.build(model, c, mesh, abstract)


def _run(c, model, steps=3, stacked=False, devices=None, batches=None):
    mesh = sharding.make_mesh(c, devices)
    params = model.init_params(jax.random.PRNGKey(0))
    strategy = _strategy(c, model, params, mesh)
    state = strategy.init_state(params)
    rng = strategy.place_rng(RNG)
    losses = []
    for i in range(steps):
        batch = batches[i] if batches else make_batch(i, stacked=stacked)
        state, metrics = strategy.train_step(state, strategy.place_batch(batch), rng)
        losses.append(np.asarray(metrics["train/loss"]))
    params = strategy.saved(state).params
    return np.array(losses), jax.tree.map(np.asarray, params), state, metrics


@pytest.mark.parametrize("weighting, stacked", [("equal", False), ("pcgrad", True)])
def test_one_device_data_parallel_fsdp_and_pmap_agree(weighting, stacked):
    model = ToyModel(penalty=1e-2)  # soft penalty included in the comparison
    ref_losses, ref_params, _, _ = _run(_config(weighting, stacked), model, stacked=stacked,
                                        devices=jax.devices()[:1])
    runs = {
        "dp8": _config(weighting, stacked, mesh=(-1, 1, 1)),
        "fsdp8": _config(weighting, stacked, mesh=(2, 4, 1), rules="fsdp"),
        "pmap8": _config(weighting, stacked, mode="pmap", mesh=(-1, 1, 1)),
    }
    for name, c in runs.items():
        losses, params, state, _ = _run(c, model, stacked=stacked)
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        if name == "fsdp8":  # really sharded: each device holds 1/4 of the embedding table
            emb = state.params["embeddings"]["word_embeddings"]
            assert emb.sharding.spec == P(None, "fsdp")
            assert emb.addressable_shards[0].data.shape == (64, 8)
            mu = state.opt_state[1].inner_states["all"].inner_state[0].mu
            assert mu["embeddings"]["word_embeddings"].sharding.spec == P(None, "fsdp")


def test_pmap_count_weighting_with_uneven_tasks_per_device():
    """Device shards with different task mixes: pmap must still give the global per-task means."""
    model = ToyModel()
    b = make_batch(0)
    b["task_id"] = np.array([0] * 3 + [1] * 13, np.int32)  # device 0: task 0 only, ...
    b["label"] = np.minimum(b["label"], 1)
    b["weight"][5] = 0.0  # a padding example
    ref, ref_p, _, m1 = _run(_config(), model, steps=1, devices=jax.devices()[:1], batches=[b])
    got, got_p, _, m8 = _run(_config(mode="pmap", mesh=(-1, 1, 1)), model, steps=1, batches=[b])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    for key in ("train/loss/t0", "train/loss/t1", "train/grad_norm"):
        np.testing.assert_allclose(np.asarray(m8[key]), np.asarray(m1[key]), rtol=1e-5)
    for a, r in zip(jax.tree.leaves(got_p), jax.tree.leaves(ref_p)):
        np.testing.assert_allclose(a, r, atol=1e-6)


def test_metrics_against_direct_computation():
    model = ToyModel()
    c = _config(weighting="static", clip_norm=0.0)
    c.weighting.static_weights = {"t1": 2.0}
    params = model.init_params(jax.random.PRNGKey(0))
    batch = make_batch(0)
    losses, _, _ = model.task_losses(params, batch)
    grad = jax.grad(lambda p: jnp.dot(model.task_losses(p, batch)[0], jnp.array([1.0, 2.0])))(
        params)
    _, _, state, m = _run(c, model, steps=1, devices=jax.devices()[:1], batches=[batch])
    np.testing.assert_allclose(float(m["train/loss"]), losses[0] + 2 * losses[1], rtol=1e-6)
    np.testing.assert_allclose(float(m["train/loss/t1"]), losses[1], rtol=1e-6)
    np.testing.assert_allclose(float(m["train/weight/t1"]), 2.0)
    np.testing.assert_allclose(float(m["train/grad_norm"]), optax.global_norm(grad), rtol=1e-5)
    np.testing.assert_allclose(float(m["train/lr"]), 1e-2)  # step 0 of linear decay, no warmup
    assert bool(m["train/finite"]) and int(state.step) == 1
    assert all(isinstance(v, jax.Array) for v in m.values())


def test_frozen_group_bit_identical_and_untouched_by_gradients():
    model = ToyModel()
    c = _config()
    c.optim.groups.emb = dict(labels="embeddings", frozen=True)
    c.optim.groups.rest = dict(labels="(?!embeddings$).*")
    p0 = jax.tree.map(np.asarray, model.init_params(jax.random.PRNGKey(0)))
    _, p, _, m = _run(c, model, devices=jax.devices()[:1])
    np.testing.assert_array_equal(p["embeddings"]["word_embeddings"],
                                  p0["embeddings"]["word_embeddings"])
    assert np.abs(p["encoder"]["layers_0"]["kernel"]
                  - p0["encoder"]["layers_0"]["kernel"]).max() > 1e-4


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_policy(policy):
    model = ToyModel()
    c = _config()
    c.train.nan_policy = policy
    good, bad = make_batch(0), make_batch(1)
    bad["weight"][:] = np.inf  # loss inf, gradients nan
    _, p1, _, _ = _run(c, model, steps=1, devices=jax.devices()[:1], batches=[good])
    _, p2, state, m = _run(c, model, steps=2, devices=jax.devices()[:1], batches=[good, bad])
    assert not bool(m["train/finite"]) and int(state.step) == 2
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    assert same == (policy == "skip")
    if policy == "stop":  # the update went through; the loop is the one that stops
        assert np.isnan(p2["encoder"]["layers_0"]["kernel"]).any()


def test_compiles_once_per_batch_shape():
    model = ToyModel()
    c = _config()
    params = model.init_params(jax.random.PRNGKey(0))
    state = state_lib.create_train_state(model, params, c, 10)
    fn = chex.assert_max_traces(step_lib.make_train_step(model, c), n=2)
    train_step = jax.jit(fn, donate_argnums=0)
    for i, length in enumerate([8, 16, 8, 16, 8]):
        state, _ = train_step(state, make_batch(i, length=length), RNG)
    assert int(state.step) == 5


def test_strategy_step_compiles_once_per_batch_shape():
    """The step the jit strategy compiles (shardings given to jax.jit) traces once per shape."""
    model, c = ToyModel(), _config(mesh=(-1, 1, 1))
    params = model.init_params(jax.random.PRNGKey(0))
    strategy = _strategy(c, model, params, sharding.make_mesh(c))
    state, rng = strategy.init_state(params), strategy.place_rng(RNG)
    for i, length in enumerate([8, 16, 8, 16, 8]):
        state, _ = strategy.train_step(state, strategy.place_batch(make_batch(i, length=length)),
                                       rng)
    assert strategy.train_step._cache_size() == 2
    assert int(state.step) == 5


def test_per_task_gradients_are_each_tasks_gradient_and_sum_to_full():
    model = ToyModel()
    params = model.init_params(jax.random.PRNGKey(0))
    batch = jax.tree.map(jnp.asarray, make_batch(0, stacked=True))
    mask = jax.tree.map(lambda _: True, params)
    split = step_lib.Split.of(params, mask)
    g, losses, counts, _ = jax.jit(lambda p, b: step_lib.per_task_grads(
        step_lib.make_loss_fn(model), step_lib.Reducer(), p, split, b, RNG, "vmap"))(params, batch)
    for t in range(2):
        sub = {k: v[t] for k, v in batch.items()}
        want = jax.grad(lambda p: model.task_losses(p, sub)[0][t])(params)
        for got, ref in zip([x[t] for x in g], split.take(want)):
            np.testing.assert_allclose(got, ref, atol=1e-6)
        np.testing.assert_allclose(losses[t], model.task_losses(params, sub)[0][t], rtol=1e-6)
        assert float(counts[t]) == 8
    full = jax.grad(lambda p: model.task_losses(p, step_lib.unstack(batch))[0].sum())(params)
    for got, ref in zip([x.sum(0) for x in g], split.take(full)):
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_surgery_needs_stacked_batches():
    with pytest.raises(UserError, match="data.batch_mode=stacked"):
        step_lib.make_train_step(ToyModel(), _config("pcgrad", stacked=False))


def test_eval_step_matches_apply():
    model = ToyModel()
    for mode in ("jit", "pmap"):
        c = _config(mode=mode, mesh=(-1, 1, 1))
        mesh = sharding.make_mesh(c)
        params = model.init_params(jax.random.PRNGKey(0))
        strategy = _strategy(c, model, params, mesh)
        state = strategy.init_state(params)
        batch = make_batch(3)
        out = strategy.eval_step(state, strategy.place_batch(batch))
        want = model.apply(params, batch)
        for name in want:
            np.testing.assert_allclose(np.asarray(out[name]), want[name], atol=1e-5)


def test_mesh_rules_and_batch_sharding():
    c = _config(mesh=(2, -1, 1), rules="tensor")
    mesh = sharding.make_mesh(c)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    c.parallel.mesh.update(dict(data=3, fsdp=1, tensor=1))
    with pytest.raises(UserError, match="needs 3 devices but 8"):
        sharding.make_mesh(c)
    c = _config(mesh=(1, 2, 4), rules="tensor")
    mesh = sharding.make_mesh(c)
    model = ToyModel()
    specs = sharding.param_specs(model, model.init_params(jax.random.PRNGKey(0)), c, mesh)
    assert specs["encoder"]["layers_0"]["kernel"] == P("fsdp", "tensor")
    assert specs["heads"]["t0"]["kernel"] == P("fsdp", None)
    c.parallel.rules = "fsdp"  # bias [32]: embed over fsdp; head bias [3]: not divisible -> None
    specs = sharding.param_specs(model, model.init_params(jax.random.PRNGKey(0)), c, mesh)
    assert specs["encoder"]["layers_0"]["bias"] == P("fsdp")
    assert specs["heads"]["t0"]["bias"] == P(None)
    flat = sharding.shard_batch(make_batch(0), mesh)
    assert flat["input_ids"].sharding.spec == P(("data", "fsdp"), None)
    stacked = sharding.shard_batch(make_batch(0, stacked=True), mesh)
    assert stacked["input_ids"].sharding.spec == P(None, ("data", "fsdp"), None)
    assert stacked["input_ids"].shape == (2, 8, 8)
    with pytest.raises(UserError, match="not divisible"):
        sharding.shard_batch(make_batch(0, batch_size=6),
                             sharding.make_mesh(_config(mesh=(-1, 1, 1))))


def test_pmap_split_batch_layout():
    b = make_batch(0, stacked=True)
    out = parallel.split_batch(b, 4)
    assert out["input_ids"].shape == (4, 2, 2, 8)
    np.testing.assert_array_equal(out["input_ids"][1, 0], b["input_ids"][0, 2:4])


def test_maybe_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.maybe_initialize_distributed() is False  # one Slurm task: single process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.maybe_initialize_distributed() is True and calls[-1] == {}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.maybe_initialize_distributed() is True
    assert calls[-1] == dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)


# --- the real MultiTaskModel (tiny random BERT) ------------------------------------------------

def _real_model(c):
    multitask = pytest.importorskip("mtl_jax.models.multitask")
    c.model.random_init, c.model.family = True, "bert"
    c.model.size.update(dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64))
    # 1e-12, not 0: hf.random_encoder_config drops 0-valued overrides (keeps 0.1 dropout).
    c.model.dropout, c.heads.dropout = 1e-12, 0.0
    specs = [TaskSpec("a", "sequence_classification", 3, 0),
             TaskSpec("b", "sequence_classification", 2, 1)]
    return multitask.build_model(c, specs)


def test_real_multitask_model_gradnorm_fsdp_8_devices():
    weighting, stacked = "gradnorm", True
    c = _config(weighting, stacked, mesh=(2, 4, 1), rules="fsdp")
    model = _real_model(c)
    params = model.init_params(jax.random.PRNGKey(0))
    batch = make_batch(0, vocab=100, stacked=stacked)
    batch.update(target=np.zeros(batch["label"].shape, np.float32),
                 tag_ids=np.full(batch["input_ids"].shape, -100, np.int32),
                 start_positions=np.zeros(batch["label"].shape, np.int32),
                 end_positions=np.zeros(batch["label"].shape, np.int32))
    flat = step_lib.unstack(batch) if stacked else batch
    want, _, _ = model.task_losses(params, flat, None, True, homogeneous=False)
    strategy = _strategy(c, model, params, sharding.make_mesh(c))
    state = strategy.init_state(params)
    losses = []
    for _ in range(3):
        state, m = strategy.train_step(state, strategy.place_batch(batch), strategy.place_rng(RNG))
        losses.append([float(m["train/loss/a"]), float(m["train/loss/b"])])
    np.testing.assert_allclose(losses[0], np.asarray(want), rtol=1e-5)  # dropout 0
    assert sum(losses[-1]) < sum(losses[0])
    assert float(m["train/weight/a"]) != 1.0  # the weighting moved
