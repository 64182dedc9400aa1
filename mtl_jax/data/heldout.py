"""Held-out batches drawn beside every train batch, for methods that learn from held-out data
(``weighting.name=meta``: task weights fitted by a look-ahead on held-out examples).

``HeldOut(split, fraction, batch_size)`` says where they come from:

* ``split="train"``: ``fraction`` of each task's train *examples* is set aside (a seeded choice,
  by example, so no window of a held-out QA example is trained on) and never reaches the train
  batches;
* any other loaded split name (e.g. a task's ``data.dev``): that split, whole. The validation
  and test splits are refused: what a run is evaluated on must not steer its training.

Each train batch then carries ``meta/<key>`` arrays: ``batch_size // T`` rows of every task (a
flat batch, tasks in order; stacked runs get a stacked [T, b] one). Like the train iterator,
everything random is a function of (seed, task, epoch), so the state is a few integers.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mtl_jax.data import batching
from mtl_jax.data.iterator import TaskStream
from mtl_jax.errors import UserError

PREFIX = "meta/"
EVALUATED_SPLITS = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class HeldOut:
    split: str  # "train" (a held-out share of it) or another loaded split
    fraction: float  # with split="train": the share of each task's examples held out
    batch_size: int  # held-out rows per train batch (all tasks together)

    def check(self, tasks) -> None:
        """``tasks``: the run's task definitions (name -> definition with ``data``)."""
        num_tasks = len(tasks)
        if self.split in EVALUATED_SPLITS:
            raise UserError(f"weighting.meta_split={self.split!r} is an evaluation split; held-out "
                            f"batches must come from training data: use 'train' (with "
                            f"weighting.meta_holdout) or a task's own extra split")
        if self.split == "train" and not 0.0 < self.fraction < 1.0:
            raise UserError(f"weighting.meta_holdout={self.fraction} must be in (0, 1) with "
                            f"weighting.meta_split=train")
        if self.batch_size < num_tasks:
            raise UserError(f"weighting.meta_batch_size={self.batch_size} is under the "
                            f"{num_tasks} tasks; give every task at least one held-out row")
        if self.batch_size % num_tasks:
            raise UserError(f"weighting.meta_batch_size={self.batch_size} must be a multiple of "
                            f"the {num_tasks} tasks (an equal share of held-out rows each)")
        if self.split != "train":
            missing = [n for n, t in tasks.items() if self.split not in (t.get("data") or {})]
            if missing:
                raise UserError(f"weighting.meta_split={self.split!r}: task {missing[0]} has no "
                                f"data.{self.split}; set tasks.{missing[0]}.data.{self.split}=PATH "
                                f"or use weighting.meta_split=train")

    @property
    def extra_split(self) -> tuple[str, ...]:
        """The split the run must load besides train and validation (none for "train")."""
        return () if self.split == "train" else (self.split,)


def heldout_examples(task_data, fraction: float, seed: int) -> np.ndarray:
    """The example indices held out of ``task_data`` (a seeded choice of ``fraction``, >= 1)."""
    examples = np.unique(_example_index(task_data))
    count = max(1, int(round(fraction * len(examples))))
    if count >= len(examples):
        raise UserError(f"{task_data.name}/train has {len(examples)} examples; holding out "
                        f"{count} would leave none to train on; lower weighting.meta_holdout")
    rng = np.random.default_rng([seed, task_data.index, 0x4E1D])
    return np.sort(rng.permutation(examples)[:count])


def split_features(task_data, held_examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train feature indices, held-out feature indices) of a held-out example set."""
    held = np.isin(_example_index(task_data), held_examples)
    features = np.arange(len(task_data.features))
    return features[~held], features[held]


def _example_index(task_data) -> np.ndarray:
    features = task_data.features
    if "example_index" in features:
        return np.asarray(features.arrays["example_index"])
    return np.arange(len(features))  # one feature per example


class HeldOutBatches:
    """``next() -> {"meta/<key>": array}``: every task's next held-out rows (see module doc)."""

    def __init__(self, tasks: list, indices: list[np.ndarray], batch_size: int, seed: int,
                 buckets, keys, stacked: bool, process_index: int = 0, process_count: int = 1):
        per_task, rest = divmod(batch_size // process_count, len(tasks))
        if per_task == 0 or rest:
            raise UserError(f"weighting.meta_batch_size={batch_size} must be a multiple of the "
                            f"{len(tasks)} tasks (x {process_count} hosts)")
        self.tasks, self.per_task, self.buckets, self.keys = tasks, per_task, buckets, keys
        self.stacked = stacked
        # Offset seed: the held-out order is not the train order of the same task.
        self.streams = [TaskStream(len(t.features), t.index, seed + 0x51ED, process_index,
                                   process_count, indices=idx)
                        for t, idx in zip(tasks, indices)]
        for task, stream in zip(tasks, self.streams):
            if not len(stream.shard):  # an empty stream would never fill its rows
                raise UserError(f"task {task.name} has fewer held-out examples than the "
                                f"{process_count} hosts; raise weighting.meta_holdout")

    def next(self) -> dict[str, np.ndarray]:
        rows = [[(t, f) for f in s.take(self.per_task)] for t, s in zip(self.tasks, self.streams)]
        # Always the longest bucket: a held-out length of its own would compile the step once
        # per (train bucket, held-out bucket) pair instead of once per train bucket.
        length = self.buckets[-1]
        if self.stacked:
            subs = [batching.make_batch(r, self.per_task, self.buckets, self.keys, length)
                    for r in rows]
            batch = {k: np.stack([s[k] for s in subs]) for k in subs[0]}
        else:
            flat = [r for task_rows in rows for r in task_rows]
            batch = batching.make_batch(flat, len(flat), self.buckets, self.keys, length)
        return {PREFIX + k: v for k, v in batch.items()}

    def get_state(self) -> dict:
        return {t.name: dict(epoch=s.epoch, position=s.position)
                for t, s in zip(self.tasks, self.streams)}

    def set_state(self, state: dict) -> None:
        for task, stream in zip(self.tasks, self.streams):
            stream.epoch = int(state[task.name]["epoch"])
            stream.position = int(state[task.name]["position"])


def split_prefixed(batch: dict) -> tuple[dict, dict]:
    """A train batch with ``meta/`` keys -> (train batch, held-out batch without the prefix)."""
    train = {k: v for k, v in batch.items() if not k.startswith(PREFIX)}
    held = {k[len(PREFIX):]: v for k, v in batch.items() if k.startswith(PREFIX)}
    return train, held
