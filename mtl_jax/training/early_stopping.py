"""Early stopping (and best-checkpoint selection) on one configured evaluation metric.

``train.early_stopping_metric`` is either one task's metric (``"rte/accuracy"``) or ``"mean"``:
the mean over tasks of each task's primary metric. The state is an immutable, JSON-serializable
value; ``update`` returns a new one, so it is easy to checkpoint (``state_dict``) and test.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from mtl_jax.errors import UserError

MEAN = "mean"


def select_metric(eval_metrics: Mapping[str, Mapping[str, float]], metric: str,
                  primary: Mapping[str, str] | None = None) -> float:
    """The value early stopping watches.

    ``eval_metrics``: ``{task: {metric_name: value}}`` from one evaluation; ``primary``:
    ``{task: primary metric name}`` (needed for ``"mean"``).
    """
    if metric == MEAN:
        primary = primary or {}
        missing = sorted(set(eval_metrics) - set(primary))
        if missing:
            raise UserError(f"no primary metric known for task(s) {', '.join(missing)}; set "
                            "--config.train.early_stopping_metric=TASK/METRIC instead of 'mean'")
        values = [float(eval_metrics[t][primary[t]]) for t in sorted(eval_metrics)]
        return sum(values) / len(values)
    task, _, name = metric.partition("/")
    if task not in eval_metrics or name not in eval_metrics[task]:
        valid = [f"{t}/{m}" for t in sorted(eval_metrics) for m in sorted(eval_metrics[t])]
        raise UserError(f"unknown train.early_stopping_metric {metric!r}; valid: mean, "
                        f"{', '.join(valid)}")
    return float(eval_metrics[task][name])


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Best value/step so far and evaluations since the last improvement.

    ``patience``: evaluations without improvement before stopping (0 = never stop).
    ``mode``: "max" or "min"; ``min_delta``: an improvement must beat the best by more.
    """

    metric: str = MEAN
    patience: int = 0
    mode: str = "max"
    min_delta: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise UserError(f"train.early_stopping_mode must be 'max' or 'min', got {self.mode!r}")
        if self.patience < 0:
            raise UserError(f"train.early_stopping_patience must be >= 0, got {self.patience}")

    @classmethod
    def from_config(cls, config) -> "EarlyStopping":
        t = config.train
        return cls(metric=t.early_stopping_metric, patience=t.early_stopping_patience,
                   mode=t.early_stopping_mode, min_delta=t.early_stopping_min_delta)

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update(self, step: int, value: float) -> "EarlyStopping":
        """The state after an evaluation at ``step`` scored ``value``."""
        if self.is_improvement(value):
            return dataclasses.replace(self, best_value=float(value), best_step=int(step),
                                       evals_without_improvement=0)
        return dataclasses.replace(
            self, evals_without_improvement=self.evals_without_improvement + 1)

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_without_improvement >= self.patience

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}

    def restore(self, state: Mapping | None) -> "EarlyStopping":
        """This configuration with the progress saved by ``state_dict`` (None: unchanged)."""
        if not state:
            return self
        return dataclasses.replace(
            self, best_value=state["best_value"], best_step=state["best_step"],
            evals_without_improvement=int(state["evals_without_improvement"]))
