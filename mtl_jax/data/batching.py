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


def batch_keys(label_keys: Sequence[str]) -> tuple[str, ...]:
    """The run's fixed key set: base keys plus every label key of the task types present."""
    return BASE_KEYS + tuple(k for k in LABEL_KEYS if k in set(label_keys))


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
    row would make softmax attention divide by zero)."""
    batch = dict(input_ids=np.zeros((batch_size, length), np.int32),
                 attention_mask=np.zeros((batch_size, length), np.int32),
                 token_type_ids=np.zeros((batch_size, length), np.int32),
                 task_id=np.zeros((batch_size,), np.int32),
                 weight=np.zeros((batch_size,), np.float32))
    batch["attention_mask"][:, 0] = 1
    for key in keys:
        if key in LABEL_KEYS:
            dtype, fill, per_token = LABEL_KEYS[key]
            batch[key] = np.full((batch_size, length) if per_token else (batch_size,), fill, dtype)
    return batch


def fill_row(batch: dict, row: int, task, feature: int) -> None:
    features = task.features
    n = int(features.lengths[feature])
    batch["input_ids"][row, :n] = features.tokens("input_ids", feature)
    batch["token_type_ids"][row, :n] = features.tokens("token_type_ids", feature)
    batch["attention_mask"][row, :n] = 1
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
