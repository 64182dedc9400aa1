"""The train metrics of one log window: summed on the device between log steps (no host sync per
step), counted on the host from the NumPy batches, read into the logged means at a log step.

    window, host = None, HostWindow()
    every step     window = (window or DeviceWindow.empty(metrics, num_tasks)).add(
                       metrics, step, task_presence(batch, num_tasks))
                   host.add(batch, cost.per_example)
    a check        window.first_nonfinite() -> None | (first bad step, its bad tasks)
    a log step     window.read(host, task_names, peak_flops) -> {"train/loss": mean, ...,
                       "train/examples_per_s": ..., "train/skipped_steps": ... if any}

A non-finite step (``metrics["train/finite"]`` false) is counted, not summed: the means are over
the finite steps, a task's loss over the finite steps whose batch had that task.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.training import flops

FINITE = "train/finite"  # the step's own flag; never summed
TASK_LOSS = "train/loss/"


def task_of(key: str) -> str | None:
    """``"train/loss/sst2"`` -> ``"sst2"``; None for a metric that is not a task's loss."""
    return key[len(TASK_LOSS):] if key.startswith(TASK_LOSS) else None


def task_presence(batch: Mapping, num_tasks: int) -> np.ndarray:
    """int32 [num_tasks]: 1 where the (host) batch has a real example of the task."""
    real = np.asarray(batch["weight"]).reshape(-1) > 0
    ids = np.asarray(batch["task_id"]).reshape(-1)[real]
    return np.isin(np.arange(num_tasks), ids).astype(np.int32)


@flax.struct.dataclass
class DeviceWindow:
    """Device sums of the step metrics since the last log step (a pytree of device arrays)."""

    sums: dict  # metric -> float32 sum over the finite steps
    bad: dict  # task-loss metric -> bool: non-finite at the first non-finite step
    present: jax.Array  # int32 [T]: finite steps whose batch had task t
    first_bad: jax.Array  # int32: the first non-finite step, -1 if none
    nonfinite: jax.Array  # int32: non-finite steps

    @classmethod
    def empty(cls, metrics: Mapping, num_tasks: int) -> "DeviceWindow":
        """Zeros for ``metrics``' keys, placed where the metrics are (an explicit transfer)."""
        zeros = cls(sums={k: np.zeros([], np.float32) for k in metrics if k != FINITE},
                    bad={k: np.zeros([], bool) for k in metrics if task_of(k)},
                    present=np.zeros([num_tasks], np.int32),
                    first_bad=np.asarray(-1, np.int32), nonfinite=np.asarray(0, np.int32))
        return jax.device_put(zeros, _placement(metrics))

    def add(self, metrics: Mapping, step: int, task_present: np.ndarray) -> "DeviceWindow":
        """The window with step ``step``'s metrics added. The host values are put beside the
        metrics explicitly: nothing moves implicitly into the jitted sum."""
        step, task_present = jax.device_put((np.int32(step), np.asarray(task_present, np.int32)),
                                            _placement(metrics))
        return _add(self, dict(metrics), step, task_present)

    def first_nonfinite(self) -> tuple[int, list[str]] | None:
        """None when every step was finite, else (the first non-finite step, the tasks whose
        loss was non-finite at it; empty: only the gradient norm was). A host sync."""
        nonfinite, first_bad, bad = jax.device_get((self.nonfinite, self.first_bad, self.bad))
        if not nonfinite:
            return None
        return int(first_bad), sorted(task_of(k) for k, v in bad.items() if v)

    def read(self, host: "HostWindow", task_names: list[str],
             peak_flops: float | None) -> dict[str, float]:
        """What a log step writes (one device_get): each metric's mean over the window's finite
        steps (a task's loss over the finite steps that had the task; no means when every step
        was skipped), the host's rates, and ``train/skipped_steps`` when any step was skipped."""
        w = jax.device_get(self)
        good = host.steps - int(w.nonfinite)
        out = {}
        for key, total in (w.sums.items() if good else ()):
            task = task_of(key)
            if task is None:
                out[key] = float(total) / good
            elif w.present[task_names.index(task)]:
                out[key] = float(total) / int(w.present[task_names.index(task)])
        out.update(host.rates(peak_flops))
        if int(w.nonfinite):
            out["train/skipped_steps"] = float(w.nonfinite)
        return out


@jax.jit
def _add(window: DeviceWindow, metrics: dict, step, task_present) -> DeviceWindow:
    finite = metrics[FINITE]
    sums = {k: window.sums[k] + jnp.where(finite, v.astype(jnp.float32), 0.0)
            for k, v in metrics.items() if k != FINITE}
    first = (window.first_bad < 0) & ~finite  # the tasks named are those of the first bad step
    bad = {k: jnp.where(first, ~jnp.isfinite(metrics[k]), window.bad[k]) for k in window.bad}
    return DeviceWindow(sums=sums, bad=bad, present=window.present + (task_present & finite),
                        first_bad=jnp.where(first, step, window.first_bad),
                        nonfinite=window.nonfinite + (~finite).astype(jnp.int32))


def _placement(metrics: Mapping):
    """Where the step put its metrics (None, the default device, for host values)."""
    return getattr(metrics["train/loss"], "sharding", None)


@dataclasses.dataclass
class HostWindow:
    """What the host counts between log steps (from the NumPy batches: no device sync)."""

    steps: int = 0
    examples: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    paused: float = 0.0  # seconds spent evaluating/checkpointing, not training
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, batch: Mapping, flops_per_example: Callable[[int], float]) -> None:
        """Counts one step's host batch (this process's rows; every process has as many)."""
        real = np.asarray(batch["weight"]) > 0
        length = np.shape(batch["input_ids"])[-1]
        n = float(real.sum()) * jax.process_count()
        self.steps += 1
        self.examples += n
        self.tokens += float(np.asarray(batch["attention_mask"])[real].sum()) * \
            jax.process_count()
        self.flops += n * flops_per_example(length)

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start - self.paused, 1e-9)

    def rates(self, peak_flops: float | None) -> dict[str, float]:
        """examples/tokens/steps per second of training time, and the MFU when the peak is
        known."""
        seconds = self.seconds()
        out = {"train/examples_per_s": self.examples / seconds,
               "train/tokens_per_s": self.tokens / seconds,
               "train/steps_per_s": self.steps / seconds}
        mfu = flops.mfu(self.examples / seconds, self.flops / max(self.examples, 1.0), peak_flops,
                        jax.device_count())
        if mfu is not None:
            out["train/mfu"] = mfu
        return out
