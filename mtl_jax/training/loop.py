"""The training loop: steps, evaluation and early stopping, checkpoints, logs and results.

    state <- latest checkpoint of WORKDIR (data order and early-stopping progress included)
             or a fresh TrainState
    every step          train_step; metrics summed on device (no host sync)
    every log_every     pull the window: mean losses, examples/s, tokens/s, MFU -> metrics.jsonl,
                        TensorBoard, progress bar; a non-finite loss stops here (nan_policy=stop)
    every eval_every    evaluate every task, early stopping on train.early_stopping_metric,
    and at the end      checkpoint with that score (the best one is kept)
    every checkpoint_every, and on SIGTERM/SIGINT   checkpoint

At the end: results.json / results.md (final and best metrics per task, reports) and the
results table on stdout. A run that is started again in the same workdir resumes from its
latest checkpoint and produces exactly the parameters and metrics of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.checkpoints.manager import CheckpointManager
from mtl_jax.errors import RunStopped, UserError
from mtl_jax.training import evaluate_loop, flops
from mtl_jax.training import workdir as workdir_lib
from mtl_jax.training.early_stopping import EarlyStopping, select_metric
from mtl_jax.training.metrics_writer import METRICS_FILE, MetricsWriter
from mtl_jax.training.preemption import PreemptionGuard
from mtl_jax.training.results import write_results

# Test hook: after step K (or the first step past it, when a resume starts there) the loop waits
# (checkpoints written) until a stop signal arrives, so tests can SIGTERM or SIGKILL a run at a
# known point.
PAUSE_ENV = "MTL_JAX_TEST_PAUSE_AT_STEP"


class NonFiniteLoss(UserError):
    """The loss went NaN/inf with ``train.nan_policy=stop``; the last good checkpoint is kept."""

    exit_code = 3


# --- metric windows, summed on device between log steps ----------------------------------------

def _task_of(key: str) -> str | None:
    return key[len("train/loss/"):] if key.startswith("train/loss/") else None


@jax.jit
def _accumulate(window, metrics, step, task_present):
    """Adds one step's metrics to the window; non-finite steps are counted, not summed."""
    finite = metrics["train/finite"]
    sums = {k: window["sums"][k] + jnp.where(finite, v.astype(jnp.float32), 0.0)
            for k, v in metrics.items() if k != "train/finite"}
    first = (window["first_bad"] < 0) & ~finite  # the tasks named are those of the first bad step
    bad = {k: jnp.where(first, ~jnp.isfinite(metrics[k]), window["bad"][k]) for k in window["bad"]}
    present = window["present"] + (task_present & finite)
    first_bad = jnp.where(first, step, window["first_bad"])
    return dict(sums=sums, bad=bad, present=present, first_bad=first_bad,
                nonfinite=window["nonfinite"] + (~finite).astype(jnp.int32))


def _empty_window(metrics, num_tasks: int):
    return dict(sums={k: jnp.zeros([], jnp.float32) for k in metrics if k != "train/finite"},
                bad={k: jnp.zeros([], bool) for k in metrics if _task_of(k)},
                present=jnp.zeros([num_tasks], jnp.int32),
                first_bad=jnp.asarray(-1, jnp.int32), nonfinite=jnp.asarray(0, jnp.int32))


@dataclasses.dataclass
class HostWindow:
    """What the host counts between log steps (from the NumPy batches: no device sync)."""

    steps: int = 0
    examples: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    paused: float = 0.0  # seconds spent evaluating/checkpointing, not training
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start - self.paused, 1e-9)


def _task_presence(batch, num_tasks: int) -> np.ndarray:
    real = np.asarray(batch["weight"]).reshape(-1) > 0
    ids = np.asarray(batch["task_id"]).reshape(-1)[real]
    return np.isin(np.arange(num_tasks), ids).astype(np.int32)


# --- the loop ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Progress:
    """Early stopping and the last/best evaluations: checkpointed as the loop state."""

    stopper: EarlyStopping
    last: dict = dataclasses.field(default_factory=dict)  # {"step", "metrics", "reports"}
    best: dict = dataclasses.field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"early_stopping": self.stopper.state_dict(), "last_eval": self.last,
                "best_eval": self.best}

    def restore(self, loop_state: dict) -> "Progress":
        return Progress(self.stopper.restore(loop_state.get("early_stopping")),
                        dict(loop_state.get("last_eval") or {}), dict(loop_state.get("best_eval") or {}))


