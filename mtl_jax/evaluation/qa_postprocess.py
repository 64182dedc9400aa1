"""Extractive-QA post-processing: n-best start/end logits of every window -> one answer per
question."""
from __future__ import annotations

import collections

import numpy as np


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, n_best: int,
              max_answer_length: int) -> tuple[float, int, int] | None:
    """(score, start_char, end_char) of the best valid span of one window, or None.

    Valid: both ends inside the context (offset >= 0), end >= start, at most max_answer_length
    tokens.
    """
    starts = np.argsort(start_logits)[::-1][:n_best]
    ends = np.argsort(end_logits)[::-1][:n_best]
    best = None
    for s in starts:
        if offsets[s, 0] < 0:
            continue
        for e in ends:
            if offsets[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, int(offsets[s, 0]), int(offsets[e, 1]))
    return best


def best_answers(examples: list[dict], features, outputs: list[np.ndarray], n_best: int = 20,
                 max_answer_length: int = 30) -> list[str]:
    """The highest-scoring span over all windows of each example ("" when none is valid).

    ``outputs[f]`` is feature f's [length, 2] start/end logits.
    """
    windows = collections.defaultdict(list)
    for f, example in enumerate(features.arrays["example_index"]):
        windows[int(example)].append(f)
    answers = []
    for i, example in enumerate(examples):
        candidates = [best_span(outputs[f][:, 0], outputs[f][:, 1],
                                features.tokens("offset_mapping", f), n_best, max_answer_length)
                      for f in windows[i]]
        candidates = [c for c in candidates if c is not None]
        if not candidates:
            answers.append("")
            continue
        _, start, end = max(candidates, key=lambda c: c[0])
        answers.append(example["context"][start:end])
    return answers
