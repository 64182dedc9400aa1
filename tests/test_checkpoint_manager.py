"""Orbax training checkpoints: sharded round trips across layouts, corruption fallback, best
retention, shape mismatch, JSON items, async saves."""
import glob
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from configs.base import get_base_config
from mtl_jax.checkpoints.manager import CheckpointManager, config_to_json
from mtl_jax.errors import UserError


TX = optax.adamw(1e-3)


class FakeTrainState(flax.struct.PyTreeNode):  # the TrainState fields of the architecture contract
    step: jax.Array
    params: dict
    opt_state: object
    weighting_state: dict
    rng: jax.Array
    tx: object = flax.struct.field(pytree_node=False, default=TX)  # static: not checkpointed


def make_state(seed=0, hidden=8, step=3, shardings=None):
    rng = np.random.default_rng(seed)
    params = {"encoder": {"kernel": jnp.asarray(rng.normal(size=(16, hidden)), jnp.float32)},
              "heads": {"sst2": {"bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}}
    if shardings is not None:
        params = jax.device_put(params, shardings)
    opt_state = TX.init(params)
    opt_state = jax.tree.map(lambda x: x + 0.5, opt_state)  # non-trivial moments
    return FakeTrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
                          weighting_state={"log_vars": jnp.asarray([0.1, -0.2])},
                          rng=jax.random.key(seed))


def fsdp_shardings(mesh):
    return {"encoder": {"kernel": NamedSharding(mesh, P("fsdp", "data"))},
            "heads": {"sst2": {"bias": NamedSharding(mesh, P())}}}


def abstract(state, sharding_fn):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)),
                        state)


def assert_same_values(a, b):
    a_leaves, a_def = jax.tree.flatten(a)
    b_leaves, b_def = jax.tree.flatten(b)
    assert a_def == b_def
    for x, y in zip(a_leaves, b_leaves):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def mesh8():
    assert len(jax.devices()) == 8, "conftest gives 8 fake CPU devices"
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))


def test_sharded_save_restores_on_one_device_and_on_another_mesh(tmp_path, mesh8):
    state = make_state(shardings=fsdp_shardings(mesh8))
    assert len(state.params["encoder"]["kernel"].addressable_shards) == 8
    with CheckpointManager(str(tmp_path), async_save=True) as ckpt:
        assert ckpt.save(3, state)
        ckpt.wait()

        one = SingleDeviceSharding(jax.devices()[0])
        restored = ckpt.restore_latest(abstract(state, lambda _: one))
        assert restored.step == 3
        assert_same_values(restored.state, state)
        assert restored.state.params["encoder"]["kernel"].sharding == one
        assert isinstance(restored.state, FakeTrainState) and restored.state.tx is TX

        other = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
        target = NamedSharding(other, P("b"))  # first axis split 4 ways instead of 2
        restored = ckpt.restore_latest(abstract(state, lambda x: target if x.ndim == 2 else
                                                NamedSharding(other, P())))
        kernel = restored.state.params["encoder"]["kernel"]
        assert kernel.sharding == target
        assert kernel.addressable_shards[0].data.shape == (4, 8)  # 16 rows / 4
        assert_same_values(restored.state, state)


def test_restore_with_mesh_replicates_and_shardings_tree_overrides(tmp_path, mesh8):
    state = make_state(shardings=fsdp_shardings(mesh8))
    with CheckpointManager(str(tmp_path)) as ckpt:
        ckpt.save(1, state)
        bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored = ckpt.restore_latest(bare, shardings=mesh8)
        assert restored.state.params["encoder"]["kernel"].sharding.spec == P()
        assert_same_values(restored.state, state)


