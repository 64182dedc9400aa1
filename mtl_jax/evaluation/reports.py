"""Human-readable evaluation reports, one builder per task type."""
from __future__ import annotations

import numpy as np

from mtl_jax.registry import Registry

REPORTS = Registry("report")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


@REPORTS.register("sequence_classification")
def classification_report(predictions, references, label_names, metrics) -> str:
    """Per-class precision/recall/F1/support and the confusion matrix (rows = gold)."""
    k = len(label_names)
    matrix = np.zeros((k, k), np.int64)
    np.add.at(matrix, (np.asarray(references), np.asarray(predictions)), 1)
    rows = [["", "precision", "recall", "f1", "support"]]
    for i, name in enumerate(label_names):
        tp, predicted, support = matrix[i, i], matrix[:, i].sum(), matrix[i].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        rows.append([name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(support)])
    confusion = [["gold \\ pred", *label_names]] + [[n, *map(str, matrix[i])]
                                                    for i, n in enumerate(label_names)]
    summary = ", ".join(f"{n}={v:.4f}" for n, v in metrics.items())
    return f"{summary}\n{_table(rows)}\n\n{_table(confusion)}"


# Multiple choice: the same table over choice positions (a model that favours one position
# shows in its recall and the confusion matrix).
REPORTS.register("multiple_choice", classification_report)


@REPORTS.register("sequence_regression")
def regression_report(predictions, references, label_names, metrics) -> str:
    p, r = np.asarray(predictions), np.asarray(references)
    summary = ", ".join(f"{n}={v:.4f}" for n, v in metrics.items())
    return (f"{summary}\nn={len(r)} mse={np.mean((p - r) ** 2):.4f} pred mean={p.mean():.3f} "
            f"gold mean={r.mean():.3f}")


@REPORTS.register("token_classification")
def token_report(predictions, references, label_names, metrics) -> str:
    """seqeval's entity-level classification report."""
    from seqeval.metrics import classification_report as seqeval_report

    summary = ", ".join(f"{n}={v:.4f}" for n, v in metrics.items())
    return f"{summary}\n{seqeval_report(references, predictions, digits=4, zero_division=0)}"


@REPORTS.register("extractive_qa")
def qa_report(predictions, references, label_names, metrics) -> str:
    from mtl_jax.evaluation.squad import exact_match

    summary = ", ".join(f"{n}={v:.4f}" for n, v in metrics.items())
    misses = [(p, t) for p, t in zip(predictions, references)
              if not any(exact_match(p, g) for g in t)][:5]
    lines = [f"{summary}",
             f"questions={len(predictions)} empty predictions={sum(not p for p in predictions)}"]
    lines += [f"  predicted {p!r}, gold {t[0]!r}" for p, t in misses]
    return "\n".join(lines)


def build_report(task_type: str, predictions, references, label_names, metrics) -> str:
    return REPORTS.get(task_type)(predictions, references, label_names, metrics)
