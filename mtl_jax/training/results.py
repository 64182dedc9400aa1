"""End-of-run results: ``results.json`` (machine-readable) and ``results.md`` (for people).

``results.md`` has one table per task (metric | final | best) followed by the task's report text
(seqeval / classification report) as given by the evaluation.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

Metrics = Mapping[str, Mapping[str, float]]  # task -> metric name -> value

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def write_results(workdir: str, final: Metrics, *, final_step: int, best: Metrics | None = None,
                  best_step: int | None = None, reports: Mapping[str, str] | None = None,
                  extra: Mapping | None = None) -> tuple[str, str]:
    """Writes both files (process 0's job); returns their paths.

    ``final``: metrics of the last evaluation; ``best``: of the best evaluation by the
    early-stopping metric (at ``best_step``); ``reports``: task -> report text;
    ``extra``: run facts for the JSON (selection metric, examples/s, ...).
    """
    os.makedirs(workdir, exist_ok=True)
    best = best or {}
    record = {
        "final_step": int(final_step),
        "best_step": None if best_step is None else int(best_step),
        "final": _floats(final),
        "best": _floats(best),
        **dict(extra or {}),
    }
    json_path = os.path.join(workdir, RESULTS_JSON)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    md_path = os.path.join(workdir, RESULTS_MD)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(results_markdown(final, final_step=final_step, best=best, best_step=best_step,
                                 reports=reports))
    return json_path, md_path


def results_markdown(final: Metrics, *, final_step: int, best: Metrics | None = None,
                     best_step: int | None = None, reports: Mapping[str, str] | None = None) -> str:
    best, reports = best or {}, reports or {}
    lines = ["# Results", ""]
    for task in sorted(set(final) | set(best)):
        best_col = f"best (step {best_step})" if best_step is not None else "best"
        lines += [f"## {task}", "", f"| metric | final (step {final_step}) | {best_col} |",
                  "| --- | ---: | ---: |"]
        names = sorted(set(final.get(task, {})) | set(best.get(task, {})))
        for name in names:
            lines.append(f"| {name} | {cell(final.get(task, {}).get(name))} | "
                         f"{cell(best.get(task, {}).get(name))} |")
        if reports.get(task):
            lines += ["", "```", reports[task].rstrip(), "```"]
        lines.append("")
    return "\n".join(lines)


def cell(value) -> str:
    """A metric as table text (4 decimals; '-' when absent)."""
    return "-" if value is None else f"{float(value):.4f}"


def _floats(metrics: Metrics) -> dict:
    return {task: {name: float(v) for name, v in values.items()}
            for task, values in metrics.items()}
