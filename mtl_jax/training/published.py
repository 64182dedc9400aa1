"""The figures of a published comparison (``mtl_jax.compare --publish``) beside a run's results.

A newcomer's short run means little alone: ``eval.published = "docs/results"`` prints, under the
results table, what the comparison protocol's runs reached on the same tasks and metrics
(single-task and hard sharing with mtl_jax, the Hugging Face PyTorch reference), read from the
committed ``runs/<setup>/results.json`` and ``reference/<task>/results.json``.
"""
from __future__ import annotations

import json
import pathlib
from typing import Mapping

from mtl_jax.tasks.definitions import resolve_path
from mtl_jax.training.evaluate_loop import plain_table
from mtl_jax.training.results import cell

# (column, results.json below the published folder; {task} is filled in)
SOURCES = (("single-task", "runs/single_{task}/results.json"),
           ("hard sharing", "runs/hard/results.json"),
           ("HF reference", "reference/{task}/results.json"))


def published_values(folder: pathlib.Path, task: str) -> dict[str, Mapping[str, float]]:
    """column -> {metric: final value} of ``task`` in each published run that has it."""
    out = {}
    for column, pattern in SOURCES:
        path = folder / pattern.format(task=task)
        if path.is_file():
            final = json.loads(path.read_text()).get("final", {}).get(task)
            if final:
                out[column] = final
    return out


def published_table(folder: str, final: Mapping[str, Mapping[str, float]]) -> str:
    """The run's final metrics beside the published ones (rows where one was published), or a
    line saying why there is no table; "" when ``folder`` is ""."""
    if not folder:
        return ""
    root = resolve_path(folder)
    if not root.is_dir():
        return f"(eval.published={folder!r}: no such folder, so no published figures to compare)"
    header = ["task", "metric", "this run", *(c for c, _ in SOURCES)]
    rows = [header]
    for task in sorted(final):
        values = published_values(root, task)
        for name in sorted(final[task]):
            cells = [values.get(c, {}).get(name) for c, _ in SOURCES]
            if any(v is not None for v in cells):
                rows.append([task, name, cell(final[task][name]), *map(cell, cells)])
    if len(rows) == 1:
        return f"(eval.published={folder!r} has no figures for this run's tasks)"
    return (f"Published figures ({folder}; the comparison protocol: 3 epochs of each task, see "
            f"{folder}.md):\n" + plain_table(rows))
