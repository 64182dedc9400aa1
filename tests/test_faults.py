"""Bad inputs and faults through the CLI (every case of tests/fault_cases.py: exit code, the one
last line, what the workdir holds afterwards), the workdir lock and config record in-process, and
a seeded soak: 200 tiny steps interrupted 10 times by SIGTERM and SIGKILL, resumed each time,
ending bit-identical to an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from fault_cases import CASES, check_case, make_context, run_case
from mtl_jax.errors import UserError
from mtl_jax.training import workdir as workdir_lib
from mtl_jax.training.metrics_writer import read_metrics
from run_helpers import REPO, cache_dir_for, main_command, pausing_command, restored_params


def _chattr_works(tmp) -> bool:
    probe = tmp / "chattr_probe"
    probe.mkdir(exist_ok=True)
    try:
        subprocess.run(["chattr", "+i", str(probe)], check=True, capture_output=True)
        subprocess.run(["chattr", "-i", str(probe)], check=True, capture_output=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return make_context(tmp_path_factory.mktemp("faults"), cache_dir_for(tmp_path_factory))


# Cases whose behaviour the default tier also checks in-process or in tests/test_resume.py
# (SIGTERM/SIGKILL resume, a corrupt checkpoint, the workdir lock, the non-finite policy, a
# changed num_steps): they run in the extended tier (pytest -m slow).
EXTENDED_CASES = {"a second run on a workdir in use",
                  "resume with a longer schedule (`train.num_steps`, may change)",
                  "SIGTERM during training", "SIGKILL during training, then the same command",
                  "a corrupt latest checkpoint", "the loss turns non-finite (`optim.lr=1e30`)"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow)
                                  if c.name in EXTENDED_CASES else c for c in CASES],
                         ids=[c.name for c in CASES])
def test_case(case, ctx, tmp_path):
    if "chattr" in case.name and not _chattr_works(tmp_path):
        pytest.skip("chattr +i is not available here (needs root on ext4/xfs)")
    proc, workdir, message, before = run_case(case, ctx, tmp_path / "run")
    check_case(case, ctx, proc, workdir, message, before)


def test_every_case_has_a_distinct_name():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 50
    assert EXTENDED_CASES <= set(names)


# --- the workdir lock and the config record, in-process --------------------------------------

def test_lock_excludes_a_second_holder_and_names_the_first(tmp_path):
    said = []
    with workdir_lib.WorkdirLock(str(tmp_path), said.append):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        # A second open file description (as another process has) cannot take it.
        with pytest.raises(UserError, match=rf"in use by another run \(host {holder['host']}, "
                                            rf"pid {os.getpid()}, started "):
            workdir_lib.WorkdirLock(str(tmp_path)).__enter__()
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly: nothing to take over
    with workdir_lib.WorkdirLock(str(tmp_path), said.append):
        pass
    assert said == []


def test_changed_keys_ignores_the_keys_that_may_change():
    saved = {"optim": {"lr": 1e-3}, "train": {"num_steps": 4, "batch_size": 8},
             "parallel": {"mesh": {"data": -1}}, "tasks": {"a": {"metrics": ["accuracy"]}}}
    now = {"optim": {"lr": 1e-2}, "train": {"num_steps": 9, "batch_size": 8},
           "parallel": {"mesh": {"data": 2}}, "tasks": {"a": {"metrics": ["f1"]}}}
    assert workdir_lib.changed_keys(saved, now) == [
        ("optim.lr", 1e-3, 1e-2), ("tasks.a.metrics", ["accuracy"], ["f1"])]


def test_label_names_resolved_now_but_empty_in_an_older_config_json_are_no_change():
    saved = {"tasks": {"a": {"label_names": []}, "b": {"label_names": ["x", "y"]}}}
    now = {"tasks": {"a": {"label_names": ["neg", "pos"]}, "b": {"label_names": ["y", "x"]}}}
    assert workdir_lib.changed_keys(saved, now) == [
        ("tasks.b.label_names", ["x", "y"], ["y", "x"])]


def test_a_reader_leaves_an_in_flight_save_of_a_training_run_alone(tmp_path):
    from mtl_jax.checkpoints.manager import CheckpointManager

    in_flight = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp"
    in_flight.mkdir(parents=True)
    CheckpointManager(str(tmp_path), read_only=True).close()  # as eval/predict open it
    assert in_flight.is_dir()
    trainer = CheckpointManager(str(tmp_path))  # a (re)starting run reports it (and orbax
    assert trainer.interrupted_saves == [6]      # deletes it before its first save)
    trainer.close()


def test_config_json_is_kept_and_sittings_are_appended(tmp_path):
    first, second = {"optim": {"lr": 1.0}}, {"optim": {"lr": 1.0}, "train": {"num_steps": 9}}
    workdir_lib.record_sitting(str(tmp_path), first, None, ["a"])
    workdir_lib.record_sitting(str(tmp_path), second, 4, ["b"])
    assert json.loads((tmp_path / "config.json").read_text()) == first
    lines = [json.loads(x) for x in (tmp_path / "sittings.jsonl").read_text().splitlines()]
    assert [(x["resumed_from"], x["argv"], x["config"]) for x in lines] == [
        (None, ["a"], first), (4, ["b"], second)]


POLL_SCRIPT = """
import sys, time
import jax.numpy as jnp
from mtl_jax.checkpoints.manager import CheckpointManager, CheckpointSaveError
from mtl_jax.errors import user_errors
with user_errors():  # CheckpointSaveError: one line, then a hard exit (orbax threads linger)
    manager = CheckpointManager(sys.argv[1])
    manager.save(1, {"w": jnp.ones(3)})
    started = time.monotonic()
    while time.monotonic() - started < 20:  # poll() never blocks: the loop calls it every step
        manager.poll()
        time.sleep(0.01)
    print("the failure was never noticed")