def train(run, workdir: str, *, evaluate_fn: Callable | None = None,
          step_fn: Callable | None = None) -> dict | None:
    """Trains ``run`` (a runner.Run) in ``workdir``; returns the results record. A signal stops
    it after a checkpoint with ``RunStopped`` (exit code 75: run again to resume).

    ``evaluate_fn(state, step) -> ({task: metrics}, {task: report})`` replaces the evaluation
    and ``step_fn(train_step) -> train_step`` wraps the step (both for tests).
    """
    config, t = run.config, run.config.train
    evaluate_fn = evaluate_fn or (lambda state, step: evaluate_loop.evaluate(run, state))
    primary = evaluate_loop.primary_metrics(config)
    ckpt = CheckpointManager.from_config(workdir, config)
    if ckpt.all_steps():  # a resume: refused before anything is read or written if settings differ
        workdir_lib.check_resume_config(workdir, run.config_json)
    it = run.data.train_iterator(t.batch_size, config.data.shuffle_seed)
    progress = Progress(EarlyStopping.from_config(config))

    restored = run.restore(ckpt)
    if restored is not None:
        state, step = restored.state, restored.step
        it.set_state(restored.data_state)
        progress = progress.restore(restored.loop_state)
    else:
        state, step = run.init_state(), 0
    _say(_resume_line(workdir, ckpt, restored))
    if jax.process_index() == 0:
        workdir_lib.record_sitting(workdir, run.config_json,
                                   None if restored is None else restored.step, sys.argv)
    _say_summary(run, state)
    writer = MetricsWriter(workdir, resume_step=step if restored is not None else None)
    loop = _Loop(run, workdir, ckpt, writer, it, progress, evaluate_fn, primary,
                 step_fn(run.train_step()) if step_fn else run.train_step())
    try:
        state, step, signal = loop.steps(state, step)
    finally:
        writer.close()
        ckpt.close()  # waits (bounded) for the last async save
    if signal is not None:
        raise RunStopped(f"signal {signal} at step {step}, checkpoint saved in {ckpt.directory}; "
                         f"run the same command again to resume")
    if progress.last.get("step") != step:  # a resumed run that had already finished training
        metrics, reports = evaluate_fn(state, step)
        progress.last = dict(step=step, metrics=metrics, reports=reports)
    return _finish(run, workdir, loop.progress, step)


def _resume_line(workdir: str, ckpt: CheckpointManager, restored) -> str:
    """What a (re)start does, in one line; a fresh start keeps an earlier sitting's metrics."""
    step = None if restored is None else restored.step
    lost = [s for s in ckpt.interrupted_saves if step is None or s > step]
    found = (f"found an interrupted save at step {', '.join(map(str, lost))}, discarded; "
             if lost else "")
    if restored is not None:
        return f"{found}resumed from {ckpt.directory}/{step}"
    kept = _set_aside_metrics(workdir)
    kept = f"; the earlier metrics.jsonl is kept as {kept}" if kept else ""
    return f"{found}starting from scratch in {workdir}{kept}"


def _set_aside_metrics(workdir: str) -> str | None:
    """A fresh start in a workdir that logged before (no checkpoint committed): keep that log."""
    path = os.path.join(workdir, METRICS_FILE)
    if jax.process_index() != 0 or "://" in workdir or not os.path.isfile(path) or \
            not os.path.getsize(path):
        return None
    aside = f"{path}.discarded-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, aside)
    return os.path.basename(aside)


