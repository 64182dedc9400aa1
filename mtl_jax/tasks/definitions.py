"""Task definitions: the ``config.tasks.<name>`` ConfigDicts, their defaults and their checks.

A definition is a full ConfigDict (every field present, so the CLI's locked config accepts
``--config.tasks.sst2.max_train_examples=100``). Fields common to every type live here; each task
type adds its own (``TaskType.extra_fields``).
"""
from __future__ import annotations

import difflib
import json
import os
import pathlib
from typing import Any

import ml_collections

from mtl_jax.errors import UserError
from mtl_jax.tasks.types import TASK_TYPES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

COMMON_FIELDS: dict[str, Any] = dict(
    type="",
    hub="",  # hub dataset name (e.g. "glue"); empty = local files
    hub_config="",  # hub dataset config (e.g. "rte")
    data={},  # split -> local file path, or hub split name when `hub` is set
    text_fields=(),
    label_field="label",
    label_names=(),  # empty: from dataset_info.json beside the files, or the hub features
    metrics=(),  # empty: the type's default metrics
    max_length=128,
    max_train_examples=0,  # 0 = all; else a deterministic random subset (seed 0)
    # k-shot training (mtl_jax/data/kshot.py): k train examples per class for classification, k
    # in all for the other types, picked by k_shot_seed; 0 = off. Replaces max_train_examples.
    k_shot=0,
    k_shot_seed=0,
    max_eval_examples=0,  # 0 = all (or eval.max_examples when that is set)
    file_format="auto",  # auto (from the suffix) | jsonl | json | csv | tsv | conll
)


def task_definition(type: str, **fields) -> ml_collections.ConfigDict:  # pylint: disable=redefined-builtin
    """A complete task definition of ``type`` with ``fields`` overriding the defaults."""
    task_type = TASK_TYPES.get(type)
    defaults = dict(COMMON_FIELDS, **task_type.extra_fields, type=type)
    if not fields.get("metrics"):
        fields["metrics"] = task_type.default_metrics
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        near = difflib.get_close_matches(unknown[0], defaults, n=2)
        hint = (f"; did you mean {', '.join(near)}?" if near
                else f"; valid fields: {', '.join(sorted(defaults))}")
        raise UserError(f"unknown task field {unknown[0]!r} for type {type!r}{hint}")
    merged = dict(defaults, **fields)
    merged["data"] = ml_collections.ConfigDict(dict(merged["data"]))
    for key in ("text_fields", "label_names", "metrics"):
        merged[key] = tuple(merged[key] or ())
    return ml_collections.ConfigDict(merged)


def normalize(name: str, definition) -> ml_collections.ConfigDict:
    """Fills defaults into a (possibly partial) user definition and checks it."""
    if not isinstance(definition, (dict, ml_collections.ConfigDict)):
        raise UserError(f"tasks.{name} must be a dict of task fields, "
                        f"got {type(definition).__name__}")
    fields = (dict(definition.items()) if isinstance(definition, ml_collections.ConfigDict)
              else dict(definition))
    if not fields.get("type"):
        raise UserError(f"tasks.{name}.type is not set; "
                        f"valid task types: {', '.join(TASK_TYPES.names())}")
    type_name = fields.pop("type")
    try:
        definition = task_definition(type_name, **fields)
    except UserError as e:
        raise UserError(f"tasks.{name}: {e}") from None
    if not definition.data:
        raise UserError(f"tasks.{name}.data is empty; set e.g. tasks.{name}.data.train=PATH "
                        f"(or use mtl_jax.tasks.presets.local_task/hub_task)")
    _check_k_shot(name, definition)
    return definition


def _check_k_shot(name: str, definition) -> None:
    if definition.k_shot < 0 or definition.k_shot_seed < 0:
        raise UserError(f"tasks.{name}.k_shot={definition.k_shot} and k_shot_seed="
                        f"{definition.k_shot_seed} must be >= 0 (k_shot 0 = all examples)")
    if definition.k_shot and definition.max_train_examples:
        raise UserError(f"tasks.{name} sets both k_shot={definition.k_shot} and "
                        f"max_train_examples={definition.max_train_examples}; k_shot replaces "
                        f"max_train_examples: set one of them to 0")


def task_definitions(config) -> dict[str, ml_collections.ConfigDict]:
    """``config.tasks`` as name -> full definition, in config order."""
    if not config.tasks:
        raise UserError("config.tasks is empty; add a task, e.g. config.tasks.sst2 = "
                        "mtl_jax.tasks.presets.local_task('sst2', '../shared/data')")
    return {name: normalize(name, d) for name, d in config.tasks.items()}


def resolve_path(path: str) -> pathlib.Path:
    """A relative path resolves against the current directory, then the repository root."""
    p = pathlib.Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    at_root = REPO_ROOT / p
    return at_root if at_root.exists() else p


def dataset_info(definition) -> dict:
    """The ``dataset_info.json`` beside the task's local files ({} when absent or hub data)."""
    if definition.hub:
        return {}
    for path in definition.data.values():
        info = read_dataset_info(resolve_path(path).parent / "dataset_info.json")
        if info:
            return info
    return {}


def read_dataset_info(path: pathlib.Path) -> dict:
    """A ``dataset_info.json`` ({} when there is none)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); "
                        f"fix or delete it") from None


def check_trainable(name: str, definition) -> None:
    """A task whose data has no train split (BoolQ, QNLI in ../shared/data) is evaluation-only:
    one line before training, not a missing-split error halfway through reading."""
    is_dict = isinstance(definition, (dict, ml_collections.ConfigDict))  # else: normalize says
    data = definition.get("data") if is_dict else None
    if data and "train" not in data:
        raise UserError(f"tasks.{name} is evaluation-only: it has no train split (only "
                        f"{', '.join(data)}); drop it from training and score it with "
                        f"--mode=eval on a run that trained a {name} head, or set "
                        f"tasks.{name}.data.train=PATH")


def definition_fingerprint(definition) -> dict:
    """The fields that change tokenized features (for the cache key), JSON-ready."""
    return json.loads(definition.to_json(sort_keys=True))