def test_async_save_is_complete_after_wait_and_before_restore(tmp_path):
    state = make_state()
    expected = jax.tree.map(lambda x: x.copy(), state)
    ckpt = CheckpointManager(str(tmp_path), async_save=True)
    ckpt.save(7, state, data_state={"position": 7})
    # The next train step donates (frees) the state buffers while the write goes on.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ckpt.wait()
    step_dir = tmp_path / "checkpoints" / "7"
    assert (step_dir / "state" / "_METADATA").exists()
    assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))
    # A fresh manager (a restarted process) sees the finished checkpoint.
    ckpt.close()
    restored = CheckpointManager(str(tmp_path)).restore_latest(make_state(seed=1))
    assert restored.step == 7 and restored.data_state == {"position": 7}
    assert_same_values(restored.state, expected)


def test_restore_latest_without_checkpoints_is_none(tmp_path):
    with CheckpointManager(str(tmp_path)) as ckpt:
        assert ckpt.restore_latest(make_state()) is None


def _truncate_arrays(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(3)


def _delete_metadata(step_dir):
    os.remove(f"{step_dir}/state/_METADATA")


def _delete_iterator_state(step_dir):
    os.remove(f"{step_dir}/data/metadata")


# tensorstore may finish a failed read's callback after its event loop closed: harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_truncate_arrays, _delete_metadata, _delete_iterator_state])
def test_corrupt_latest_falls_back_to_previous_with_one_warning(tmp_path, capsys, corrupt):
    with CheckpointManager(str(tmp_path), max_to_keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(seed=step, step=step), data_state={"position": step})
    corrupt(tmp_path / "checkpoints" / "3")

    ckpt = CheckpointManager(str(tmp_path), max_to_keep=3)
    capsys.readouterr()
    restored = ckpt.restore_latest(make_state())
    assert restored.step == 2 and restored.data_state == {"position": 2}
    assert_same_values(restored.state, make_state(seed=2, step=2))
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert "checkpoints/3 is unreadable (" in warnings[0] and "<bound method" not in warnings[0]
    # The broken step is moved aside, so the resumed run can write step 3 again.
    assert ckpt.all_steps() == [1, 2]
    assert glob.glob(str(tmp_path / "checkpoints" / "3.corrupt-*"))
    assert ckpt.save(3, make_state(seed=30, step=3))
    ckpt.wait()
    assert_same_values(ckpt.restore_latest(make_state()).state, make_state(seed=30, step=3))
    ckpt.close()


def test_no_readable_checkpoint_is_a_user_error_and_moves_nothing(tmp_path):
    with CheckpointManager(str(tmp_path)) as ckpt:
        ckpt.save(1, make_state())
    _delete_metadata(tmp_path / "checkpoints" / "1")
    with pytest.raises(UserError, match=r"no checkpoint in .* could be read \(steps \[1\]\)"):
        CheckpointManager(str(tmp_path)).restore_latest(make_state())
    assert (tmp_path / "checkpoints" / "1").is_dir()


@pytest.mark.parametrize("mode, expected_kept, expected_best", [
    ("max", [2, 5], 2),  # latest (5) + best by max (0.9 at step 2)
    ("min", [1, 5], 1),  # latest (5) + best by min (0.5 at step 1)
])
def test_keeps_latest_and_best_by_metric(tmp_path, mode, expected_kept, expected_best):
    metrics = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6, 5: None}  # step 5: a save without evaluation
    with CheckpointManager(str(tmp_path), max_to_keep=1, keep_best=True, best_mode=mode) as ckpt:
        for step, metric in metrics.items():
            ckpt.save(step, make_state(seed=step, step=step), metric=metric)
        ckpt.wait()
        assert ckpt.all_steps() == expected_kept
        assert ckpt.best_step() == expected_best
        assert ckpt.latest_step() == 5
    on_disk = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert on_disk == expected_kept


def test_without_keep_best_only_latest_are_kept(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=2, keep_best=False) as ckpt:
        for step, metric in [(1, 0.9), (2, 0.1), (3, 0.2)]:
            ckpt.save(step, make_state(step=step), metric=metric)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]


def test_saving_an_existing_step_is_a_no_op(tmp_path):
    with CheckpointManager(str(tmp_path)) as ckpt:
        assert ckpt.save(4, make_state(seed=1))
        assert not ckpt.save(4, make_state(seed=2))
        assert_same_values(ckpt.restore_latest(make_state()).state, make_state(seed=1))


