"""model.init_from: a run's fresh params from another run's checkpoint (tiny random BERTs).

Sources are written with CheckpointManager directly (random normal params of the model's
shapes, from ``abstract_params``: no init to compile, and a loaded leaf cannot equal a fresh one by
chance); one end-to-end test trains a single-task run from a multi-task checkpoint through
``python -m mtl_jax.main`` (1 device, 1 layer) and resumes it with the source gone.
"""
import shutil

import jax
import numpy as np
import pytest

from configs.base import get_base_config
from mtl_jax.checkpoints import init_from
from mtl_jax.checkpoints.manager import CheckpointManager, config_to_json
from mtl_jax.errors import UserError
from mtl_jax.models import multitask
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.models.param_groups import path_str
from mtl_jax.tasks.spec import TaskSpec
from run_helpers import (cache_dir_for, main_env, persistent_compile_cache, restored_params,
                         run_main, tiny_config, write_config_file)

CLS, TOK = "sequence_classification", "token_classification"
# name -> (type, label names)
TASKS = {"a": (CLS, ("neg", "pos")), "b": (CLS, ("x", "y", "z")), "n": (TOK, ("O", "B", "I")),
         "c": (CLS, ("u", "v"))}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(cache_dir_for(tmp_path_factory)):
        yield


def build(tasks, ffn=64, labels=None, **sections):
    """A 2-layer hidden-32 BERT MultiTaskModel on ``tasks`` (indices in sorted-name order, as
    the pipeline numbers a ConfigDict's tasks); ``sections``: section__field=value."""
    c = get_base_config()
    c.model.random_init = True
    c.peft.update(dict(lora_rank=4, prefix_length=3, prefix_hidden=16, adapter_size=8))
    for key, value in sections.items():
        section, field = key.split("__")
        c[section][field] = value
    labels = labels or {}
    specs = [TaskSpec(n, TASKS[n][0], len(labels.get(n, TASKS[n][1])), i,
                      labels.get(n, TASKS[n][1])) for i, n in enumerate(sorted(tasks))]
    enc = EncoderConfig(family="bert", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                        head_dim=8, intermediate_size=ffn, max_position_embeddings=32,
                        **multitask.encoder_overrides(c, len(specs)))
    return multitask.MultiTaskModel(c, specs, enc)


