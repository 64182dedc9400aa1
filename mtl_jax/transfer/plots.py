"""The transfer plot: one panel per task, the primary metric against the number of train examples
the cells used (log axis; ticks named by k, ``all`` at the full train size), one line per starting
point, shaded +- one standard deviation over seeds."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# compare's helpers: matplotlib on the Agg backend (imported only when drawing), one legend entry
# per label over every panel.
from mtl_jax.compare.plots import _legend_entries, _pyplot

TRANSFER_PLOT = "transfer.png"


XLABEL = "train examples (k per class x classes)"


def plot_transfer(series: Mapping[str, Sequence[tuple]], metrics: Mapping[str, str],
                  path: str) -> None:
    """``series``: task -> [(start label, [(x, label of x, [values over seeds])])] (report.py
    builds it: x the number of train examples); values are drawn x100."""
    fig = transfer_figure(series, metrics)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def transfer_figure(series: Mapping[str, Sequence[tuple]], metrics: Mapping[str, str]):
    """The figure of ``plot_transfer`` (the caller closes it)."""
    plt = _pyplot()
    tasks = list(series)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.6),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        ticks: dict = {}  # x -> its k labels (k=256 of a small task can be all of it)
        for i, (label, points) in enumerate(series[task]):
            xs = [x for x, _, _ in points]
            means = np.array([100 * np.mean(v) for _, _, v in points])
            stds = np.array([100 * np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, _, v in points])
            ax.plot(xs, means, marker="o", ms=3, label=label, color=f"C{i % 10}")
            ax.fill_between(xs, means - stds, means + stds, alpha=0.2, color=f"C{i % 10}")
            for x, name, _ in points:
                if name not in ticks.setdefault(x, []):
                    ticks[x].append(name)
        ax.set_xscale("log")
        ax.set_xticks(list(ticks), ["\n".join(names) for names in ticks.values()], fontsize=7)
        ax.minorticks_off()
        ax.set_title(f"{task} {metrics.get(task, '')}", fontsize=9)
        ax.set_xlabel(XLABEL, fontsize=8)
    axes[0][0].set_ylabel("metric x100 (mean +- std over seeds)")
    handles, labels = _legend_entries(axes[0])
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=7)
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    return fig
