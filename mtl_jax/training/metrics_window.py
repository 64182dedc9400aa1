"""The train metrics of one log window: summed on the device between log steps (no host sync per
step, no host value sent to the device either), counted on the host from the NumPy batches,
read into the logged means at a log step.

    window, host = None, HostWindow()
    every step     window = (window or DeviceWindow.empty(metrics)).add(metrics)
                   host.add(batch, cost.per_example)
    a check        window.first_nonfinite(last_step) -> None | (first bad step, its bad tasks)
    a log step     window.read(host, task_names, peak_flops) -> {"train/loss": mean, ...,
                       "train/examples_per_s": ..., "train/skipped_steps": ... if any,
                       "train/padding_fraction[/<task>]": ..., "train/mixing/<task>": ...}

A non-finite step (``metrics["train/finite"]`` false) is counted, not summed: the means are over
the finite steps, a task's loss over the finite steps whose batch had that task (the step's
``metrics["train/present"]``: the global batch had an example of the task).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.training import flops

FINITE = "train/finite"  # the step's own flag; never summed
PRESENT = "train/present"  # bool [T]: the step's global batch had task t; never summed
NOT_SUMMED = (FINITE, PRESENT)
TASK_LOSS = "train/loss/"


def task_of(key: str) -> str | None:
    """``"train/loss/sst2"`` -> ``"sst2"``; None for a metric that is not a task's loss."""
    return key[len(TASK_LOSS):] if key.startswith(TASK_LOSS) else None


@flax.struct.dataclass
class DeviceWindow:
    """Device sums of the step metrics since the last log step (a pytree of device arrays)."""

    sums: dict  # metric -> float32 sum over the finite steps
    bad: dict  # task-loss metric -> bool: non-finite at the first non-finite step
    present: jax.Array  # int32 [T]: finite steps whose batch had task t
    steps: jax.Array  # int32: steps added
    first_bad: jax.Array  # int32: index (0 = the window's first step) of the first non-finite
    nonfinite: jax.Array  # int32: non-finite steps

    @classmethod
    def empty(cls, metrics: Mapping) -> "DeviceWindow":
        """Zeros for ``metrics``' keys, made on the devices where the metrics are."""
        return _empty_on(metrics[FINITE].sharding)(dict(metrics))

    def add(self, metrics: Mapping) -> "DeviceWindow":
        """The window with one more step's metrics (device arrays only: nothing crosses)."""
        return _add(self, dict(metrics))

    def first_nonfinite(self, last_step: int) -> tuple[int, list[str]] | None:
        """None when every step was finite, else (the first non-finite step, the tasks whose
        loss was non-finite at it; empty: only the gradient norm was). ``last_step``: the step
        added last. A host sync."""
        nonfinite, steps, first_bad, bad = jax.device_get(
            (self.nonfinite, self.steps, self.first_bad, self.bad))
        if not nonfinite:
            return None
        step = last_step - int(steps) + 1 + int(first_bad)
        return step, sorted(task_of(k) for k, v in bad.items() if v)

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
        out.update(host.task_fractions(task_names))
        if int(w.nonfinite):
            out["train/skipped_steps"] = float(w.nonfinite)
        return out


@functools.lru_cache(maxsize=None)
def _empty_on(sharding) -> Callable[[dict], "DeviceWindow"]:
    # Constants made inside jit land on the default device unless told otherwise: out_shardings
    # puts the zeros beside the metrics, so the first _add moves nothing.
    return jax.jit(_empty, out_shardings=sharding)


def _empty(metrics: dict) -> DeviceWindow:
    zero = jnp.zeros([], jnp.int32)
    return DeviceWindow(
        sums={k: jnp.zeros([], jnp.float32) for k in metrics if k not in NOT_SUMMED},
        bad={k: jnp.zeros([], bool) for k in metrics if task_of(k)},
        present=jnp.zeros(metrics[PRESENT].shape, jnp.int32), steps=zero,
        first_bad=zero - 1, nonfinite=zero)


@jax.jit
def _add(window: DeviceWindow, metrics: dict) -> DeviceWindow:
    finite = metrics[FINITE]
    sums = {k: window.sums[k] + jnp.where(finite, v.astype(jnp.float32), 0.0)
            for k, v in metrics.items() if k not in NOT_SUMMED}
    first = (window.first_bad < 0) & ~finite  # the tasks named are those of the first bad step
    bad = {k: jnp.where(first, ~jnp.isfinite(metrics[k]), window.bad[k]) for k in window.bad}
    present = window.present + (metrics[PRESENT] & finite).astype(jnp.int32)
    return DeviceWindow(sums=sums, bad=bad, present=present, steps=window.steps + 1,
                        first_bad=jnp.where(first, window.steps, window.first_bad),
                        nonfinite=window.nonfinite + (~finite).astype(jnp.int32))


