"""Evaluate every task of a run with the jitted eval step; the results table and eval files."""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import jax

from mtl_jax.evaluation.evaluate import evaluate_task
from mtl_jax.tasks.definitions import task_definitions
from mtl_jax.training.results import cell

Metrics = Mapping[str, Mapping[str, float]]  # task -> metric name -> value

# Metric registry name -> the key of its result that ranks a task ("mean" early stopping).
# Metrics not listed rank by their own name (accuracy, matthews_corrcoef, pearson, ...).
PRIMARY_KEY = {"seqeval": "f1", "squad": "f1"}
EVAL_RESULTS = "eval_results.json"


def primary_metrics(config) -> dict[str, str]:
    """task -> the metric its score in "mean" comes from: the first of the task's metrics."""
    out = {}
    for task, definition in task_definitions(config).items():
        if definition.metrics:
            first = definition.metrics[0]
            out[task] = PRIMARY_KEY.get(first, first)
    return out


def evaluate(run, state, tasks: Sequence[str] | None = None):
    """({task: metrics}, {task: report}) on each task's validation split."""
    tasks = run.data.eval_tasks() if tasks is None else tasks
    metrics, reports = {}, {}
    batch_size = run.config.eval.batch_size
    for task in tasks:
        metrics[task], reports[task] = evaluate_task(run.data.eval_data(task),
                                                     run.predict_fn(state, task), batch_size)
    return metrics, reports


def results_table(final: Metrics, *, final_step: int, best: Metrics | None = None,
                  best_step: int | None = None) -> str:
    """A plain-text table: task | metric | final [| best]."""
    best = best or {}
    header = ["task", "metric", f"final (step {final_step})"]
    if best:
        header.append(f"best (step {best_step})")
    rows = [header]
    for task in sorted(set(final) | set(best)):
        for name in sorted(set(final.get(task, {})) | set(best.get(task, {}))):
            row = [task, name, cell(final.get(task, {}).get(name))]
            if best:
                row.append(cell(best.get(task, {}).get(name)))
            rows.append(row)
    return plain_table(rows)


def plain_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of text cells as aligned columns (the first two left, the rest right), the first
    row a header underlined with dashes."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_eval_results(workdir: str, step: int, which: str, metrics: Metrics,
                       reports: Mapping[str, str]) -> str | None:
    """``WORKDIR/eval_results.json`` of an eval-mode run (process 0)."""
    if jax.process_index() != 0:
        return None
    path = os.path.join(workdir, EVAL_RESULTS)
    record = {"step": int(step), "checkpoint": which,
              "metrics": {t: {k: float(v) for k, v in m.items()} for t, m in metrics.items()},
              "reports": dict(reports)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    return path
