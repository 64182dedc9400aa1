"""One entry point from config to batches: ``build_data(config, tokenizer) -> RunData``."""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Iterator

import numpy as np

from mtl_jax.data import batching, readers
from mtl_jax.data.features import Features, cache_path, tokenizer_fingerprint
from mtl_jax.data.heldout import HeldOut, HeldOutBatches, heldout_examples, split_features
from mtl_jax.data.iterator import TrainIterator
from mtl_jax.data.kshot import k_shot
from mtl_jax.errors import UserError
from mtl_jax.tasks.definitions import (check_trainable, dataset_info, definition_fingerprint,
                                       task_definitions)
from mtl_jax.tasks.spec import TaskSpec
from mtl_jax.tasks.types import TASK_TYPES, TaskType


@dataclasses.dataclass
class TaskData:
    """One split of one task: its parsed examples, tokenized features and batching settings."""

    spec: TaskSpec
    definition: object
    split: str
    examples: list[dict]
    features: Features
    keys: tuple[str, ...]  # the run's batch key set
    buckets: tuple[int, ...]
    skipped_empty: int = 0
    from_cache: bool = False
    notes: tuple[str, ...] = ()  # what the log should say about the split (k-shot subsets)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def task_type(self) -> TaskType:
        return TASK_TYPES.get(self.spec.type)

    def batches(self, batch_size: int,
                sort_by_length: bool = True) -> Iterator[tuple[np.ndarray, dict]]:
        """``(feature_indices, batch)`` covering every feature exactly once; the last batch is
        padded with weight-0 rows. Sorting by length keeps padding (and bucket count) small."""
        order = (np.argsort(self.features.lengths, kind="stable") if sort_by_length
                 else np.arange(len(self.features)))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows = [(self, int(f)) for f in chunk]
            yield chunk, batching.make_batch(rows, batch_size, self.buckets, self.keys)

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        for _, batch in self.batches(batch_size):
            yield batch


@dataclasses.dataclass
class RunData:
    """``specs`` (config order), ``data[task][split] -> TaskData``, and the train iterator."""

    specs: list[TaskSpec]
    data: dict[str, dict[str, TaskData]]
    config: object
    keys: tuple[str, ...]

    def train_iterator(self, batch_size: int | None = None, seed: int | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       heldout: HeldOut | None = None,
                       episode: batching.Episode | None = None,
                       row_shards: int = 1) -> TrainIterator:
        """``batch_size`` is global (default train.batch_size); each host builds its share.
        ``heldout``: also draw held-out batches (``meta/`` keys, see data/heldout.py);
        ``episode``: meta-learning's [K, S', b] batches instead of data.batch_mode's;
        ``row_shards``: the devices a packed batch's rows are split over (data x fsdp; the
        runner's ``Run.row_shards``)."""
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        tasks = [self.split(s.name, "train") for s in self.specs]
        seed = self.config.data.shuffle_seed if seed is None else seed
        train_indices, held = None, None
        if heldout is not None:
            train_indices, held = self._heldout(tasks, heldout, seed, process_index,
                                                process_count)
        return TrainIterator(tasks, batch_size or self.config.train.batch_size, seed,
                             self.config.data, self.keys, process_index, process_count,
                             train_indices=train_indices, heldout=held, episode=episode,
                             row_shards=row_shards)

    def _heldout(self, tasks, heldout: HeldOut, seed, process_index, process_count):
        """(per-task train feature indices or None, the HeldOutBatches) of ``heldout``."""
        heldout.check({t.name: t.definition for t in tasks})
        if heldout.split == "train":
            pairs = [split_features(t, heldout_examples(t, heldout.fraction, seed))
                     for t in tasks]
            train_indices = [train for train, _ in pairs]
            sources, indices = tasks, [held for _, held in pairs]
        else:
            train_indices = None
            sources = [self.split(t.name, heldout.split) for t in tasks]
            indices = [None] * len(tasks)
        held = HeldOutBatches(sources, indices, heldout.batch_size, seed, tasks[0].buckets,
                              self.keys, self.config.data.batch_mode == "stacked",
                              process_index, process_count)
        return train_indices, held

    def split(self, task: str, split: str = "validation") -> TaskData:
        if task not in self.data:
            raise UserError(f"unknown task {task!r}; tasks in this run: {', '.join(self.data)}")
        if split not in self.data[task]:
            raise UserError(f"task {task} has no loaded {split!r} split "
                            f"(loaded: {', '.join(self.data[task])})")
        return self.data[task][split]

    def eval_data(self, task: str, split: str = "validation") -> TaskData:
        return self.split(task, split)

    def eval_tasks(self, split: str = "validation") -> list[str]:
        return [s.name for s in self.specs if split in self.data[s.name]]


def build_data(config, tokenizer, splits=("train", "validation"), log=None,
               require_train=True) -> RunData:
    """Reads, validates, tokenizes (cached) and wraps every task split named in ``splits``.

    A task without one of ``splits`` skips it, except "train" (an error unless ``require_train``
    is False, as in the data preview).
    """
    definitions = task_definitions(config)
    buckets = batching.check_buckets(config.data.buckets)
    if config.data.empty_text not in ("skip", "error"):
        raise UserError(f"data.empty_text={config.data.empty_text!r} must be 'skip' or 'error'")
    specs, loaded = [], {}
    for index, (name, definition) in enumerate(definitions.items()):
        task_type = TASK_TYPES.get(definition.type)
        task_type.check_definition(name, definition)
        if definition.max_length > buckets[-1]:
            raise UserError(f"tasks.{name}.max_length={definition.max_length} exceeds the largest "
                            f"data.buckets entry {buckets[-1]}; add a bucket or lower max_length")
        wanted = [s for s in splits if s in definition.data]
        if require_train and "train" in splits:
            check_trainable(name, definition)
        rows = {s: readers.read_split(name, s, definition) for s in wanted}
        label_names = resolve_label_names(name, definition, task_type, rows)
        specs.append(TaskSpec(name, definition.type, task_type.num_labels(label_names), index,
                              label_names))
        loaded[name] = rows
    keys = batching.batch_keys([k for s in specs for k in TASK_TYPES.get(s.type).label_keys],
                               num_choices=max((s.num_labels for s in specs
                                                if TASK_TYPES.get(s.type).has_choices), default=0))
    fingerprint = tokenizer_fingerprint(tokenizer)
    data = {}
    for spec in specs:
        definition = definitions[spec.name]
        data[spec.name] = {}
        for split, rows in loaded[spec.name].items():
            start = time.perf_counter()
            task_data = load_split(spec, definition, split, rows, tokenizer, fingerprint, config,
                                   keys, buckets)
            data[spec.name][split] = task_data
            if log:
                log(f"{spec.name}/{split}: {len(task_data.examples)} examples, "
                    f"{len(task_data.features)} features "
                    f"({'cached' if task_data.from_cache else 'tokenized'} "
                    f"in {time.perf_counter() - start:.1f}s)")
                for note in task_data.notes:
                    log(f"{spec.name}/{split}: {note}")
    return RunData(specs, data, config, keys)


def resolve_label_names(name: str, definition, task_type: TaskType, rows: dict) -> tuple[str, ...]:
    """Config, else dataset_info.json, else the hub features, else the sorted string labels seen."""
    if not task_type.uses_label_names:
        return ()
    if definition.label_names:
        return tuple(definition.label_names)
    info = dataset_info(definition)
    if info:
        if (info.get("label_field", definition.label_field) == definition.label_field
                and info.get("label_names")):
            return tuple(info["label_names"])
        other = info.get("other_tag_fields", {}).get(definition.label_field)
        if other:
            return tuple(other)
    if definition.hub:
        names = readers.hub_label_names(name, definition)
        if names:
            return names
    seen = {v for split_rows in rows.values() for _, r in split_rows
            for v in task_type.raw_labels(r, definition)}
    if seen and all(isinstance(v, str) and not v.strip().lstrip("-").isdigit() for v in seen):
        return tuple(sorted(seen))
    raise UserError(f"tasks.{name} has no label names; set tasks.{name}.label_names=(...) or put a "
                    f"dataset_info.json with label_names beside its files")


def parse_rows(name: str, definition, task_type: TaskType, rows, label_names, empty_text: str):
    """Validated examples and the number of empty-text rows skipped."""
    label_ids = {n: i for i, n in enumerate(label_names)}
    columns = task_type.columns(definition)
    examples, skipped = [], 0
    for where, record in rows:
        missing = [c for c in columns if c not in record]
        if missing:
            raise UserError(f"{where}: column {missing[0]!r} not found "
                            f"(columns: {', '.join(record)}); "
                            f"set tasks.{name}.text_fields / label_field to the file's columns")
        example = task_type.parse(record, where, definition, label_ids)
        if example is None:
            if empty_text == "error":
                raise UserError(f"{where}: empty text; remove the row or set data.empty_text=skip")
            skipped += 1
            continue
        example["where"] = where
        examples.append(example)
    return examples, skipped


def subsample(examples: list, limit: int) -> list:
    """A deterministic random subset of ``limit`` examples (seed 0), kept in file order."""
    if not limit or limit >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(0).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def _limit(definition, split: str, config) -> int:
    if split == "train":
        return definition.max_train_examples
    return definition.max_eval_examples or config.eval.max_examples


def kept_examples(definition, split: str, examples: list, config,
                  label_names=()) -> tuple[list, list[str]]:
    """(the examples a split keeps, notes): the k-shot subset of train when ``k_shot`` is set,
    else the ``max_*_examples`` cap."""
    if split == "train" and definition.k_shot:
        return k_shot(examples, definition.k_shot, definition.k_shot_seed, label_names)
    return subsample(examples, _limit(definition, split, config)), []


def train_examples(config, name: str) -> list[dict]:
    """The train examples a run of ``config`` trains task ``name`` on (read, parsed and subset as
    build_data does; nothing tokenized). The label names are resolved from the train split alone:
    the same as build_data's when the config or dataset_info.json names them."""
    definition = task_definitions(config)[name]
    task_type = TASK_TYPES.get(definition.type)
    rows = {"train": readers.read_split(name, "train", definition)}
    label_names = resolve_label_names(name, definition, task_type, rows)
    examples, _ = parse_rows(name, definition, task_type, rows["train"], label_names,
                             config.data.empty_text)
    return kept_examples(definition, "train", examples, config, label_names)[0]


def load_split(spec, definition, split, rows, tokenizer, fingerprint, config, keys,
               buckets) -> TaskData:
    task_type = TASK_TYPES.get(spec.type)
    examples, skipped = parse_rows(spec.name, definition, task_type, rows, spec.label_names,
                                   config.data.empty_text)
    if not examples:
        raise UserError(f"tasks.{spec.name}.data.{split} has no usable examples ({skipped} empty); "
                        f"check the file")
    examples, notes = kept_examples(definition, split, examples, config, spec.label_names)
    key = dict(tokenizer=fingerprint, task=definition_fingerprint(definition), split=split,
               limit=_limit(definition, split, config), label_names=list(spec.label_names),
               empty_text=config.data.empty_text,
               label_all_subtokens=bool(config.data.label_all_subtokens),
               source=readers.source_fingerprint(spec.name, split, definition))
    path = cache_path(config.data.cache_dir, key)
    if path.is_file():
        try:
            features, meta = Features.load(path)
            if meta.get("num_examples") == len(examples):
                return TaskData(spec, definition, split, examples, features, keys, buckets,
                                skipped, True, tuple(notes))
        except (OSError, ValueError, KeyError):  # a corrupt cache entry is rebuilt
            pass
    features = Features(task_type.tokenize(examples, tokenizer, definition, config.data,
                                           spec.label_names))
    try:
        features.save(path, dict(num_examples=len(examples), task=spec.name, split=split))
    except OSError:  # a read-only cache dir only costs speed
        pass
    return TaskData(spec, definition, split, examples, features, keys, buckets, skipped, False,
                    tuple(notes))


def label_counts(task_data: TaskData) -> collections.Counter:
    counts = collections.Counter()
    names = task_data.spec.label_names
    for e in task_data.examples:
        if "label" in e:
            counts[names[e["label"]]] += 1
        elif "tags" in e:
            counts.update(names[t] for t in e["tags"])
    return counts