@dataclasses.dataclass
class HostWindow:
    """What the host counts between log steps (from the NumPy batches: no device sync)."""

    steps: int = 0
    examples: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    paused: float = 0.0  # seconds spent evaluating/checkpointing, not training
    start: float = dataclasses.field(default_factory=time.perf_counter)
    # Per task id (grown to the largest id seen), over this process's real rows: the rows, their
    # token slots at the bucketed length fed to the model (every choice slot), the pad slots.
    task_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    task_slots: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    task_pads: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    # Packed batches (data/packing.py): the rows' token slots and pad slots. A row holds several
    # tasks' examples, so there is no per-task padding; mixing is counted per example as above.
    packed_slots: float = 0.0
    packed_pads: float = 0.0

    def add(self, batch: Mapping, flops_per_example: Callable[[int], float]) -> None:
        """Counts one step's host batch (this process's rows; every process has as many). Any
        layout: [B], stacked [T, b] or episode [K, S', b] rows; ``meta/`` held-out rows are not
        trained on and not counted."""
        real = np.asarray(batch["weight"]).reshape(-1) > 0
        mask = np.asarray(batch["attention_mask"]).reshape(real.size, -1)[real]
        tokens = mask.sum(-1, dtype=np.float64)  # [real rows]
        n = float(real.sum()) * jax.process_count()
        self.steps += 1
        self.examples += n
        self.tokens += float(tokens.sum()) * jax.process_count()
        task_ids = np.asarray(batch["task_id"]).reshape(-1)[real]
        if "packed_segment_ids" in batch:  # packed rows: what runs is R rows of Lp tokens
            rows, length = np.shape(batch["packed_segment_ids"])
            self.flops += rows * jax.process_count() * flops_per_example(length)
            self.packed_slots += float(rows * length)
            self.packed_pads += float(rows * length - tokens.sum())
            self._count_tasks(task_ids, tokens, 0)
            return
        length = np.shape(batch["input_ids"])[-1]
        self.flops += n * flops_per_example(length)
        self._count_tasks(task_ids, tokens, mask.shape[1])

    def _count_tasks(self, task_ids: np.ndarray, tokens: np.ndarray, slots: int) -> None:
        size = max(self.task_rows.size, int(task_ids.max(initial=-1)) + 1)
        count = functools.partial(np.bincount, task_ids, minlength=size)
        self.task_rows = _grown(self.task_rows, size) + count()
        self.task_slots = _grown(self.task_slots, size) + count() * float(slots)
        # slots 0 (packed rows): the examples count, no per-task slots or pads
        pads = count(weights=slots - tokens) if slots else count() * 0.0
        self.task_pads = _grown(self.task_pads, size) + pads

    def task_fractions(self, task_names: list[str]) -> dict[str, float]:
        """``train/mixing/<task>``: task t's share of the window's examples (0 when absent);
        ``train/padding_fraction[/<task>]``: pad slots / token slots of (task t's) rows.
        This process's rows: the mixing is the same on every process (each draws its rows'
        tasks from the same (seed, step)), the padding an estimate from 1/process_count of
        them, which needs no collective."""
        rows, slots, pads = (_grown(a, len(task_names))
                             for a in (self.task_rows, self.task_slots, self.task_pads))
        if not rows.sum():
            return {}
        total_slots, total_pads = slots.sum() + self.packed_slots, pads.sum() + self.packed_pads
        out = {"train/padding_fraction": float(total_pads / total_slots)}
        for name, n, s, p in zip(task_names, rows, slots, pads):
            out[f"train/mixing/{name}"] = float(n / rows.sum())
            if s:
                out[f"train/padding_fraction/{name}"] = float(p / s)
        return out

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


def _grown(counts: np.ndarray, size: int) -> np.ndarray:
    """``counts`` zero-padded to ``size`` entries (a window's first batches may lack the last
    task ids)."""
    return np.pad(counts.astype(np.float64), (0, size - counts.size))


def mixing_target(rates: Mapping[str, float]) -> dict[str, float]:
    """``train/mixing_target/<task>``: the proportions the data iterator draws tasks with,
    logged beside the realised ``train/mixing/<task>`` at every log step."""
    return {f"train/mixing_target/{name}": float(rate) for name, rate in rates.items()}
