"""Training/eval metrics to ``WORKDIR/metrics.jsonl`` and TensorBoard event files (tensorboardX).

One JSON object per event: ``{"step": 100, "train/loss": 0.41, "train/loss/sst2": 0.38, ...}``;
nested dicts are flattened with "/" (``{"eval": {"sst2": {"accuracy": .9}}}`` ->
``eval/sst2/accuracy``) and every value becomes a Python float. On resume the writer drops what
the interrupted run logged after the restored step, so no step appears twice.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metric dicts -> ``{"a/b/c": float}``; device/NumPy scalars become floats."""
    flat = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, key + "/"))
        else:
            flat[key] = float(np.asarray(value))  # one host transfer per scalar
    return flat


class MetricsWriter:
    """Appends metric events to metrics.jsonl and TensorBoard; only process 0 writes.

    ``resume_step``: the step the run restored from. Events the earlier run logged after it are
    dropped (metrics.jsonl is rewritten, TensorBoard gets a purge marker); None (a fresh start)
    drops everything an earlier run left in this workdir.
    """

    def __init__(self, workdir: str, resume_step: int | None = None, *,
                 enabled: bool | None = None, tensorboard: bool = True):
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _truncate_after(self.path, -1 if resume_step is None else resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = 0 if resume_step is None else resume_step + 1
            # tensorboardX names a file by the second it was opened in: a sitting started within
            # the same second as the one before would overwrite that one's file. The suffix keeps
            # every sitting's file, in the order TensorBoard reads them (by name).
            self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=purge,
                                     flush_secs=30, filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Logs one event; returns the flat float dict that was written."""
        flat = flatten_metrics(metrics)
        if not self.enabled:
            return flat
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **flat}) + "\n")
        if self._tb is not None:
            for key, value in flat.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, global_step=int(step))
        return flat

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A text block (e.g. a classification report) for TensorBoard's text tab."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, f"```\n{text}\n```", global_step=int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str) -> list[dict]:
    """The events of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    if not os.path.exists(path):
        return []
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def _truncate_after(path: str, step: int) -> None:
    """Rewrites ``path`` keeping only the events with ``event["step"] <= step``."""
    if not os.path.exists(path):
        return
    kept = [e for e in read_metrics(path) if e.get("step", -1) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in kept)
    os.replace(tmp, path)  # atomic: a crash here leaves the old or the new file, never half
