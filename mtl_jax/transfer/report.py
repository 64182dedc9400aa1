"""The report, from ``DIR/transfer.json`` alone: ``DIR/report.md`` (per task a table: a row per
starting point, a column per k, each cell ``mean ± std (n seeds)`` of the primary metric x100)
and its plot; and ``--publish``."""
from __future__ import annotations

import os
import shutil
from typing import Mapping, Sequence

import numpy as np

from mtl_jax.compare.plan import read_json
from mtl_jax.errors import UserError
from mtl_jax.training.workdir import write_json
from mtl_jax.transfer.plan import ALL, CELL_FACTS, CELLS_DIR, PRETRAINED, RECORD
from mtl_jax.transfer.plots import TRANSFER_PLOT, plot_transfer

REPORT = "report.md"
PUBLISHED_FILES = ("results.json", "metrics.jsonl", CELL_FACTS)  # per cell: small files only

Grouped = dict  # task -> start label -> k -> [values, in seed order]


def read_record(workdir: str) -> dict:
    record = read_json(os.path.join(workdir, RECORD))
    if record is None or not isinstance(record.get("cells"), dict):
        raise UserError(f"{os.path.join(workdir, RECORD)} not found (or not a transfer record); "
                        f"run the study first, or copy a published {RECORD} into {workdir}")
    return record


def group(cells: Mapping[str, dict], field: str = "value") -> Grouped:
    """task -> start -> k -> the cells' ``field`` (value, n_train) over seeds (in seed order)."""
    out: Grouped = {}
    for entry in sorted(cells.values(), key=lambda e: e["seed"]):
        by_k = out.setdefault(entry["task"], {}).setdefault(entry["start"], {})
        by_k.setdefault(entry["k"], []).append(float(entry[field]))
    return out


def k_order(ks) -> list:
    """Integer k ascending, then ``all``."""
    return sorted(k for k in set(ks) if k != ALL) + [ALL] * (ALL in ks)


def start_order(labels) -> list[str]:
    """``pretrained`` first, then the other starting points by name."""
    return [PRETRAINED] * (PRETRAINED in labels) + sorted(s for s in labels if s != PRETRAINED)


def full_sizes(cells: Mapping[str, dict]) -> dict[str, int]:
    """task -> the train size of its ``all`` cells (where ``all`` lies on the k axis)."""
    return {e["task"]: int(e["n_train"]) for e in cells.values() if e["k"] == ALL}


def summary(values: Sequence[float]) -> str:
    """``mean ± std (n seeds)`` x100; the sample standard deviation (ddof=1)."""
    if not values:
        return "-"
    mean = 100 * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.2f} (1 seed)"
    return f"{mean:.2f} ± {100 * float(np.std(values, ddof=1)):.2f} ({len(values)} seeds)"


def task_table(by_start: Mapping[str, dict], full_size: int | None = None) -> str:
    """One task's markdown table: a row per starting point, a column per k."""
    ks = k_order([k for by_k in by_start.values() for k in by_k])
    head = ["start", *[f"{ALL} (n={full_size})" if k == ALL and full_size else f"k={k}"
                       for k in ks]]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(ks)]
    for start in start_order(by_start):
        cells = [summary(by_start[start].get(k, [])) for k in ks]
        lines.append("| " + " | ".join([f"`{start}`", *cells]) + " |")
    return "\n".join(lines)


def _point(k, values: list, n_train: list) -> tuple:
    """(x, tick label, values) of one k: x is the number of train examples the cells trained on
    (mean over seeds; k per class times the classes, fewer where a class has fewer than k)."""
    return float(np.mean(n_train)), ALL if k == ALL else f"k={k}", values


def plot_series(grouped: Grouped, n_train: Grouped) -> dict:
    """task -> [(start, [(x, tick label, values over seeds)])], for plots.plot_transfer;
    ``n_train``: ``group(cells, "n_train")``."""
    return {task: [(start, [_point(k, by_start[start][k], n_train[task][start][k])
                            for k in k_order(by_start[start])])
                   for start in start_order(by_start)]
            for task, by_start in grouped.items()}