def random_params(model, seed):
    """``model``'s parameter tree (shapes and dtypes of its init) filled with N(0, 1) values."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype),
                        model.abstract_params())


def save_source(path, model, seed=1, steps=((4, None),)):
    """A checkpoint per (step, metric) of random params of ``model``; returns {step: params}."""
    record = config_to_json(model.config)
    record["tasks"] = {s.name: {"type": s.type, "label_names": list(s.label_names)}
                       for s in model.specs}
    saved = {}
    with CheckpointManager(str(path), async_save=False) as ckpt:
        for i, (step, metric) in enumerate(steps):
            saved[step] = random_params(model, seed + i)
            ckpt.save(step, {"params": saved[step], "step": np.int32(step)}, config=record,
                      metric=metric)
    return saved


def flat(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def encoder_shapes(model):
    return {path_str(p): x.shape for p, x in
            jax.tree_util.tree_flatten_with_path(model.abstract_params()["encoder"])[0]}


def start(model, spec, **model_keys):
    """(params, log lines) of a fresh start of ``model`` with model.init_from=spec."""
    config = model.config
    config.model.init_from = spec
    config.model.update(model_keys)
    lines = []
    params = init_from.initial_params(model, config, jax.random.key(0), log=lines.append)
    return params, lines


def assert_tree_equal(got, want):
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --- what is loaded ----------------------------------------------------------------------------

def test_hard_source_loads_the_encoder_and_shared_heads_exactly(tmp_path):
    saved = save_source(tmp_path / "src", build(["a", "b", "n"]))[4]
    # b: same name and label count, other label names; c: a task the source does not have.
    target = build(["a", "b", "c"], labels={"b": ("p", "q", "r")})
    params, lines = start(target, str(tmp_path / "src"))  # no suffix: latest
    fresh = target.init_params(jax.random.key(0), pretrained=False)
    assert_tree_equal(params["encoder"], saved["encoder"])
    assert_tree_equal(params["heads"]["a"], saved["heads"]["a"])
    for task in ("b", "c"):  # start fresh: exactly the init with the same seed
        assert_tree_equal(params["heads"][task], fresh["heads"][task])
    # the pretrained init of the same seed has the same heads (the head keys do not depend on it)
    assert_tree_equal(target.init_params(jax.random.key(0))["heads"]["c"], fresh["heads"]["c"])
    assert lines == [f"init_from {tmp_path / 'src'} step 4: encoder (hard); heads a; fresh heads: "
                     f"b (different label sets), c (new task)"]
    _, lines = start(target, str(tmp_path / "src"), init_from_heads=False)
    assert "heads none; fresh heads: a (model.init_from_heads=False)" in lines[0]


def test_soft_source_gives_the_mean_or_a_named_tasks_encoder(tmp_path):
    source = build(["a", "b"], sharing__mode="soft", data__batch_mode="homogeneous")
    stack = flat(save_source(tmp_path / "src", source)[4]["encoder"])
    assert all(x.shape[0] == 2 for x in stack.values())
    target = build(["a"])
    params, lines = start(target, f"{tmp_path / 'src'}:latest")
    got = flat(params["encoder"])
    assert got.keys() == stack.keys()
    for k, x in stack.items():
        np.testing.assert_allclose(got[k], x.mean(axis=0), rtol=1e-6, atol=1e-7, err_msg=k)
    assert "encoder (soft, mean over tasks -> hard); heads a" in lines[0]
    params, lines = start(target, f"{tmp_path / 'src'}:latest", init_from_encoder="b")
    for k, x in flat(params["encoder"]).items():
        np.testing.assert_array_equal(x, stack[k][1], err_msg=k)  # b is task 1 there
    assert "encoder (soft, b's encoder -> hard)" in lines[0]
    with pytest.raises(UserError, match=r"init_from_encoder='cb' is neither 'mean' nor a task.*"
                                         r"its tasks: a, b"):
        start(target, str(tmp_path / "src"), init_from_encoder="cb")


def test_hard_source_fills_every_row_of_a_soft_target(tmp_path):
    saved = flat(save_source(tmp_path / "src", build(["a", "n"]))[4]["encoder"])
    target = build(["a", "b", "n"], sharing__mode="soft", data__batch_mode="homogeneous")
    params, lines = start(target, str(tmp_path / "src"))
    got = flat(params["encoder"])
    assert got.keys() == saved.keys()
    for k, x in saved.items():
        np.testing.assert_array_equal(got[k], np.stack([x] * 3), err_msg=k)
    assert "encoder (hard -> soft); heads a, n; fresh heads: b (new task)" in lines[0]


def test_lora_target_on_a_plain_source_keeps_its_lora_init(tmp_path):
    saved = flat(save_source(tmp_path / "src", build(["a", "n"]))[4]["encoder"])
    target = build(["a"], peft__kind="lora")
    params, lines = start(target, str(tmp_path / "src"))
    fresh = flat(target.init_params(jax.random.key(0), pretrained=False)["encoder"])
    got = flat(params["encoder"])
    lora = [k for k in got if k.endswith(("lora_a", "lora_b"))]
    assert len(lora) == 2 * 2 * 2  # query and value of 2 layers
    for k in got:
        np.testing.assert_array_equal(got[k], fresh[k] if k in lora else saved[k], err_msg=k)
    assert lines[0].endswith("heads a; kept the init of 8 PEFT leaves absent there")


@pytest.mark.parametrize("kind,scan", [("lora", False), ("lora", True), ("adapter", False),
                                       ("prefix", False)])
def test_per_task_peft_rows_follow_the_task_names(tmp_path, kind, scan):
    """Source tasks (a, b, n), target (b, c): b's rows are the source's row 1, c keeps its init;
    leaves shared by the tasks (the prefix MLP) come over as they are."""
    keys = dict(peft__kind=kind, model__scan_layers=scan)
    saved = flat(save_source(tmp_path / "src", build(["a", "b", "n"], **keys))[4])
    target = build(["b", "c"], **keys)
    params, lines = start(target, str(tmp_path / "src"))
    got = flat(params)
    fresh = flat(target.init_params(jax.random.key(0), pretrained=False))
    per_task = [k for k in got if any(p in k for p in ("lora_", "adapter", "prefix/embedding"))]
    assert per_task
    for k in per_task:
        axis = 1 if scan and k.startswith("encoder/") else 0  # nn.scan's layer axis comes first
        want = np.moveaxis(fresh[k].copy(), axis, 0)
        want[0] = np.moveaxis(saved[k], axis, 0)[1]
        np.testing.assert_array_equal(got[k], np.moveaxis(want, 0, axis), err_msg=k)
    for k in got:
        if k not in per_task and not k.startswith("heads/c"):
            np.testing.assert_array_equal(got[k], saved[k], err_msg=k)
    assert "heads b; fresh heads: c (new task); PEFT of b; fresh PEFT: c" in lines[0]
    params, lines = start(target, str(tmp_path / "src"), init_from_peft=False)
    for k in per_task:
        np.testing.assert_array_equal(flat(params)[k], fresh[k], err_msg=k)
    assert "fresh PEFT (model.init_from_peft=False)" in lines[0]


def test_source_peft_absent_here_is_ignored_and_said(tmp_path):
    saved = flat(save_source(tmp_path / "src", build(["a"], peft__kind="adapter"))[4])
    params, lines = start(build(["a"]), str(tmp_path / "src"))
    for k, x in flat(params).items():
        np.testing.assert_array_equal(x, saved[k], err_msg=k)
    # houlsby: 2 adapters (after attention, after the FFN) x 2 layers x 4 parameters
    assert "ignored 16 PEFT leaves of the source encoder absent here" in lines[0]


# --- what must match ---------------------------------------------------------------------------

def test_an_encoder_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    source = build(["a"])
    save_source(tmp_path / "src", source)
    target = build(["a"], ffn=96)
    fresh, there = encoder_shapes(target), encoder_shapes(source)
    first = next(k for k in fresh if fresh[k] != there[k])  # tree order
    with pytest.raises(UserError) as error:
        start(target, f"{tmp_path / 'src'}:latest")
    message = str(error.value)
    assert message == (f"model.init_from={tmp_path / 'src'}:latest: encoder/{first} has shape "
                       f"{there[first]} there and {fresh[first]} here; initialise "
                       f"from a run of the same encoder (model.name_or_path, model.size, "
                       f"model.scan_layers)")
    assert "\n" not in message


def test_a_peft_shape_mismatch_is_an_error_unless_peft_is_not_loaded(tmp_path):
    save_source(tmp_path / "src", build(["a"], peft__kind="lora"))
    target = build(["a"], peft__kind="lora", peft__lora_rank=2)
    with pytest.raises(UserError, match=r"encoder/.*lora_a has shape \(1, 32, 4\) there and "
                                        r"\(1, 32, 2\) here; use the source run's PEFT settings"):
        start(target, str(tmp_path / "src"))
    start(target, str(tmp_path / "src"), init_from_peft=False)


def test_the_suffix_picks_latest_best_or_a_step(tmp_path):
    model = build(["a"])
    saved = save_source(tmp_path / "src", model, steps=((2, 0.9), (4, 0.1)))
    for suffix, step in (("", 4), (":latest", 4), (":best", 2), (":2", 2), (":4", 4)):
        params, lines = start(model, f"{tmp_path / 'src'}{suffix}")
        assert_tree_equal(params, saved[step])
        assert lines[0].startswith(f"init_from {tmp_path / 'src'} step {step}:")
    assert init_from.parse_spec("gs://bucket/run") == ("gs://bucket/run", "latest")
    assert init_from.parse_spec("gs://bucket/run:best") == ("gs://bucket/run", "best")


def test_missing_dir_checkpoint_or_step_are_one_line_errors(tmp_path):
    model = build(["a"])
    with pytest.raises(UserError, match=r"no directory .*nowhere; give an mtl_jax training "
                                        r"workdir as DIR\[:best\|latest\|STEP\]"):
        start(model, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no checkpoint .*train that run first"):
        start(model, str(tmp_path / "empty"))
    save_source(tmp_path / "src", model, steps=((2, None), (4, None)))
    with pytest.raises(UserError, match="has no checkpoint at step 3 .it has steps 2, 4.; use one "
                                        "of those, :latest or :best"):
        start(model, f"{tmp_path / 'src'}:3")


def test_best_without_a_scored_checkpoint_is_a_one_line_error(tmp_path):
    """:best never silently means latest: not when no checkpoint has a metric, not when the
    source kept no best checkpoint (orbax would answer its latest step)."""
    save_source(tmp_path / "unscored", build(["a"]), steps=((2, None), (4, None)))
    save_source(tmp_path / "off", build(["a"], checkpoint__keep_best=False),
                steps=((2, 0.9), (4, 0.1)))
    for name in ("unscored", "off"):
        with pytest.raises(UserError) as error:
            start(build(["a"]), f"{tmp_path / name}:best")
        assert str(error.value) == (
            f"model.init_from={tmp_path / name}:best: {tmp_path / name} has no best checkpoint "
            f"(checkpoint.keep_best was off there or no checkpoint was scored); use :latest or "
            f"a step (2, 4)")


# --- through the runner and python -m mtl_jax.main -----------------------------------------------

def test_train_mode_checks_init_from_before_training_and_leaves_no_workdir(tmp_path):
    from mtl_jax.training import runner

    config = tiny_config(tmp_path, ("sent",))
    config.model.init_from = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no directory"):
        runner.run("train", config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # the in-process init_from tests here are the default tier's
def test_single_task_run_from_a_multitask_checkpoint_end_to_end(tmp_path, tmp_path_factory):
    """A sent+ner checkpoint -> a sent-only run (lr 0: its final params are its initial ones),
    then a resume of it with the source gone (a resume ignores init_from). One layer and two
    steps: nothing here depends on the depth or the step count, and compiles dominate."""
    from mtl_jax.training import runner

    source_config = tiny_config(tmp_path, ("sent", "ner"))
    source_config.model.size.num_layers = 1
    source_run = runner.build_run(source_config)
    saved = random_params(source_run.model, seed=3)
    with CheckpointManager(str(tmp_path / "src"), async_save=False) as ckpt:
        ckpt.save(7, {"params": saved, "step": np.int32(7)}, config=source_run.config_json)
    config_file = write_config_file(tmp_path)
    args = (f"--config={config_file}:sent", f"--workdir={tmp_path / 'run'}",
            f"--config.model.init_from={tmp_path / 'src'}:latest", "--config.optim.lr=0.0",
            "--config.model.size.num_layers=1", "--config.train.num_steps=2")
    env = main_env(1, cache_dir=cache_dir_for(tmp_path_factory))
    proc = run_main(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"init_from {tmp_path / 'src'} step 7: encoder (hard); heads sent\n" in proc.stderr
    step, got = restored_params(tmp_path / "run")
    assert step == 2
    want = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
    assert set(got) == {k for k in want if "'ner'" not in k}
    for k, x in got.items():
        np.testing.assert_array_equal(x, want[k], err_msg=k)
    shutil.rmtree(tmp_path / "src")
    proc = run_main(*args, env=env)  # finished: restores step 2, evaluates, never reads the source
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "init_from" not in proc.stderr
