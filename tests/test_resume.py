"""Failures that lose nothing, through ``python -m mtl_jax.main`` subprocesses: a run killed
with SIGKILL after its step-2 checkpoint and resumed ends bit-identical to an uninterrupted one;
SIGTERM saves and exits 75; a truncated latest checkpoint falls back to the previous one; a
checkpoint written on 8 devices evaluates on 1; the pmap path resumes bit-identically too."""
import json
import shutil
import signal
import subprocess

import numpy as np
import pytest

from mtl_jax.training.metrics_writer import read_metrics
from run_helpers import (REPO, cache_dir_for, main_env, pausing_command, restored_params,
                         run_main, write_config_file)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, write_config_file(root), cache_dir_for(tmp_path_factory)


@pytest.fixture(scope="module")
def straight(setup):
    """An uninterrupted 4-step run (checkpoints at 2 and 4)."""
    root, config, cache = setup
    workdir = root / "straight"
    proc = run_main(f"--config={config}", f"--workdir={workdir}", env=main_env(cache_dir=cache))
    assert proc.returncode == 0, proc.stderr
    return workdir


def start_paused(config, workdir, cache, step, extra=()):
    """Starts a run that waits after ``step`` (its checkpoints on disk) until a signal."""
    command = pausing_command(step, f"--config={config}", f"--workdir={workdir}", *extra)
    proc = subprocess.Popen(command, cwd=REPO, env=main_env(cache_dir=cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.strip() == f"paused at step {step}":
            return proc
    proc.wait()
    raise AssertionError("the run ended before pausing:\n" + "".join(seen))


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def train_events(workdir):
    return [e for e in read_metrics(str(workdir / "metrics.jsonl")) if "train/loss" in e]


def assert_same_params(a, b):
    step_a, params_a = restored_params(a)
    step_b, params_b = restored_params(b)
    assert step_a == step_b == 4
    assert params_a.keys() == params_b.keys()
    for key in params_a:
        np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=key)


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(setup, straight):
    root, config, cache = setup
    workdir = root / "killed"
    proc = start_paused(config, workdir, cache, step=3)  # step 3 ran and was logged, not saved
    proc.kill()
    proc.wait()
    assert checkpoint_steps(workdir) == [2]
    assert [e["step"] for e in train_events(workdir)] == [1, 2, 3]

    resumed = run_main(f"--config={config}", f"--workdir={workdir}",
                       env=main_env(cache_dir=cache))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {workdir / 'checkpoints'}/2" in resumed.stderr
    assert_same_params(workdir, straight)
    keys = ("step", "train/loss", "train/loss/sent", "train/loss/ner", "train/grad_norm")
    ours = [[e.get(k) for k in keys] for e in train_events(workdir)]
    assert ours == [[e.get(k) for k in keys] for e in train_events(straight)]
    assert [e["step"] for e in train_events(workdir)] == [1, 2, 3, 4]  # step 3 not twice
    final = json.loads((workdir / "results.json").read_text())["final"]
    assert final == json.loads((straight / "results.json").read_text())["final"]


def test_sigterm_saves_a_checkpoint_and_exits_75(setup):
    root, config, cache = setup
    workdir = root / "terminated"
    proc = start_paused(config, workdir, cache, step=3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err  # EX_TEMPFAIL: a scheduler requeues, it is not "finished"
    assert err.strip().splitlines()[-1] == (
        f"stopped: signal {int(signal.SIGTERM)} at step 3, checkpoint saved in "
        f"{workdir / 'checkpoints'}; run the same command again to resume")
    assert checkpoint_steps(workdir) == [2, 3]
    data_state = json.loads((workdir / "checkpoints" / "3" / "data" / "metadata").read_text())
    assert data_state["step"] == 3  # the iterator state after 3 batches
    assert not (workdir / "results.json").exists()


def test_truncated_latest_checkpoint_falls_back_to_the_previous(setup, straight):
    root, config, cache = setup
    workdir = root / "truncated"
    shutil.copytree(straight, workdir)
    for path in (workdir / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    proc = run_main(f"--config={config}", f"--workdir={workdir}", env=main_env(cache_dir=cache))
    assert proc.returncode == 0, proc.stderr
    assert "checkpoints/4 is unreadable" in proc.stderr
    assert f"resumed from {workdir / 'checkpoints'}/2" in proc.stderr
    assert len(list((workdir / "checkpoints").glob("4.corrupt-*"))) == 1
    assert_same_params(workdir, straight)  # steps 3-4 retrained exactly


def test_checkpoint_written_on_8_devices_evaluates_on_1(setup, straight):
    root, config, cache = setup
    proc = run_main(f"--config={config}", f"--workdir={straight}", "--mode=eval",
                    "--config.eval.checkpoint=latest", env=main_env(devices=1, cache_dir=cache))
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((straight / "eval_results.json").read_text())
    final = json.loads((straight / "results.json").read_text())["final"]
    assert evaluated["step"] == 4 and evaluated["checkpoint"] == "latest"
    for task, metrics in final.items():
        for name, value in metrics.items():
            assert evaluated["metrics"][task][name] == pytest.approx(value, abs=1e-6)
    assert "final (step 4)" in proc.stdout


@pytest.mark.slow  # jit runs resume in the default tier; pmap == jit is test_step's
def test_pmap_run_killed_and_resumed_matches_an_uninterrupted_pmap_run(setup):
    """parallel.mode=pmap saves one unreplicated copy and replicates it again on resume."""
    root, config, cache = setup
    pmap = "--config.parallel.mode=pmap"
    straight = root / "pmap_straight"
    proc = run_main(f"--config={config}", f"--workdir={straight}", pmap,
                    env=main_env(cache_dir=cache))
    assert proc.returncode == 0, proc.stderr
    workdir = root / "pmap_killed"
    paused = start_paused(config, workdir, cache, step=3, extra=(pmap,))
    paused.kill()
    paused.wait()
    assert checkpoint_steps(workdir) == [2]
    resumed = run_main(f"--config={config}", f"--workdir={workdir}", pmap,
                       env=main_env(cache_dir=cache))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {workdir / 'checkpoints'}/2" in resumed.stderr
    assert_same_params(workdir, straight)
    final = json.loads((workdir / "results.json").read_text())["final"]
    assert final == json.loads((straight / "results.json").read_text())["final"]


@pytest.mark.slow  # weighting state round trip: test_checkpoint_manager
def test_meta_weighting_run_killed_and_resumed_is_bit_identical(setup):
    """weighting.name=meta: the weights' Adam state and the held-out stream resume too."""
    root, config, cache = setup
    meta = ("--config.weighting.name=meta", "--config.weighting.meta_lr=0.05")
    straight = root / "meta_straight"
    proc = run_main(f"--config={config}", f"--workdir={straight}", *meta,
                    env=main_env(cache_dir=cache))
    assert proc.returncode == 0, proc.stderr
    weights = [e["train/weight/sent"] for e in train_events(straight)]
    assert weights[0] != 1.0 and len(set(weights)) == 4  # learned, and moving every step
    workdir = root / "meta_killed"
    paused = start_paused(config, workdir, cache, step=3, extra=meta)
    paused.kill()
    paused.wait()
    resumed = run_main(f"--config={config}", f"--workdir={workdir}", *meta,
                       env=main_env(cache_dir=cache))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_params(workdir, straight)
    keys = ("step", "train/loss", "train/weight/sent", "train/weight/ner")
    assert ([[e.get(k) for k in keys] for e in train_events(workdir)]
            == [[e.get(k) for k in keys] for e in train_events(straight)])