"""


def test_a_failed_async_save_is_noticed_by_polling_and_exits_4(tmp_path):
    if not _chattr_works(tmp_path):
        pytest.skip("chattr +i is not available here")
    (tmp_path / "checkpoints").mkdir()
    subprocess.run(["chattr", "+i", str(tmp_path / "checkpoints")], check=True)
    try:
        proc = subprocess.run([sys.executable, "-c", POLL_SCRIPT, str(tmp_path)], cwd=REPO,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                              text=True, timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "checkpoints")], check=True)
    assert proc.returncode == 4, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: checkpoint save at step 1 in .* failed \(PermissionError: .*\); "
                        r"no checkpoint was committed yet; .*", last)


# --- the soak ----------------------------------------------------------------------------------

SOAK_STEPS = 200
SOAK_ARGS = (f"--config.train.num_steps={SOAK_STEPS}", "--config.train.checkpoint_every=10",
             "--config.train.log_every=5", f"--config.train.eval_every={SOAK_STEPS}")


def _soak_plan(seed: int = 0, count: int = 10):
    """10 increasing steps and how each sitting ends: SIGTERM or SIGKILL once paused at the
    step, or SIGKILL as soon as the step's log line appears (possibly mid async save)."""
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(np.arange(3, SOAK_STEPS - 3), size=count, replace=False))
    how = rng.choice(["term", "kill_paused", "kill_running"], size=count)
    return [(int(s), str(h)) for s, h in zip(steps, how)]


def _interrupt(ctx, workdir, step, how):
    args = (f"--config={ctx.config}", f"--workdir={workdir}", *SOAK_ARGS)
    command = main_command(*args) if how == "kill_running" else pausing_command(step, *args)
    proc = subprocess.Popen(command, cwd=REPO, env=ctx.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if how != "kill_running" and line.startswith("paused at step "):
            break  # at `step`, or the first step past it when this sitting resumed beyond it
        if how == "kill_running" and line.startswith("step ") and "/" in line.split()[1]:
            if int(line.split()[1].split("/")[0]) >= step:
                break
    else:
        raise AssertionError("the sitting ended on its own:\n" + "".join(seen[-20:]))
    proc.send_signal(signal.SIGTERM if how == "term" else signal.SIGKILL)
    seen.append(proc.stderr.read())  # keep draining: a closed pipe would fail the stop's lines
    code = proc.wait(timeout=120)
    assert code == (75 if how == "term" else -signal.SIGKILL), (how, code, "".join(seen[-20:]))


@pytest.mark.slow  # ~4 CPU-minutes; test_resume's kill/resume runs are the default tier's
def test_soak_interrupted_ten_times_ends_bit_identical(ctx, tmp_path):
    straight = subprocess.Popen(  # alongside the interrupted sittings: they wait on start-up
        main_command(f"--config={ctx.config}", f"--workdir={tmp_path / 'straight'}", *SOAK_ARGS),
        cwd=REPO, env=ctx.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workdir = tmp_path / "interrupted"
    for step, how in _soak_plan():
        _interrupt(ctx, workdir, step, how)
    last = ctx.run(workdir, *SOAK_ARGS, timeout=600)
    assert last.returncode == 0, last.stderr[-2000:]
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-2000:]

    step_a, params_a = restored_params(tmp_path / "straight")
    step_b, params_b = restored_params(workdir)
    assert step_a == step_b == SOAK_STEPS
    assert params_a.keys() == params_b.keys()
    for key in params_a:
        np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=key)

    def logged(w):  # (a SIGTERM stop splits a log window, so only the steps are comparable)
        return [e["step"] for e in read_metrics(str(w / "metrics.jsonl")) if "train/loss" in e]
    assert logged(workdir) == sorted(set(logged(workdir)))  # no step logged twice
    assert set(logged(tmp_path / "straight")) <= set(logged(workdir))
    sittings = (workdir / "sittings.jsonl").read_text().splitlines()
    assert len(sittings) == 11


def test_keys_added_after_a_run_was_saved_are_no_change_at_their_old_behaviour():
    saved = {"train": {"num_steps": 4}, "tasks": {"a": {"metrics": ["f1"]}}}
    now = {"train": {"num_steps": 4, "algorithm": "standard"},
           "meta": {"inner_steps": 3}, "weighting": {"meta_lr": 0.1},
           "compare": {"meta": {"inner_lr": 5e-5}}, "transfer": {"epochs": 3},  # drivers' only
           "tasks": {"a": {"metrics": ["f1"], "k_shot": 0, "k_shot_seed": 0}}}
    assert workdir_lib.changed_keys(saved, now) == []
    now["train"]["algorithm"] = "reptile"
    now["tasks"]["a"]["k_shot"] = 16
    assert workdir_lib.changed_keys(saved, now) == [
        ("tasks.a.k_shot", "absent", 16), ("train.algorithm", "absent", "reptile")]
    saved["train"]["algorithm"] = "fomaml"  # present in the saved config: compared as usual
    assert workdir_lib.changed_keys(saved, now) == [
        ("tasks.a.k_shot", "absent", 16), ("train.algorithm", "fomaml", "reptile")]
