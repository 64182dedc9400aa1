"""SQuAD v1.1 exact match and F1 with the official script's answer normalization."""
from __future__ import annotations

import collections
import re
import string

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles (a/an/the), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean over questions of the best score against any gold answer, in [0, 1]
    (official × 1/100)."""
    if not predictions:
        return dict(exact_match=0.0, f1=0.0)
    em = [max(exact_match(p, t) for t in truths) for p, truths in zip(predictions, references)]
    f = [max(f1(p, t) for t in truths) for p, truths in zip(predictions, references)]
    return dict(exact_match=sum(em) / len(em), f1=sum(f) / len(f))