def test_different_model_shape_is_one_clear_user_error(tmp_path):
    with CheckpointManager(str(tmp_path)) as ckpt:
        ckpt.save(1, make_state(hidden=8))
    ckpt = CheckpointManager(str(tmp_path))
    with pytest.raises(UserError) as e:
        ckpt.restore_latest(make_state(hidden=16))
    message = str(e.value)
    assert "\n" not in message
    assert message == (f"checkpoint in {tmp_path} holds a model of a different shape (param "
                       "params/encoder/kernel: saved [16, 8] vs now [16, 16]); use a new --workdir")
    # A task head that the checkpoint does not have.
    state = make_state(hidden=8)
    state = state.replace(params={**state.params, "heads": {**state.params["heads"],
                                                            "rte": {"bias": jnp.zeros(2)}}})
    with pytest.raises(UserError, match=r"param params/heads/rte/bias: saved absent vs now \[2\]"):
        ckpt.restore_latest(state)
    # Same model, another weighting (its state has one entry per task).
    state = make_state(hidden=8).replace(weighting_state={"log_vars": jnp.zeros(3)})
    with pytest.raises(UserError, match=r"holds a different training state \(weighting_state/"
                       r"log_vars: saved \[2\] vs now \[3\]; another optimizer or weighting\?\)"):
        ckpt.restore_latest(state)
    ckpt.close()


def test_iterator_loop_and_config_json_round_trip(tmp_path):
    config = get_base_config()
    config.tasks.sst2 = {"type": "sequence_classification", "num_labels": 2}
    data_state = {"seed": 3, "epochs": {"sst2": 1, "rte": 0},
                  "positions": {"sst2": [5, 17], "rte": []}, "sampler_rng": "0123abcd"}
    loop_state = {"early_stopping": {"best_value": 0.875, "best_step": 40,
                                     "evals_without_improvement": 2}}
    with CheckpointManager(str(tmp_path)) as ckpt:
        ckpt.save(40, make_state(), data_state=data_state, loop_state=loop_state, config=config)
        restored = ckpt.restore_latest(make_state())
    assert restored.data_state == data_state
    assert restored.loop_state == loop_state
    assert restored.config == config_to_json(config)
    assert restored.config["data"]["buckets"] == [32, 64, 128, 256]
    assert restored.config["optim"]["lr"] == 5e-5
    assert restored.config["tasks"]["sst2"]["num_labels"] == 2


def test_from_config_reads_checkpoint_and_train_sections(tmp_path):
    config = get_base_config()
    config.checkpoint.max_to_keep = 1
    config.checkpoint.async_save = False
    config.train.early_stopping_mode = "min"
    with CheckpointManager.from_config(str(tmp_path), config) as ckpt:
        for step, metric in [(1, 0.3), (2, 0.1), (3, 0.2)]:
            ckpt.save(step, make_state(step=step), metric=metric)
        assert ckpt.all_steps() == [2, 3]
    with pytest.raises(UserError, match="max_to_keep"):
        CheckpointManager(str(tmp_path), max_to_keep=0)


def test_half_written_save_of_a_killed_run_is_ignored_and_cleaned(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(seed=step, step=step))
    # A save killed mid-write leaves orbax's temporary directory, never a finished step dir.
    root = tmp_path / "checkpoints"
    os.rename(root / "3", root / "3.orbax-checkpoint-tmp-1234")
    ckpt = CheckpointManager(str(tmp_path), max_to_keep=3)
    assert ckpt.all_steps() == [1, 2]
    assert_same_values(ckpt.restore_latest(make_state()).state, make_state(seed=2, step=2))
    # The resumed run writes step 3 again; orbax has removed the leftover by then.
    assert ckpt.save(3, make_state(seed=33, step=3))
    ckpt.wait()
    assert sorted(os.listdir(root)) == ["1", "2", "3"]
    ckpt.close()
