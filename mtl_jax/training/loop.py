"""The training loop: steps, evaluation and early stopping, checkpoints, logs and results.

    state <- latest checkpoint of WORKDIR (data order and early-stopping progress included)
             or a fresh TrainState
    every step          train_step; metrics summed on device (metrics_window: no host sync,
                        host values placed explicitly)
    every log_every     pull the window: mean losses, examples/s, tokens/s, MFU -> metrics.jsonl,
                        TensorBoard, progress; a non-finite loss stops here (nan_policy=stop)
    every eval_every    evaluate every task, early stopping on train.early_stopping_metric,
    and at the end      checkpoint with that score (the best one is kept)
    every checkpoint_every, and on SIGTERM/SIGINT   checkpoint

At the end: results.json / results.md (final and best metrics per task, reports) and the
results table on stdout. A run that is started again in the same workdir resumes from its
latest checkpoint and produces exactly the parameters and metrics of an uninterrupted run.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
import time
from typing import Callable

import jax

from mtl_jax.checkpoints.manager import CheckpointManager
from mtl_jax.errors import RunStopped, UserError
from mtl_jax.training import evaluate_loop, flops
from mtl_jax.training import trainers as trainers_lib
from mtl_jax.training import weighting as weighting_lib
from mtl_jax.training import workdir as workdir_lib
from mtl_jax.training.early_stopping import EarlyStopping, select_metric
from mtl_jax.training.metrics_window import DeviceWindow, HostWindow, mixing_target
from mtl_jax.training.metrics_writer import METRICS_FILE, MetricsWriter
from mtl_jax.training.preemption import PreemptionGuard
from mtl_jax.training.progress import progress_display
from mtl_jax.training import published
from mtl_jax.training.results import write_results


class NonFiniteLoss(UserError):
    """The loss went NaN/inf with ``train.nan_policy=stop``; the last good checkpoint is kept."""

    exit_code = 3


# --- the loop ----------------------------------------------------------------------------------

# Steps dispatched but not finished, at most. Dispatch is asynchronous: unbounded, the Python loop
# would run up to the next host read (a log or checkpoint step, tens of steps) ahead of the
# devices, and a stop signal seen at the top of the loop would wait for all of those before its
# checkpoint: minutes with slow steps, past a preemption notice. Two keep the devices fed (the
# next batch is built and placed while a step runs).
STEPS_IN_FLIGHT = 2


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
                        dict(loop_state.get("last_eval") or {}),
                        dict(loop_state.get("best_eval") or {}))


def train(run, workdir: str, *, evaluate_fn: Callable | None = None,
          step_fn: Callable | None = None,
          after_step: Callable[[int, "Loop"], None] | None = None) -> dict | None:
    """Trains ``run`` (a runner.Run) in ``workdir``; returns the results record. A signal stops
    it after a checkpoint with ``RunStopped`` (exit code 75: run again to resume).

    Hooks (for tests and tools): ``evaluate_fn(state, step) -> ({task: metrics}, {task:
    report})`` replaces the evaluation, ``step_fn(train_step) -> train_step`` wraps the step,
    and ``after_step(step, loop)`` runs at the end of every step, once its log, evaluation and
    checkpoint are done (``loop.ckpt``, ``loop.writer`` and ``loop.guard`` are the run's
    CheckpointManager, MetricsWriter and PreemptionGuard).
    """
    config, t = run.config, run.config.train
    evaluate_fn = evaluate_fn or (lambda state, step: evaluate_loop.evaluate(run, state))
    primary = evaluate_loop.primary_metrics(config)
    ckpt = CheckpointManager.from_config(workdir, config)
    if ckpt.all_steps():  # a resume: refused before anything is read or written if settings differ
        workdir_lib.check_resume_config(workdir, run.config_json)
    it = run.data.train_iterator(t.batch_size, config.data.shuffle_seed, row_shards=run.row_shards,
                                 heldout=weighting_lib.heldout_of(config),
                                 episode=trainers_lib.get(config).episode(config))
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
    loop = Loop(run, workdir, ckpt, writer, it, progress, evaluate_fn, primary,
                step_fn(run.train_step()) if step_fn else run.train_step(), after_step)
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


class Loop:
    """One sitting's steps; what ``train``'s ``after_step(step, loop)`` hook is given."""

    def __init__(self, run, workdir, ckpt, writer, it, progress, evaluate_fn, primary, train_step,
                 after_step=None):
        self.run, self.config, self.workdir = run, run.config, workdir
        self.ckpt, self.writer, self.it, self.progress = ckpt, writer, it, progress
        self.evaluate_fn, self.primary, self.train_step = evaluate_fn, primary, train_step
        self.after_step = after_step or (lambda step, loop: None)
        self.guard: PreemptionGuard | None = None  # while the steps run
        self.task_names = [s.name for s in run.model.specs]
        self.cost = flops.train_cost_of(run.model)  # soft sharing, frozen params: see flops.py
        self.peak = flops.device_peak_flops()
        self.mixing_target = mixing_target(it.mixing_target)  # logged with every window
        # The step folds in state.step. Placed once, explicitly: left on one device it would be
        # copied to the step's devices implicitly at every step.
        self.rng = run.strategy.place_rng(jax.random.PRNGKey(int(self.config.seed)))

    # --- main loop -------------------------------------------------------------------------
    def steps(self, state, step):
        t = self.config.train
        if self.progress.stopper.should_stop:
            _say(f"early stopping had already stopped this run at step {step}")
            return state, step, None
        # stderr: where the bar is drawn is what must be a terminal (stdout may be piped apart)
        bar = progress_display(sys.stderr, total=t.num_steps, initial=step, bar=t.progress,
                               shown=jax.process_index() == 0)
        window, host = None, HostWindow()
        in_flight = collections.deque()  # the metrics of the steps dispatched last
        with PreemptionGuard() as guard, bar:
            self.guard = guard
            while step < t.num_steps:
                if self._stop_requested(guard, step):
                    self._check_finite(window, step)
                    self._save(state, step, None)
                    return state, step, guard.received
                batch = next(self.it)
                placed = self.run.batch(batch)
                state, metrics = self.train_step(state, placed, self.rng)
                in_flight.append(metrics)
                if len(in_flight) > STEPS_IN_FLIGHT:
                    jax.block_until_ready(in_flight.popleft())  # a wait, not a transfer
                step += 1
                self.ckpt.poll()  # a failed background save stops the run here, not hours later
                window = (window or DeviceWindow.empty(metrics)).add(metrics)
                host.add(batch, self.cost.per_example)
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
                self.after_step(step, self)
        return state, step, None

    def _stop_requested(self, guard, step) -> bool:
        if jax.process_count() == 1:
            return guard.requested
        # Every process must agree, which costs a collective: only at log steps.
        return step % self.config.train.log_every == 0 and guard.should_stop()

    # --- pieces ---------------------------------------------------------------------------
    def _check_finite(self, window, step) -> None:
        """Host sync: a non-finite loss since the last check stops the run (nan_policy=stop)."""
        if window is None or self.config.train.nan_policy != "stop":
            return
        found = window.first_nonfinite(step)
        if found is None:
            return
        first_bad, tasks = found
        what = f"tasks: {', '.join(tasks)}" if tasks else "the gradient norm"
        self.ckpt.wait()
        good = self.ckpt.latest_step()
        kept = (f"the last good checkpoint is step {good} in {self.ckpt.directory}" if good
                else "no checkpoint was written yet")
        raise NonFiniteLoss(f"loss is not finite at step {first_bad} ({what}); stopped, "
                            f"{kept}; lower optim.lr or set train.nan_policy=skip")

    def _log(self, step, window: DeviceWindow, host: HostWindow, bar) -> None:
        out = {**window.read(host, self.task_names, self.peak), **self.mixing_target}
        self.writer.write(step, out)
        bar.report(step, loss=out.get("train/loss", math.nan),
                   examples_per_s=out["train/examples_per_s"],
                   steps_per_s=out["train/steps_per_s"])

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
        self.ckpt.save(step, self.run.strategy.saved(state), data_state=self.it.get_state(),
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
        beside = published.published_table(run.config.eval.published, final)
        if beside:
            print("\n" + beside, flush=True)
    return record


# --- small helpers ----------------------------------------------------------------------------

def _say(message: str) -> None:
    """One line on stderr; through tqdm so that a live progress bar is redrawn below it, not
    overwritten by it."""
    import tqdm

    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()


def _say_summary(run, state) -> None:
    if jax.process_index() == 0:
        print(run.model.summary(run.strategy.saved(state).params), flush=True)


def _floats(metrics) -> dict:
    return {task: {k: float(v) for k, v in m.items()} for task, m in metrics.items()}
