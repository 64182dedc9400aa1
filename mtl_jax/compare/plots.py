"""The report's PNG plots: the metrics by setup (bars) and the validation curves.

``rows`` are the report's rows (``mtl_jax.compare.report.RunSummary``: ``name``, ``final``,
``curves``, ``progress``); this module does not import the report, which draws through it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from mtl_jax.compare.plan import SINGLE_COMBINED, SINGLE_PREFIX, mean_metric

BAR_PLOT = "metrics_by_setup.png"
CURVE_PLOT = "validation_curves.png"
PROGRESS_PLOT = "validation_curves_by_progress.png"


def _pyplot():
    # matplotlib is imported only when a plot is drawn: it takes seconds to import, and --help,
    # planning and the training launches never need it.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a TPU VM or in CI
    import matplotlib.pyplot as plt

    return plt


def _colors(rows: Sequence) -> dict[str, str]:
    """row name -> its colour, the same in every plot."""
    return {r.name: f"C{i % 10}" for i, r in enumerate(rows)}


def plot_bars(rows: Sequence, metrics: Mapping[str, str], path: str) -> None:
    """One panel per task metric (and the mean): a bar per setup."""
    plt = _pyplot()
    panels = [(f"{t} {m}", lambda r, t=t: r.final.get(t)) for t, m in metrics.items()]
    panels.append(("mean", lambda r: mean_metric(r.final, list(metrics))))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4), squeeze=False)
    colors = _colors(rows)
    if SINGLE_COMBINED in colors:  # its bars already show each single-task run's task
        rows = [r for r in rows if not r.name.startswith(SINGLE_PREFIX)]
    names = [r.name for r in rows]
    for ax, (title, value) in zip(axes[0], panels):
        heights = [100 * v if (v := value(r)) is not None else 0.0 for r in rows]
        ax.bar(range(len(rows)), heights, color=[colors[n] for n in names])
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("validation metric x100")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_series(rows: Sequence, task: str, by_progress: bool = False) -> list[tuple]:
    """(label, colour, points) of each line in ``task``'s panel. A panel holds one single-task
    run: it is drawn as the combined row (its label and colour), which has no line of its own."""
    colors = _colors(rows)
    series = []
    for r in rows:
        points = (r.progress if by_progress else r.curves).get(task)
        if r.name == SINGLE_COMBINED or not points:
            continue
        single = r.name.startswith(SINGLE_PREFIX) and SINGLE_COMBINED in colors
        label = SINGLE_COMBINED if single else r.name
        series.append((label, colors[label], points))
    return series


def plot_curves(rows: Sequence, metrics: Mapping[str, str], path: str,
                by_progress: bool = False) -> None:
    """One panel per task: the validation metric over training steps (or over the share of the
    run's steps, ``by_progress``), a line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
    for ax, (task, metric) in zip(axes[0], metrics.items()):
        for label, color, points in curve_series(rows, task, by_progress):
            steps, values = zip(*points)
            ax.plot(steps, [100 * v for v in values], marker="o", ms=3, label=label, color=color)
        ax.set_title(f"{task} {metric}", fontsize=9)
        ax.set_xlabel("share of the run's training steps" if by_progress else "step")
    axes[0][0].set_ylabel("validation metric x100")
    handles, labels = _legend_entries(axes[0])
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=7)
    fig.tight_layout(rect=(0, 0.12 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_entries(axes) -> tuple[list, list]:
    """Every panel's lines once by label (the figure has one legend for all panels)."""
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels
