"""The deterministic, resumable multi-task train iterator.

Everything random is a pure function of (seed, task, epoch) or (seed, step), so the state is a few
integers: ``{"step", "seed", "tasks": {name: {"epoch", "position"}}}``; restoring it continues with
exactly the batches the uninterrupted run would have produced. Each host reads the features
``process_index::process_count`` of every task and builds ``batch_size // process_count`` rows.
"""
from __future__ import annotations

import math

import numpy as np

from mtl_jax.data import batching
from mtl_jax.data import packing as packing_lib
from mtl_jax.data.samplers import build_sampler
from mtl_jax.errors import UserError


class TaskStream:
    """An endless, per-epoch reshuffled walk over one task's (host-local) feature indices."""

    def __init__(self, num_features: int, task_index: int, seed: int, process_index: int,
                 process_count: int, indices: np.ndarray | None = None):
        # ``indices``: the features this stream may draw (default all; a held-out set excluded).
        pool = np.arange(num_features) if indices is None else np.asarray(indices)
        self.shard = pool[process_index::process_count]
        self.task_index, self.seed = task_index, seed
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.task_index, self.epoch])
            self._order = self.shard[rng.permutation(len(self.shard))]
            self._order_epoch = self.epoch
        return self._order

    def take(self, count: int) -> list[int]:
        taken = []
        while len(taken) < count:
            order = self._epoch_order()
            chunk = order[self.position:self.position + count - len(taken)]
            taken.extend(int(i) for i in chunk)
            self.position += len(chunk)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return taken


class TrainIterator:
    """``next(it) -> batch`` (dict of NumPy arrays, see docs/architecture.md)."""

    def __init__(self, tasks: list, batch_size: int, seed: int, data_config, keys: tuple[str, ...],
                 process_index: int = 0, process_count: int = 1, train_indices=None,
                 heldout=None, episode: batching.Episode | None = None,
                 row_shards: int = 1):
        # train_indices: per task, the features it trains on (None: all); heldout: a
        # data.heldout.HeldOutBatches whose ``meta/`` arrays join every batch; row_shards: the
        # devices packed rows are split over (data x fsdp): their count is a multiple of it.
        if batch_size % process_count:
            raise UserError(f"train batch size {batch_size} is not divisible by the "
                            f"{process_count} hosts")
        self.tasks, self.keys, self.seed = tasks, keys, int(seed)
        self.local_batch = batch_size // process_count
        self.mode = data_config.batch_mode
        self.buckets = batching.check_buckets(data_config.buckets)
        if self.mode not in batching.BATCH_MODES:
            raise UserError(f"unknown data.batch_mode {self.mode!r}; "
                            f"valid: {', '.join(batching.BATCH_MODES)}")
        if self.mode == "stacked" and self.local_batch % len(tasks):
            raise UserError(f"batch_mode=stacked needs the (per-host) batch size "
                            f"{self.local_batch} divisible by the {len(tasks)} tasks; "
                            f"change train.batch_size")
        for task in tasks:
            if len(task.features) < process_count:
                raise UserError(f"task {task.name} has {len(task.features)} training features, "
                                f"fewer than the {process_count} hosts")
        self.sampler = build_sampler(data_config.sampler, [len(t.features) for t in tasks],
                                     data_config, self.seed, tuple(t.name for t in tasks))
        train_indices = train_indices or [None] * len(tasks)
        self.streams = [TaskStream(len(t.features), t.index, self.seed, process_index,
                                   process_count, indices=idx)
                        for t, idx in zip(tasks, train_indices)]
        self.heldout = heldout
        self.step = 0
        self.episode = episode  # meta-learning's [K, S', b] layout (replaces data.batch_mode)
        if episode is not None:
            self.mode, self.episode_rows = "episode", _local_rows(episode, process_count)
        self.packing = _packing(data_config, tasks, self.mode, self.buckets, process_count,
                                row_shards)

    @property
    def rates(self) -> dict[str, float]:
        return {t.name: float(r) for t, r in zip(self.tasks, self.sampler.rates)}

    @property
    def mixing_target(self) -> dict[str, float]:
        """The expected share of each task's examples: the sampler's rates, except in stacked
        batches, which hold every task equally and never ask the sampler."""
        if self.mode == "stacked":
            return {t.name: 1.0 / len(self.tasks) for t in self.tasks}
        return self.rates

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        make = getattr(self, f"_{self.mode}")
        batch = make()
        if self.packing is not None:
            batch = packing_lib.pack_batch(batch, *self.packing)
        if self.heldout is not None:
            batch.update(self.heldout.next())
        self.step += 1
        return batch

    def _rows(self, t: int, count: int) -> list[tuple[object, int]]:
        return [(self.tasks[t], f) for f in self.streams[t].take(count)]

    def _homogeneous(self):
        t = int(self.sampler.tasks(self.step, 1)[0])
        return batching.make_batch(self._rows(t, self.local_batch), self.local_batch, self.buckets,
                                   self.keys)

    def _mixed(self):
        choices = self.sampler.tasks(self.step, self.local_batch)
        # Draw each task's rows in one go (stream order), then place them in the sampled slots.
        pools = {t: iter(self._rows(t, int((choices == t).sum()))) for t in np.unique(choices)}
        rows = [next(pools[t]) for t in choices]
        return batching.make_batch(rows, self.local_batch, self.buckets, self.keys)

    def _stacked(self):
        per_task = self.local_batch // len(self.tasks)
        rows = [self._rows(t, per_task) for t in range(len(self.tasks))]
        return batching.make_stacked_batch(rows, per_task, self.buckets, self.keys)

    def _episode(self):
        """[K, S', b]: K tasks drawn i.i.d. by the sampler's rates (a pure function of (seed,
        step)); row k holds its task's next S' * b examples, in stream order."""
        ep, b = self.episode, self.episode_rows
        rows = [self._rows(int(t), ep.steps * b) for t in self.sampler.tasks(self.step, ep.tasks)]
        return batching.make_episode_batch(rows, ep.steps, b, self.buckets, self.keys)

    def _episode_state(self) -> list[int] | None:
        ep = self.episode
        return None if ep is None else [ep.tasks, ep.steps, self.episode_rows]

    def get_state(self) -> dict:
        state = dict(step=self.step, seed=self.seed, batch_size=self.local_batch, mode=self.mode,
                     tasks={t.name: dict(epoch=s.epoch, position=s.position)
                            for t, s in zip(self.tasks, self.streams)})
        if self.heldout is not None:
            state["heldout"] = self.heldout.get_state()
        if self.episode is not None:
            state["episode"] = self._episode_state()  # [K, S', b per host]
        return state

    def set_state(self, state: dict) -> None:
        names = [t.name for t in self.tasks]
        if sorted(state.get("tasks", {})) != sorted(names):
            raise UserError(f"the data iterator state is for tasks "
                            f"{sorted(state.get('tasks', {}))}, this run has {sorted(names)}; "
                            f"resume with the same tasks or start a new workdir")
        for key in ("seed", "batch_size", "mode"):
            mine = dict(seed=self.seed, batch_size=self.local_batch, mode=self.mode)[key]
            if state.get(key, mine) != mine:
                raise UserError(f"the data iterator state has {key}={state[key]!r} but this run "
                                f"has {mine!r}; resume with the same settings or start a new "
                                f"workdir")
        if state.get("episode", self._episode_state()) != self._episode_state():
            raise UserError(f"the data iterator state has episodes [K, S', b]={state['episode']} "
                            f"but this run has {self._episode_state()}; resume with the same "
                            f"meta.* settings or start a new workdir")
        self.step = int(state["step"])
        for task, stream in zip(self.tasks, self.streams):
            stream.epoch = int(state["tasks"][task.name]["epoch"])
            stream.position = int(state["tasks"][task.name]["position"])
        if self.heldout is not None:
            if "heldout" not in state:
                raise UserError("the data iterator state has no held-out stream, but this run "
                                "draws held-out batches (weighting.name=meta); resume with the "
                                "same weighting or start a new workdir")
            self.heldout.set_state(state["heldout"])


def _local_rows(episode: batching.Episode, process_count: int) -> int:
    """This host's rows of each of the episode's sub-batches."""
    if episode.rows % process_count or min(episode.tasks, episode.steps, episode.rows) < 1:
        raise UserError(f"meta-learning episodes of {episode.tasks} tasks x {episode.steps} "
                        f"steps x {episode.rows} rows: the rows (meta.inner_batch_size, or "
                        f"train.batch_size) must be a multiple of the {process_count} hosts and "
                        f"every count at least 1")
    return episode.rows // process_count


PACKABLE_MODES = ("homogeneous", "mixed")


def _packing(data_config, tasks, mode: str, buckets, process_count: int, row_shards: int):
    """(row length, row multiple) with data.packing on, else None (see data/packing.py)."""
    if not data_config.packing:
        return None
    if mode not in PACKABLE_MODES:
        what = "meta-learning episodes" if mode == "episode" else f"data.batch_mode={mode}"
        raise UserError(f"data.packing packs {' and '.join(PACKABLE_MODES)} batches, not "
                        f"{what}; set data.packing=False or data.batch_mode=mixed")
    if process_count > 1:
        raise UserError(f"data.packing runs on one host (this run has {process_count}): hosts "
                        f"would fill different numbers of rows; set data.packing=False")
    longest = max(int(np.max(t.features.lengths, initial=1)) for t in tasks)
    length = int(data_config.packing_length) or batching.bucket_length(longest, buckets)
    if length < longest:
        raise UserError(f"data.packing_length={length} is shorter than the longest training "
                        f"example ({longest} tokens); raise it or set it to 0 (the bucket of the "
                        f"longest example)")
    return length, math.lcm(int(data_config.packing_row_multiple), int(row_shards))