class _Loop:
    def __init__(self, run, workdir, ckpt, writer, it, progress, evaluate_fn, primary, train_step):
        self.run, self.config, self.workdir = run, run.config, workdir
        self.ckpt, self.writer, self.it, self.progress = ckpt, writer, it, progress
        self.evaluate_fn, self.primary, self.train_step = evaluate_fn, primary, train_step
        self.num_tasks = len(run.model.specs)
        self.cost = flops.train_cost_of(run.model)  # soft sharing, frozen params: see flops.py
        self.peak = flops.device_peak_flops()
        self.rng = jax.random.PRNGKey(int(self.config.seed))  # the step folds in state.step
        self.pause_at = int(os.environ.get(PAUSE_ENV, "0") or 0)

    # --- main loop -------------------------------------------------------------------------
    def steps(self, state, step):
        t = self.config.train
        if self.progress.stopper.should_stop:
            _say(f"early stopping had already stopped this run at step {step}")
            return state, step, None
        bar = _progress_bar(t, step)
        window, host = None, HostWindow()
        with PreemptionGuard() as guard, bar:
            while step < t.num_steps:
                if self._stop_requested(guard, step):
                    self._check_finite(window, step)
                    self._save(state, step, None)
                    return state, step, guard.received
                batch = next(self.it)
                placed = self.run.batch(batch)
                state, metrics = self.train_step(state, placed, self.rng)
                step += 1
                self.ckpt.poll()  # a failed background save stops the run here, not hours later
                present = _task_presence(batch, self.num_tasks)
                if window is None:
                    window = _empty_window(metrics, self.num_tasks)
                window = _accumulate(window, metrics, np.int32(step), present)
                self._count(host, batch)
                bar.update(1)
                last = step == t.num_steps
                is_log, is_eval = step % t.log_every == 0 or last, step % t.eval_every == 0 or last
                is_ckpt = step % t.checkpoint_every == 0 or last
                if is_log or is_eval or is_ckpt:
                    self._check_finite(window, step)
                if is_log:
                    self._log(step, window, host, bar)
                    window, host = None, HostWindow()
                started = time.perf_counter()
                score = self._evaluate(state, step) if is_eval else None
                if is_ckpt or score is not None:
                    self._save(state, step, score)
                host.paused += time.perf_counter() - started
                if self.progress.stopper.should_stop:
                    _say(f"early stopping at step {step}: no improvement of "
                         f"{self.progress.stopper.metric} for {t.early_stopping_patience} "
                         f"evaluations (best {self.progress.stopper.best_value:.4f} at step "
                         f"{self.progress.stopper.best_step})")
                    return state, step, None
                if self.pause_at and step >= self.pause_at:
                    self._pause(guard, step)
        return state, step, None

    def _stop_requested(self, guard, step) -> bool:
        if jax.process_count() == 1:
            return guard.requested
        # Every process must agree, which costs a collective: only at log steps.
        return step % self.config.train.log_every == 0 and guard.should_stop()

    def _pause(self, guard, step):
        self.ckpt.wait()
        self.writer.flush()
        _say(f"paused at step {step}")
        while not guard.requested:
            time.sleep(0.02)

    # --- pieces ---------------------------------------------------------------------------
    def _count(self, host: HostWindow, batch) -> None:
        weight = np.asarray(batch["weight"])
        real = weight > 0
        length = np.shape(batch["input_ids"])[-1]
        n = float(real.sum()) * jax.process_count()
        host.steps += 1
        host.examples += n
        host.tokens += float(np.asarray(batch["attention_mask"])[real].sum()) * jax.process_count()
        host.flops += n * self.cost.per_example(length)

    def _check_finite(self, window, step) -> None:
        """Host sync: a non-finite loss since the last check stops the run (nan_policy=stop)."""
        if window is None or self.config.train.nan_policy != "stop":
            return
        nonfinite, first_bad, bad = jax.device_get(
            (window["nonfinite"], window["first_bad"], window["bad"]))
        if not nonfinite:
            return
        tasks = sorted(_task_of(k) for k, v in bad.items() if v)
        what = f"tasks: {', '.join(tasks)}" if tasks else "the gradient norm"
        self.ckpt.wait()
        good = self.ckpt.latest_step()
        kept = (f"the last good checkpoint is step {good} in {self.ckpt.directory}" if good
                else "no checkpoint was written yet")
        raise NonFiniteLoss(f"loss is not finite at step {int(first_bad)} ({what}); stopped, "
                            f"{kept}; lower optim.lr or set train.nan_policy=skip")

    def _log(self, step, window, host: HostWindow, bar) -> None:
        w = jax.device_get(window)
        good = host.steps - int(w["nonfinite"])
        names = [s.name for s in self.run.model.specs]
        out = {}
        for key, total in (w["sums"].items() if good else ()):  # all skipped: no means
            task = _task_of(key)
            if task is None:
                out[key] = float(total) / good
            elif w["present"][names.index(task)]:
                out[key] = float(total) / int(w["present"][names.index(task)])
        seconds = host.seconds()
        out["train/examples_per_s"] = host.examples / seconds
        out["train/tokens_per_s"] = host.tokens / seconds
        out["train/steps_per_s"] = host.steps / seconds
        mfu = flops.mfu(host.examples / seconds, host.flops / max(host.examples, 1.0), self.peak,
                        jax.device_count())
        if mfu is not None:
            out["train/mfu"] = mfu
        if int(w["nonfinite"]):
            out["train/skipped_steps"] = float(w["nonfinite"])
        self.writer.write(step, out)
        remaining = (self.config.train.num_steps - step) * seconds / host.steps
        loss = out.get("train/loss", math.nan)
        bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{out['train/examples_per_s']:.1f}",
                        refresh=False)
        if bar.disable:
            _say(f"step {step}/{self.config.train.num_steps}: loss {loss:.4f}, "
                 f"{out['train/examples_per_s']:.1f} examples/s, "
                 f"{seconds / host.steps:.3f} s/step, eta {_duration(remaining)}")

    def _evaluate(self, state, step) -> float | None:
        metrics, reports = self.evaluate_fn(state, step)
        if not metrics:  # no task has a validation split
            return None
        stopper = self.progress.stopper
        score = select_metric(metrics, stopper.metric, self.primary)
        improved = stopper.is_improvement(score)
        self.progress.stopper = stopper.update(step, score)
        record = dict(step=int(step), metrics=_floats(metrics), reports=dict(reports))
        self.progress.last = record
        if improved:
            self.progress.best = record
        self.writer.write(step, {"eval": metrics, "eval/score": score})
        for task, report in reports.items():
            self.writer.write_text(step, f"eval/{task}/report", report)
        self.writer.flush()
        shown = ", ".join(f"{task}/{name}={v:.4f}" for task, m in sorted(metrics.items())
                          for name, v in m.items())
        best = self.progress.stopper
        _say(f"step {step} eval: {shown}; {stopper.metric}={score:.4f} "
             f"(best {best.best_value:.4f} at step {best.best_step})"
             if best.best_value is not None else f"step {step} eval: {shown}")
        return score

    def _save(self, state, step, score) -> None:
        self.ckpt.save(step, self.run.placement.saved(state), data_state=self.it.get_state(),
                       config=self.run.config_json, metric=score,
                       loop_state=self.progress.state_dict())


