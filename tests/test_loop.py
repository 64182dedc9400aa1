"""The training loop in-process on a tiny random encoder: early stopping on a scripted metric
sequence (fake evaluator), non-finite losses (stop: message and last good checkpoint; skip: the
update is dropped), results files and metrics."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import user_errors
from mtl_jax.training import loop, runner
from mtl_jax.training.metrics_writer import read_metrics
from run_helpers import cache_dir_for, persistent_compile_cache, restored_params, tiny_config


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(cache_dir_for(tmp_path_factory)):
        yield


class ScriptedEvaluator:
    """Returns the next score of ``scores`` as sent/accuracy (and records the steps asked)."""

    def __init__(self, scores):
        self.scores, self.steps = list(scores), []

    def __call__(self, state, step):
        self.steps.append(step)
        score = self.scores[len(self.steps) - 1]
        return {"sent": {"accuracy": score}}, {"sent": f"report at step {step}"}


def build(root, **train):
    config = tiny_config(root)
    config.train.update(train)
    return runner.build_run(config)


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_early_stopping_stops_at_the_patience_step_and_keeps_the_best(tmp_path, capsys):
    # num_steps=4 everywhere: the same compiled step as the other tiny runs (compile cache).
    run = build(tmp_path, eval_every=1, checkpoint_every=100, log_every=2,
                early_stopping_metric="sent/accuracy", early_stopping_patience=1)
    run.config.checkpoint.max_to_keep = 1
    # Improvements at steps 1 and 2; step 3 is worse than 0.7 -> patience 1 stops after step 3.
    evaluator = ScriptedEvaluator([0.5, 0.7, 0.6, 0.6])
    workdir = tmp_path / "run"
    record = loop.train(run, str(workdir), evaluate_fn=evaluator)

    assert evaluator.steps == [1, 2, 3]
    assert record["final_step"] == 3 and record["best_step"] == 2
    results = json.loads((workdir / "results.json").read_text())
    assert results["final"] == {"sent": {"accuracy": 0.6}}
    assert results["best"] == {"sent": {"accuracy": 0.7}}
    assert results["stopped_early"] is True and results["best_score"] == 0.7
    # Every evaluation saved with its score: the latest (3) plus the best (2) are kept.
    assert checkpoint_steps(workdir) == [2, 3]
    md = (workdir / "results.md").read_text()
    assert "| accuracy | 0.6000 | 0.7000 |" in md and "report at step 3" in md

    events = read_metrics(str(workdir / "metrics.jsonl"))
    assert [e["step"] for e in events if "eval/score" in e] == [1, 2, 3]
    assert [e["eval/score"] for e in events if "eval/score" in e] == [0.5, 0.7, 0.6]
    train_steps = [e["step"] for e in events if "train/loss" in e]
    assert train_steps == [2]  # log_every=2; the stop at step 3 ends the run before a log
    logged = next(e for e in events if e["step"] == 2 and "train/loss" in e)
    assert logged["train/examples_per_s"] > 0 and logged["train/tokens_per_s"] > 0
    assert "train/mfu" not in logged  # CPU: no known peak
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "params: total 1.01M, trainable 1.01M (100.0%)"
    assert "final (step 3)" in out and "best (step 2)" in out

    # Started again, an early-stopped run trains no further and evaluates nothing new.
    again = loop.train(run, str(workdir), evaluate_fn=ScriptedEvaluator([]))
    assert again["final_step"] == 3 and again["best"] == {"sent": {"accuracy": 0.7}}


def poison_head_at(step_to_poison, task):
    """A step wrapper that sets ``task``'s head parameters to NaN before that step."""
    calls = []

    def wrap(train_step):
        def step(state, batch, rng):
            calls.append(1)
            if len(calls) == step_to_poison:
                heads = dict(state.params["heads"])
                heads[task] = jax.tree.map(lambda x: x * jnp.nan, heads[task])
                state = state.replace(params=dict(state.params, heads=heads))
            return train_step(state, batch, rng)
        return step
    return wrap


def test_nan_loss_stops_naming_step_and_task_and_keeps_last_good_checkpoint(tmp_path, capsys):
    run = build(tmp_path, log_every=2, checkpoint_every=2, eval_every=100)
    workdir = tmp_path / "run"
    evaluator = ScriptedEvaluator([0.5] * 4)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        loop.train(run, str(workdir), evaluate_fn=evaluator, step_fn=poison_head_at(3, "sent"))
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    # Detected at the step-4 log (no host sync before), named as step 3, task sent only.
    assert err[-1] == (f"error: loss is not finite at step 3 (tasks: sent); stopped, the last "
                       f"good checkpoint is step 2 in {workdir / 'checkpoints'}; lower optim.lr "
                       f"or set train.nan_policy=skip")
    assert checkpoint_steps(workdir) == [2]
    step, params = restored_params(workdir)
    assert step == 2 and all(np.isfinite(v).all() for v in params.values())
    assert not (workdir / "results.json").exists()
    assert [e["step"] for e in read_metrics(str(workdir / "metrics.jsonl"))] == [2]


def test_nan_policy_skip_drops_the_update(tmp_path):
    run = build(tmp_path, log_every=1, checkpoint_every=1, eval_every=100, nan_policy="skip")
    run.config.checkpoint.max_to_keep = 5
    calls = []

    def poison_weights_at_step_2(train_step):
        def step(state, batch, rng):
            calls.append(1)
            if len(calls) == 2:  # NaN example weights: every task loss of this step is NaN
                batch = dict(batch, weight=batch["weight"] * jnp.nan)
            return train_step(state, batch, rng)
        return step

    workdir = tmp_path / "run"
    loop.train(run, str(workdir), evaluate_fn=ScriptedEvaluator([0.5] * 4),
               step_fn=poison_weights_at_step_2)
    params = {s: restored_params(workdir, s)[1] for s in (1, 2, 3)}
    for key, value in params[1].items():
        np.testing.assert_array_equal(params[2][key], value)  # step 2 skipped: unchanged
    assert any(not np.array_equal(params[3][k], v) for k, v in params[2].items())
    assert all(np.isfinite(v).all() for v in params[3].values())
    events = {e["step"]: e for e in read_metrics(str(workdir / "metrics.jsonl"))
              if "train/examples_per_s" in e}
    assert events[2]["train/skipped_steps"] == 1.0 and "train/loss" not in events[2]
    assert "train/skipped_steps" not in events[3] and np.isfinite(events[3]["train/loss"])
