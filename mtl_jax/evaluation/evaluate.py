"""``evaluate_task``: run a head over every example of a split once and score it."""
from __future__ import annotations

from typing import Callable

import numpy as np

from mtl_jax.evaluation.metrics import compute_metrics
from mtl_jax.evaluation.reports import build_report


def collect_outputs(task_data, predict_fn: Callable[[dict], np.ndarray],
                    batch_size: int) -> list[np.ndarray]:
    """Per-feature head outputs in feature order; per-token outputs trimmed to the
    feature's length."""
    lengths = task_data.features.lengths
    outputs: list = [None] * len(lengths)
    for indices, batch in task_data.batches(batch_size):
        out = np.asarray(predict_fn(batch))
        for row, feature in enumerate(indices):  # rows past len(indices) are padding (weight 0)
            outputs[feature] = out[row, :lengths[feature]] if out.ndim == 3 else out[row]
    return outputs


def evaluate_task(task_data, predict_fn: Callable[[dict], np.ndarray],
                  batch_size: int) -> tuple[dict, str]:
    """(metrics with bare names, e.g. {"accuracy": 0.91}, report text)."""
    outputs = collect_outputs(task_data, predict_fn, batch_size)
    spec, definition = task_data.spec, task_data.definition
    scored = task_data.task_type.postprocess(task_data.examples, task_data.features, outputs,
                                             definition, spec.label_names)
    metrics = compute_metrics(definition.metrics, scored["predictions"], scored["references"])
    report = build_report(spec.type, scored["predictions"], scored["references"], spec.label_names,
                          metrics)
    return metrics, report


def namespaced(metrics: dict, task: str, prefix: str = "eval") -> dict:
    """{"accuracy": x} -> {"eval/<task>/accuracy": x}."""
    return {f"{prefix}/{task}/{name}": value for name, value in metrics.items()}
