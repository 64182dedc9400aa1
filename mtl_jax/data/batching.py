"""Static-shape batches: rows padded to the smallest fitting length bucket, one fixed key set per
run.

A batch source row is ``(task, feature_index)`` where ``task`` is any object with ``features``
(``Features``) and ``index`` (its task id).
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

import numpy as np

from mtl_jax.errors import UserError

BASE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "task_id", "weight")
# key -> (dtype, fill value where the key does not apply, per token?)
LABEL_KEYS = {
    "label": (np.int32, -100, False),
    "target": (np.float32, 0.0, False),
    "tag_ids": (np.int32, -100, True),
    "start_positions": (np.int32, -100, False),
    "end_positions": (np.int32, -100, False),
}
BATCH_MODES = ("homogeneous", "mixed", "stacked")


class BatchKeys(tuple):
    """The run's fixed key set (a tuple of key names) and its choice-axis size ``num_choices``:
    0 = token arrays [B, L]; C > 0 (a run with a multiple-choice task) = [B, C, L], every row
    with C sequence slots (other tasks' rows fill slot 0; see tasks/types.py MultipleChoice)."""

    num_choices: int

    def __new__(cls, keys: Sequence[str], num_choices: int = 0):
        self = super().__new__(cls, keys)
        self.num_choices = int(num_choices)
        return self


def batch_keys(label_keys: Sequence[str], num_choices: int = 0) -> BatchKeys:
    """The run's fixed key set: base keys plus every label key of the task types present."""
    return BatchKeys(BASE_KEYS + tuple(k for k in LABEL_KEYS if k in set(label_keys)),
                     num_choices)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    i = bisect.bisect_left(buckets, length)
    if i == len(buckets):
        raise UserError(f"a sequence of {length} tokens exceeds the largest data.buckets entry "
                        f"{buckets[-1]}; add a larger bucket or lower the task's max_length")
    return buckets[i]


def check_buckets(buckets) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise UserError(f"data.buckets={buckets} must be strictly increasing positive lengths, "
                        f"e.g. (64, 128, 256)")
    return buckets


def empty_batch(keys: Sequence[str], batch_size: int, length: int) -> dict[str, np.ndarray]:
    """Padding everywhere: weight 0, ignore labels, and attention on token 0 only (a fully masked
    row would make softmax attention divide by zero). ``keys.num_choices`` (a ``BatchKeys``)
    adds the choice axis to the token arrays."""
    choices = getattr(keys, "num_choices", 0)
    tokens = (batch_size, choices, length) if choices else (batch_size, length)
    batch = dict(input_ids=np.zeros(tokens, np.int32),
                 attention_mask=np.zeros(tokens, np.int32),
                 token_type_ids=np.zeros(tokens, np.int32),
                 task_id=np.zeros((batch_size,), np.int32),
                 weight=np.zeros((batch_size,), np.float32))
    batch["attention_mask"][..., 0] = 1
    for key in keys:
        if key in LABEL_KEYS:
            dtype, fill, per_token = LABEL_KEYS[key]
            batch[key] = np.full((batch_size, length) if per_token else (batch_size,), fill, dtype)
    return batch


def _fill_sequences(batch: dict, row: int, features, feature: int) -> None:
    """The feature's token rows into the row's sequence slots (slot 0 unless multiple choice)."""
    slots = {k: batch[k][row] if batch[k].ndim == 3 else batch[k][row][None]  # [C, L] views
             for k in ("input_ids", "token_type_ids", "attention_mask")}
    ids, types = (features.token_rows(k, feature) for k in ("input_ids", "token_type_ids"))
    for s, n in enumerate(features.row_lengths(feature)):
        slots["input_ids"][s, :n] = ids[s, :n]
        slots["token_type_ids"][s, :n] = types[s, :n]
        slots["attention_mask"][s, :n] = 1


def fill_row(batch: dict, row: int, task, feature: int) -> None:
    features = task.features
    n = int(features.lengths[feature])
    _fill_sequences(batch, row, features, feature)
    batch["task_id"][row] = task.index
    batch["weight"][row] = 1.0
    for key, (_, _, per_token) in LABEL_KEYS.items():
        if key in batch and key in features:
            if per_token:
                batch[key][row, :n] = features.tokens(key, feature)
            else:
                batch[key][row] = features.scalar(key, feature)


def make_batch(rows: Sequence[tuple[object, int]], batch_size: int, buckets: Sequence[int],
               keys: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
    """``rows`` padded to ``batch_size`` (extra rows weight 0) and to a bucket length."""
    if length is None:
        length = bucket_length(max((int(t.features.lengths[f]) for t, f in rows), default=1),
                               buckets)
    batch = empty_batch(keys, batch_size, length)
    for r, (task, feature) in enumerate(rows):
        fill_row(batch, r, task, feature)
    if rows and len(rows) < batch_size:
        batch["task_id"][len(rows):] = rows[0][0].index  # padding rows point at a real head
    return batch


def make_stacked_batch(rows_per_task: Sequence[Sequence[tuple[object, int]]], per_task: int,
                       buckets: Sequence[int], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """[T, B//T, ...]: sub-batch t holds task t; one bucket length for all sub-batches."""
    longest = max(int(t.features.lengths[f]) for rows in rows_per_task for t, f in rows)
    length = bucket_length(longest, buckets)
    subs = [make_batch(rows, per_task, buckets, keys, length) for rows in rows_per_task]
    return {k: np.stack([s[k] for s in subs]) for k in subs[0]}


@dataclasses.dataclass(frozen=True)
class Episode:
    """Meta-learning's batch layout [K, S', b, ...] (``train.algorithm`` reptile / fomaml): K
    sampled tasks, each with S' consecutive sub-batches of b rows (global) of that task."""

    tasks: int  # K
    steps: int  # S'
    rows: int  # b, over all hosts


def make_episode_batch(rows_per_task: Sequence[Sequence[tuple[object, int]]], steps: int,
                       rows: int, buckets: Sequence[int],
                       keys: Sequence[str]) -> dict[str, np.ndarray]:
    """[K, S', b, ...]: row k holds ``rows_per_task[k]`` (S' * b rows of one task) in S'
    sub-batches of b; one bucket length for the whole episode (its longest row)."""
    longest = max(int(t.features.lengths[f]) for task_rows in rows_per_task for t, f in task_rows)
    length = bucket_length(longest, buckets)
    subs = [[make_batch(task_rows[s * rows:(s + 1) * rows], rows, buckets, keys, length)
             for s in range(steps)] for task_rows in rows_per_task]
    return {k: np.stack([np.stack([sub[k] for sub in row]) for row in subs]) for k in subs[0][0]}
