"""Metrics (a registry). Each takes (predictions, references) and returns {name: float in [0, 1]}
(correlations in [-1, 1]). Implemented here in NumPy; tests check them against sklearn, scipy and
seqeval."""
from __future__ import annotations

from typing import Callable

import numpy as np

from mtl_jax.errors import UserError
from mtl_jax.evaluation.squad import squad_scores
from mtl_jax.registry import Registry

METRICS: Registry[Callable[[object, object], dict[str, float]]] = Registry("metric")


def _confusion(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    """Confusion matrix over the labels seen in either array (rows = reference)."""
    labels = np.union1d(np.unique(references), np.unique(predictions))
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(matrix, ([index[r] for r in references], [index[p] for p in predictions]), 1)
    return matrix, labels


def _f1(tp, fp, fn) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


@METRICS.register("accuracy")
def accuracy(predictions, references):
    return dict(accuracy=float(np.mean(np.asarray(predictions) == np.asarray(references))))


@METRICS.register("f1")
def f1_binary(predictions, references):
    """F1 of the positive class (label 1)."""
    p, r = np.asarray(predictions) == 1, np.asarray(references) == 1
    return dict(f1=float(_f1(np.sum(p & r), np.sum(p & ~r), np.sum(~p & r))))


@METRICS.register("f1_macro")
def f1_macro(predictions, references):
    matrix, _ = _confusion(np.asarray(predictions), np.asarray(references))
    tp = np.diag(matrix)
    return dict(f1_macro=float(np.mean(_f1(tp, matrix.sum(0) - tp, matrix.sum(1) - tp))))


@METRICS.register("f1_micro")
def f1_micro(predictions, references):
    """F1 of the pooled per-class counts (equals accuracy for single-label classification)."""
    matrix, _ = _confusion(np.asarray(predictions), np.asarray(references))
    tp = np.trace(matrix)
    wrong = matrix.sum() - tp  # an error: a false positive of one class, false negative of another
    return dict(f1_micro=float(_f1(tp, wrong, wrong)))


# Metrics defined only up to a number of classes: name -> (max classes, what it is, the fix).
CLASS_LIMITS = {"f1": (2, "binary F1 (of label 1)", "use 'f1_macro' or 'f1_micro'")}


def check_metric_for_labels(task_name: str, metric: str, num_labels: int) -> None:
    """Raises UserError when ``metric`` is meaningless for a task with ``num_labels`` classes
    (``f1`` on 3+ classes would silently score label 1 alone)."""
    limit = CLASS_LIMITS.get(metric)
    if limit is not None and num_labels > limit[0]:
        _, what, fix = limit
        raise UserError(f"tasks.{task_name}.metrics: {metric!r} is {what} but the task has "
                        f"{num_labels} classes; {fix}")


@METRICS.register("matthews_corrcoef")
def matthews_corrcoef(predictions, references):
    """Multi-class MCC (Gorodkin's R_K); 0 when either marginal is constant."""
    matrix, _ = _confusion(np.asarray(predictions), np.asarray(references))
    matrix = matrix.astype(np.float64)
    s, c = matrix.sum(), np.trace(matrix)
    predicted, true = matrix.sum(0), matrix.sum(1)
    denominator = np.sqrt((s ** 2 - predicted @ predicted) * (s ** 2 - true @ true))
    return dict(matthews_corrcoef=float((c * s - predicted @ true) / denominator)
                if denominator > 0 else 0.0)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


@METRICS.register("pearson")
def pearson(predictions, references):
    return dict(pearson=_pearson(np.asarray(predictions, np.float64),
                                 np.asarray(references, np.float64)))


@METRICS.register("spearman")
def spearman(predictions, references):
    return dict(spearman=_pearson(average_ranks(np.asarray(predictions, np.float64)),
                                  average_ranks(np.asarray(references, np.float64))))


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) chunks of one IOB1/IOB2/IOBES sequence, conlleval's rules
    (as seqeval)."""
    chunks, begin, prev_tag, prev_type = set(), 0, "O", ""
    for i, label in enumerate(list(tags) + ["O"]):
        tag, kind = label[0], label[1:].split("-", maxsplit=1)[-1] or "_"
        typed_change = prev_type != kind
        ends = (prev_tag in "ES" or (prev_tag in "BI" and tag in "BSO")
                or (prev_tag not in "O." and typed_change))
        starts = (tag in "BS" or (prev_tag in "ESO" and tag in "EI")
                  or (tag not in "O." and typed_change))
        if ends:
            chunks.add((prev_type, begin, i - 1))
        if starts:
            begin = i
        prev_tag, prev_type = tag, kind
    return chunks


@METRICS.register("seqeval")
def seqeval_scores(predictions, references):
    """Entity-level micro precision/recall/F1 (exact type and boundaries) and token accuracy."""
    tp = n_pred = n_true = 0
    for predicted, true in zip(predictions, references):
        p, t = entities(predicted), entities(true)
        tp, n_pred, n_true = tp + len(p & t), n_pred + len(p), n_true + len(t)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    tokens = [(a == b) for p, t in zip(predictions, references) for a, b in zip(p, t)]
    return dict(precision=precision, recall=recall, f1=f1,
                accuracy=float(np.mean(tokens)) if tokens else 0.0)


@METRICS.register("squad")
def squad(predictions, references):
    """Exact match and token F1 (official SQuAD v1.1 normalization), in [0, 1]."""
    return squad_scores(list(predictions), list(references))


def compute_metrics(names, predictions, references) -> dict[str, float]:
    results = {}
    for name in names:
        results.update(METRICS.get(name)(predictions, references))
    return results