def _split_text(split: str) -> str:
    if split == "test":
        return ("evaluated on the whole **test** split: the dataset has no validation split, so "
                "its test file is mapped in as the run's evaluated split")
    return "evaluated on the whole validation split"


def write_report(workdir: str) -> str:
    """DIR/report.md and DIR/transfer.png from DIR/transfer.json; returns the report's path."""
    record = read_record(workdir)
    protocol, cells = record.get("protocol", {}), record["cells"]
    metrics, evaluated = protocol.get("metrics", {}), protocol.get("evaluated", {})
    grouped, sizes = group(cells), full_sizes(cells)
    tasks = [t for t in metrics if t in grouped] + sorted(t for t in grouped if t not in metrics)
    lines = [
        "# Few-shot transfer", "",
        "Each cell: the task's primary metric x100 at the end of training, as mean ± sample "
        "standard deviation over the seeds run (n seeds). Rows: the starting point; columns: k "
        f"train examples per class, `{ALL}` = the whole train split (n examples).", "",
        f"Protocol: {protocol.get('text', '(not recorded)')}", "",
    ]
    for task in tasks:
        metric = metrics.get(task) or next(e["metric"] for e in cells.values()
                                           if e["task"] == task)
        lines += [f"## {task} ({metric}; {_split_text(evaluated.get(task, 'validation'))})", "",
                  task_table(grouped[task], sizes.get(task)), ""]
    if tasks:
        plot_transfer(plot_series({t: grouped[t] for t in tasks}, group(cells, "n_train")),
                      metrics, os.path.join(workdir, TRANSFER_PLOT))
        lines += [f"![metric against the number of train examples]({TRANSFER_PLOT})", ""]
    lines += ["## Starting points", "", f"- `{PRETRAINED}`: the plain encoder (no init_from)"]
    starts = {e["start"]: e.get("from", "") for e in cells.values() if e["start"] != PRETRAINED}
    lines += [f"- `{label}`: `--from={given}`" for label, given in sorted(starts.items())]
    path = os.path.join(workdir, REPORT)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def publish(workdir: str, dest: str) -> str:
    """Copies DIR's record (merged into DEST's, when DEST has one) and each recorded cell's small
    files (no checkpoints, no logs) to DEST, then writes DEST/report.md and its plot from the
    copies. A new DIR seeded with ``cp DEST/transfer.json DIR2/`` resumes: its cells are skipped."""
    record = read_record(workdir)
    old = read_json(os.path.join(dest, RECORD)) or {}
    before, now = old.get("protocol", {}), record.get("protocol", {})
    protocol = {**before, **now}
    for key in ("metrics", "evaluated"):  # per task: DEST may hold tasks DIR did not run
        protocol[key] = {**before.get(key, {}), **now.get(key, {})}
    merged = {"protocol": protocol, "cells": {**old.get("cells", {}), **record["cells"]}}
    for name in record["cells"]:
        src, out = os.path.join(workdir, CELLS_DIR, name), os.path.join(dest, CELLS_DIR, name)
        for file in PUBLISHED_FILES:
            if os.path.isfile(os.path.join(src, file)):
                os.makedirs(out, exist_ok=True)
                shutil.copyfile(os.path.join(src, file), os.path.join(out, file))
    os.makedirs(dest, exist_ok=True)
    write_json(os.path.join(dest, RECORD), merged)
    return write_report(dest)


def section(workdir: str, report_dir: str) -> str:
    """The study in ``workdir`` as a section of another report in ``report_dir`` (the
    comparison's, docs/results.md): its report refreshed, headings one level down, the plot
    linked relative to ``report_dir``."""
    write_report(workdir)
    with open(os.path.join(workdir, REPORT), encoding="utf-8") as f:
        text = f.read()
    plot = os.path.relpath(os.path.join(workdir, TRANSFER_PLOT), report_dir)
    return "\n".join(("#" + line if line.startswith("#") else line).replace(
        f"]({TRANSFER_PLOT})", f"]({plot})") for line in text.splitlines())