def _finish(run, workdir, progress: Progress, step: int) -> dict:
    last, best = progress.last, progress.best or progress.last
    stopper = progress.stopper
    final = last.get("metrics", {})
    record = dict(final_step=step, final=final, best_step=best.get("step"),
                  best=best.get("metrics", {}))
    if jax.process_index() == 0:
        write_results(workdir, final, final_step=step, best=best.get("metrics"),
                      best_step=best.get("step"), reports=last.get("reports"),
                      extra=dict(selection_metric=stopper.metric, best_score=stopper.best_value,
                                 stopped_early=stopper.should_stop))
        print(evaluate_loop.results_table(final, final_step=step,
                                          best=best.get("metrics"), best_step=best.get("step")),
              flush=True)
    return record


# --- small helpers ----------------------------------------------------------------------------

def _progress_bar(t, step):
    import tqdm

    quiet = not t.progress or not sys.stdout.isatty() or jax.process_index() != 0
    return tqdm.tqdm(total=t.num_steps, initial=step, disable=quiet, unit="step",
                     dynamic_ncols=True, file=sys.stderr)


def _say(message: str) -> None:
    """One line on stderr; through tqdm so that a live progress bar is redrawn below it, not
    overwritten by it."""
    import tqdm

    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()


def _say_summary(run, state) -> None:
    if jax.process_index() == 0:
        print(run.model.summary(run.placement.saved(state).params), flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _floats(metrics) -> dict:
    return {task: {k: float(v) for k, v in m.items()} for task, m in metrics.items()}
