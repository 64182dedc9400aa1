"""The report: each finished run's figures (from its results.json, metrics.jsonl and the driver's
compare.json only), the markdown tables and plots of ``DIR/report.md``, and ``--publish``."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Mapping, Sequence

from mtl_jax.compare.plan import (FINE_TUNE, RUN_FACTS, RUNS_DIR, SINGLE_COMBINED, SINGLE_PREFIX,
                                  fine_tune_row, fine_tune_source, mean_metric, read_json)
from mtl_jax.compare.plots import BAR_PLOT, CURVE_PLOT, PROGRESS_PLOT, plot_bars, plot_curves
from mtl_jax.errors import UserError
from mtl_jax.training.metrics_writer import read_metrics

REFERENCE_DIR = "reference"  # DIR/reference/<task>: bench/hf_reference.py's runs
REPORT = "report.md"
NOTES = "notes.md"  # DIR/notes.md: hand-written text the report starts with
PUBLISHED_FILES = ("results.json", "results.md", "metrics.jsonl", RUN_FACTS)
REFERENCE_ROW = "HF PyTorch single-task (reference)"


@dataclasses.dataclass
class RunSummary:
    """What the report shows of one run (or of several single-task runs combined)."""

    name: str
    final: dict  # task -> the task's primary metric at the end of training
    best: dict  # task -> the primary metric at the best evaluation
    trainable_params: float | None = None
    wall_s: float | None = None
    examples_s: float | None = None
    curves: dict = dataclasses.field(default_factory=dict)  # task -> [(step, value)]
    # task -> [(step / final step, value)]: every setup sees the same epochs of each task's data by
    # its last step, so this axis lines runs of different lengths up at equal data seen.
    progress: dict = dataclasses.field(default_factory=dict)
    overrides: dict = dataclasses.field(default_factory=dict)


def _median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def load_run(run_dir: str, name: str, metrics: Mapping[str, str]) -> RunSummary | None:
    """A run directory's summary (None until its results.json exists).

    Figures come from results.json (final/best metrics, and ``trainable_params`` /
    ``examples_per_s`` / ``wall_s`` when the job wrote them), else from the driver's compare.json
    (trainable parameters counted from the config, wall time of the launches) and metrics.jsonl
    (median of ``train/examples_per_s``: robust to the first interval, which includes compiling).
    """
    results = read_json(os.path.join(run_dir, "results.json"))
    if results is None:
        return None
    facts = read_json(os.path.join(run_dir, RUN_FACTS)) or {}
    events = read_metrics(os.path.join(run_dir, "metrics.jsonl"))

    def pick(source: dict) -> dict:
        return {t: float(source[t][m]) for t, m in metrics.items() if m in source.get(t, {})}

    curves = _curves(events, metrics)
    final_step = results.get("final_step")
    progress = ({t: [(step / final_step, v) for step, v in points] for t, points in curves.items()}
                if final_step else {})
    examples_s = results.get("examples_per_s")
    if examples_s is None:
        examples_s = _median([e.get("train/examples_per_s") for e in events])
    return RunSummary(
        name=name, final=pick(results.get("final", {})), best=pick(results.get("best", {})),
        trainable_params=results.get("trainable_params", facts.get("trainable_params")),
        wall_s=facts.get("wall_s", results.get("wall_s")), examples_s=examples_s, curves=curves,
        progress=progress, overrides=facts.get("overrides", {}))


def _curves(events: Sequence[dict], metrics: Mapping[str, str]) -> dict:
    """task -> [(step, validation metric)] from metrics.jsonl (the last value of a step wins)."""
    curves = {}
    for task, metric in metrics.items():
        by_step = {int(e["step"]): float(e[f"eval/{task}/{metric}"]) for e in events
                   if f"eval/{task}/{metric}" in e}
        if by_step:
            curves[task] = sorted(by_step.items())
    return curves


def combine(name: str, runs: Sequence[RunSummary]) -> RunSummary:
    """Several single-task runs as one row: each task from its own run; parameters and wall time
    summed (one model per task); examples/s the wall-time-weighted mean."""
    out = RunSummary(name, {}, {})
    for r in runs:
        out.final.update(r.final)
        out.best.update(r.best)
        out.curves.update(r.curves)
        out.progress.update(r.progress)
    if runs and all(r.trainable_params is not None for r in runs):
        out.trainable_params = sum(r.trainable_params for r in runs)
    if runs and all(r.wall_s is not None for r in runs):
        out.wall_s = sum(r.wall_s for r in runs)
        if all(r.examples_s is not None for r in runs) and out.wall_s > 0:
            out.examples_s = sum(r.examples_s * r.wall_s for r in runs) / out.wall_s
    return out


def collect_rows(workdir: str, metrics: Mapping[str, str],
                 order: Sequence[str] = ()) -> list[RunSummary]:
    """Every finished run under DIR/runs (``order`` first, then the rest by name), the combined
    single-task row after the last single-task run, a combined ``X → fine-tune`` row after the
    last fine-tune run of each setup X, and the reference row last."""
    runs_dir = os.path.join(workdir, RUNS_DIR)
    found = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
    names = [n for n in order if n in found] + [n for n in found if n not in order]
    rows, singles, fine_tunes = [], [], {}
    for name in names:
        run = load_run(os.path.join(runs_dir, name), name, metrics)
        if run is None:
            continue
        rows.append(run)
        if name.startswith(SINGLE_PREFIX):
            singles.append(run)
        elif fine_tune_source(name) is not None:
            fine_tunes.setdefault(fine_tune_source(name), []).append(run)
    if len(singles) > 1:
        at = rows.index(singles[-1]) + 1
        rows.insert(at, combine(SINGLE_COMBINED, singles))
    for source, runs in fine_tunes.items():  # even for one task: the row compared with X's
        at = next(i for i, r in enumerate(rows) if r is runs[-1]) + 1
        # No curves of its own: each fine-tune run already draws its task's line.
        rows.insert(at, dataclasses.replace(combine(fine_tune_row(source), runs), curves={},
                                            progress={}))
    reference = [load_run(os.path.join(workdir, REFERENCE_DIR, t), t, {t: m})
                 for t, m in metrics.items()]
    reference = [r for r in reference if r is not None]
    if reference:
        rows.append(combine(REFERENCE_ROW, reference))
    return rows


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _params(n) -> str:
    return "-" if n is None else f"{n / 1e6:.3g}M"


def _minutes(s) -> str:
    return "-" if s is None else f"{s / 60:.1f} min"


def _rate(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def table(rows: Sequence[RunSummary], metrics: Mapping[str, str], which: str = "final") -> str:
    """The markdown table: one row per setup, one column per task metric (x100), the mean,
    trainable parameters, wall time and examples/s."""
    tasks = list(metrics)
    head = ["setup", *[f"{t} {m}" for t, m in metrics.items()], "mean", "trainable params",
            "wall time", "examples/s"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in rows:
        values = getattr(r, which)
        cells = [r.name, *[_pct(values.get(t)) for t in tasks], _pct(mean_metric(values, tasks)),
                 _params(r.trainable_params), _minutes(r.wall_s), _rate(r.examples_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(workdir: str, metrics: Mapping[str, str], order: Sequence[str] = (),
                 report_path: str | None = None) -> str:
    """The report (default DIR/report.md) and its PNGs in DIR, from the run directories;
    ``DIR/notes.md`` (hand-written: protocol, commands, what it shows), when present, comes first.
    Returns the report's path."""
    os.makedirs(workdir, exist_ok=True)
    report_path = report_path or os.path.join(workdir, REPORT)
    rows = collect_rows(workdir, metrics, order)
    plot_bars(rows, metrics, os.path.join(workdir, BAR_PLOT))
    plot_curves(rows, metrics, os.path.join(workdir, CURVE_PLOT))
    plot_curves(rows, metrics, os.path.join(workdir, PROGRESS_PLOT), by_progress=True)
    report_dir = os.path.dirname(os.path.abspath(report_path))

    def link(name: str) -> str:
        return os.path.relpath(os.path.join(workdir, name), report_dir)

    notes = _read_text(os.path.join(workdir, NOTES))
    metric_names = ", ".join(f"{t} {m}" for t, m in metrics.items())
    lines = [
        "# Single-task vs multi-task vs PEFT", "",
        *([notes.strip(), ""] if notes else []),
        "## At the end of training", "",
        f"Validation metrics x100 at the end of training ({metric_names}); mean = unweighted mean "
        "over the tasks (only for rows with every task). Trainable parameters: every parameter for "
        "full fine-tuning (soft sharing: one encoder per task), heads + prefix/adapter/LoRA "
        "parameters for PEFT (the frozen encoder excluded). Wall time: the training "
        "job's launches end to end (data loading, compiling, evaluation included); examples/s: "
        "median of the job's logged training throughput. "
        f"`{SINGLE_COMBINED}` takes each task from its own single-task run (parameters and time "
        "summed)." + _fine_tune_legend(rows), "",
        table(rows, metrics, "final"), "",
        "## At the best evaluation (by the run's early-stopping metric)", "",
        table(rows, metrics, "best"), "",
        f"![metric by setup]({link(BAR_PLOT)})", "",
        f"![validation curves]({link(CURVE_PLOT)})", "",
        "The same curves against the share of each run's training steps: every setup has seen the "
        "same epochs of each task's data at the same point of this axis (multi-task runs: in "
        "expectation under proportional sampling).", "",
        f"![validation curves by progress]({link(PROGRESS_PLOT)})", "",
        "## Setups (config overrides of each run)", "",
    ]
    for r in rows:
        if r.overrides:
            lines.append(f"- `{r.name}`: "
                         + " ".join(f"`{k}={v}`" for k, v in sorted(r.overrides.items())))
    with open(report_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return report_path


def _fine_tune_legend(rows: Sequence[RunSummary]) -> str:
    """The legend's sentence on ``X → fine-tune`` rows; none without them (a report without
    fine-tunes stays as it was)."""
    if not any(fine_tune_source(r.name) for r in rows):
        return ""
    return (f" `{fine_tune_row('X')}` takes each task from its run `X{FINE_TUNE}_<task>`: that "
            "task's single-task run started from the final parameters of the multi-task setup X "
            "(`model.init_from`); parameters and time summed, X's own wall time not included.")


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def publish(workdir: str, dest: str, metrics: Mapping[str, str], order: Sequence[str] = ()) -> str:
    """Copies what the report reads of every finished run (results, metrics.jsonl, the driver's
    record; no checkpoints) from DIR to DEST/runs/<setup> and DEST/reference/<task>, then writes
    ``DEST.md`` (the report, its plots in DEST) from those copies. The copies are enough to resume
    a comparison elsewhere: ``cp -r DEST/runs DIR2/`` and the finished setups are skipped."""
    copied = 0
    for kind in (RUNS_DIR, REFERENCE_DIR):
        src_root = os.path.join(workdir, kind)
        for name in sorted(os.listdir(src_root)) if os.path.isdir(src_root) else []:
            src = os.path.join(src_root, name)
            if not os.path.exists(os.path.join(src, "results.json")):
                continue  # unfinished: its figures are not final
            os.makedirs(os.path.join(dest, kind, name), exist_ok=True)
            for file in PUBLISHED_FILES:
                if os.path.exists(os.path.join(src, file)):
                    shutil.copyfile(os.path.join(src, file), os.path.join(dest, kind, name, file))
            copied += 1
    if not copied and not os.path.isdir(os.path.join(dest, RUNS_DIR)):
        raise UserError(f"{workdir} has no finished run (no runs/<setup>/results.json); run the "
                        f"comparison first, then --publish")
    return write_report(workdir=dest, metrics=metrics, order=order,
                        report_path=dest.rstrip("/") + ".md")
