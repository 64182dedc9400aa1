"""Presets for common tasks (GLUE, SuperGLUE, CoNLL-2003, SQuAD v1.1; SICK, TREC, NCBI-disease):
hub names, fields and label orders (the hub datasets' own).

``hub_task("rte")`` reads the hub dataset; ``hub`` may also name a local dataset repository folder
(data files and a dataset card, read by ``datasets.load_dataset`` like a hub name:
``hub_task("cb", hub="/data/my_cb", hub_config="")``). ``local_task("rte", "../shared/data")``
reads ``DATA_DIR/rte/{train,validation,test}.jsonl`` (or DATA_DIR itself when the files lie
directly in it): its ``dataset_info.json`` (task type, text fields, label field, label names)
defines the task, so any folder with one works by name; a preset of that name keeps its metrics
and max_length, and must agree with the file (a differing label order is an error: it fixes what
each row of a saved head means); explicit overrides win. Without the file the preset alone is used.
Relative paths are kept as given and resolved at load time (current directory, then the repo root).

SuperGLUE presets (hub ``super_glue``): ``boolq``, ``cb``, ``copa`` (a ``multiple_choice`` task),
``superglue_rte`` (its premise/hypothesis schema; ``rte`` is GLUE's). Not supported, each an error
saying why (``UNSUPPORTED``): ``wic`` (the target word's spans), ``multirc`` (three texts, answers
grouped per question), ``wsc`` (span pairs), ``record`` (candidate-entity ranking); and GLUE ``ax``
(only an unlabelled test split on the hub).

A task without a train split (BoolQ and QNLI in ../shared/data) is evaluation-only: a training
config refuses it before anything is read (``definitions.check_trainable``).
"""
from __future__ import annotations

import ml_collections

from mtl_jax.errors import UserError
from mtl_jax.tasks.definitions import (COMMON_FIELDS, read_dataset_info, resolve_path,
                                       task_definition)
from mtl_jax.tasks.types import TASK_TYPES

_NLI3 = ("entailment", "neutral", "contradiction")
_ENT2 = ("entailment", "not_entailment")
_NER = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def _glue(config: str, text_fields, label_names=(), metrics=("accuracy",),
          type="sequence_classification", validation="validation", max_length=128):
    return dict(type=type, hub="glue", hub_config=config,
                data=dict(train="train", validation=validation),
                text_fields=text_fields, label_names=label_names, metrics=metrics,
                max_length=max_length)


def _super_glue(config: str, text_fields, label_names, metrics=("accuracy",),
                type="sequence_classification", max_length=128, **fields):
    return dict(type=type, hub="super_glue", hub_config=config,
                data=dict(train="train", validation="validation"), text_fields=text_fields,
                label_names=label_names, metrics=metrics, max_length=max_length, **fields)


PRESETS: dict[str, dict] = {
    "cola": _glue("cola", ("sentence",), ("unacceptable", "acceptable"),
                  ("matthews_corrcoef", "accuracy")),
    "sst2": _glue("sst2", ("sentence",), ("negative", "positive")),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                  ("accuracy", "f1")),
    "qqp": _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
                 ("accuracy", "f1")),
    "stsb": _glue("stsb", ("sentence1", "sentence2"), metrics=("pearson", "spearman"),
                  type="sequence_regression"),
    "mnli": _glue("mnli", ("premise", "hypothesis"), _NLI3, validation="validation_matched"),
    "mnli_mismatched": _glue("mnli", ("premise", "hypothesis"), _NLI3,
                             validation="validation_mismatched"),
    "qnli": _glue("qnli", ("question", "sentence"), _ENT2),
    "rte": _glue("rte", ("sentence1", "sentence2"), _ENT2, max_length=256),
    "wnli": _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    "conll2003": dict(type="token_classification", hub="conll2003",
                      data=dict(train="train", validation="validation", test="test"),
                      text_fields=("tokens",), label_field="ner_tags", label_names=_NER,
                      metrics=("seqeval",), max_length=128),
    "squad": dict(type="extractive_qa", hub="squad",
                  data=dict(train="train", validation="validation"),
                  text_fields=("question", "context"), label_field="answers", metrics=("squad",),
                  max_length=384, doc_stride=128),
    # SuperGLUE, in the hub's super_glue schema (also that of ../shared/data/<name>).
    "boolq": _super_glue("boolq", ("question", "passage"), ("False", "True"), max_length=256),
    "cb": _super_glue("cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
                      ("accuracy", "f1_macro"), max_length=256),
    # label 0 = choice1, 1 = choice2. jiant's formulation (tasks/lib/copa.py): text_a = the
    # premise and the question as a sentence ("... What was the cause of this?"), text_b = a
    # choice; the context is premise then question, in text_fields order.
    "copa": _super_glue("copa", ("premise", "choice1", "choice2", "question"),
                        ("choice1", "choice2"), type="multiple_choice",
                        choice_fields=("choice1", "choice2"),
                        context_phrases=dict(cause="What was the cause of this?",
                                             effect="What happened as a result?")),
    "superglue_rte": _super_glue("rte", ("premise", "hypothesis"), _ENT2, max_length=256),
    # The few-shot transfer tasks (configs/transfer.py); fields and label orders as in each
    # ../shared/data/<name>/dataset_info.json (the same as the hub datasets').
    "sick": dict(type="sequence_classification", hub="sick",
                 data=dict(train="train", validation="validation", test="test"),
                 text_fields=("sentence_A", "sentence_B"), label_names=_NLI3,
                 metrics=("accuracy",), max_length=128),
    # TREC question classification, the 6 coarse classes; it has no validation split.
    "trec": dict(type="sequence_classification", hub="trec", data=dict(train="train", test="test"),
                 text_fields=("text",), label_field="coarse_label",
                 label_names=("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"),
                 metrics=("accuracy",), max_length=128),
    "ncbi_disease": dict(type="token_classification", hub="ncbi_disease",
                         data=dict(train="train", validation="validation", test="test"),
                         text_fields=("tokens",), label_field="ner_tags",
                         label_names=("O", "B-Disease", "I-Disease"), metrics=("seqeval",),
                         max_length=128),
}
# Benchmark tasks no preset can express with the task types here: name -> why, the error's reason.
UNSUPPORTED: dict[str, str] = {
    "ax": "the hub's glue/ax is one unlabelled test split (labels -1): nothing to train or score",
    "wic": "WiC asks whether `word` means the same in sentence1 and sentence2; a sentence pair "
           "drops which word (start1/end1, start2/end2), and no task type marks spans",
    "multirc": "MultiRC scores (paragraph, question, answer) triples, three texts where the task "
               "types take one or two, and its EM groups the answers of each question",
    "wsc": "WSC asks whether span2 (a pronoun) refers to span1 (span1_index/span2_index), a "
           "span-pair classification no task type does",
    "record": "ReCoRD picks the entity of the passage (entities, entity_spans) that fills the "
              "query's @placeholder, scored by max-over-answers EM/F1: no task type ranks "
              "candidate entities",
}
# max_length of a task built from a dataset_info.json without a preset (others: 128).
_TYPE_MAX_LENGTH = {"extractive_qa": 384}
# dataset_info.json keys -> task fields; of its other keys only those a task type defines as
# fields are used (copa's choice_fields), the rest describes the data.
_INFO_FIELDS = dict(task_type="type", text_fields="text_fields", label_field="label_field",
                    label_names="label_names")
# Why a disagreement between a preset and a dataset_info.json matters, where it is not obvious.
_WHY = dict(label_names=" (the label order fixes what each row of a saved head means)")


def _preset(name: str) -> dict:
    if name in UNSUPPORTED:
        raise UserError(f"preset task {name!r} is not supported: {UNSUPPORTED[name]}")
    if name not in PRESETS:
        raise UserError(f"no preset task {name!r}; presets: {', '.join(sorted(PRESETS))}")
    preset = dict(PRESETS[name])
    preset["data"] = dict(preset["data"])
    return preset


def _definition(name: str, fields: dict, overrides: dict) -> ml_collections.ConfigDict:
    """The definition of ``fields`` (a preset or a dataset_info.json) with ``overrides``.

    Fields the type does not define are left out;
    overrides are passed as given, so a mistyped one stays an error."""
    type_name = overrides.get("type", fields.get("type", ""))
    types = ", ".join(TASK_TYPES.names())
    if not type_name:
        raise UserError(f"task {name!r} has no type (no task_type in its dataset_info.json); "
                        f"pass type=... (one of {types})")
    if type_name not in TASK_TYPES:
        raise UserError(f"task {name!r} is a {type_name!r} task, a type mtl_jax does not have "
                        f"yet (task types: {types}); pick another task or add the type in "
                        f"mtl_jax/tasks/types.py")
    known = set(COMMON_FIELDS) | set(TASK_TYPES.get(type_name).extra_fields)
    kept = {k: v for k, v in fields.items() if k in known}
    return task_definition(**dict(kept, **overrides))


def hub_task(name: str, **overrides) -> ml_collections.ConfigDict:
    """The preset task ``name`` read from the Hugging Face hub (or ``hub=`` a local dataset
    repository folder)."""
    return _definition(name, _preset(name), overrides)


def local_task(name: str, data_dir: str, **overrides) -> ml_collections.ConfigDict:
    """The task ``name`` read from ``data_dir`` (the ../shared/data layout).

    Defined by ``data_dir/name/dataset_info.json`` where there is one (checked against the preset
    of that name, which keeps its metrics and max_length), else by the preset. Splits are the
    ``*.jsonl`` files present; when the folder is not found now, the file's or the preset's split
    names are assumed and a missing file is reported at load.
    """
    folder = f"{data_dir.rstrip('/')}/{name}"
    if not resolve_path(folder).is_dir() and resolve_path(f"{data_dir}/train.jsonl").is_file():
        folder = data_dir.rstrip("/")
    info_path = resolve_path(f"{folder}/dataset_info.json")
    info = read_dataset_info(info_path)
    if not info and name not in PRESETS and name not in UNSUPPORTED:
        raise UserError(f"no preset task {name!r} and no {info_path} to define it; add that file "
                        f"(task_type, text_fields, label_field, label_names) or use a preset: "
                        f"{', '.join(sorted(PRESETS))}")
    fields = _info_fields(info)
    if name in PRESETS or not info:
        preset = _preset(name)
        _check_agreement(name, preset, fields, info_path, overrides)
        fields = dict(fields, **preset)
    fields.setdefault("max_length", _TYPE_MAX_LENGTH.get(fields.get("type"), 128))
    fields.update(hub="", hub_config="", data=_local_splits(folder, info, fields))
    return _definition(name, fields, overrides)


def _info_fields(info: dict) -> dict:
    """Task fields from a dataset_info.json; its other keys as they are (a type may define some:
    copa's choice_fields)."""
    fields = {k: v for k, v in info.items() if k not in _INFO_FIELDS}
    fields.update({field: info[key] for key, field in _INFO_FIELDS.items() if key in info})
    for key in ("text_fields", "label_names"):
        if key in fields:
            fields[key] = tuple(fields[key] or ())
    return fields


def _check_agreement(name: str, preset: dict, fields: dict, info_path, overrides: dict) -> None:
    """The preset and the dataset_info.json name the same type, columns and label order (an
    empty label list in the file says nothing; an override decides for itself)."""
    for key in _INFO_FIELDS.values():
        if key in overrides or key not in fields or (key == "label_names" and not fields[key]):
            continue
        ours, theirs = preset.get(key, COMMON_FIELDS[key]), fields[key]
        if ours != theirs:
            raise UserError(f"local_task({name!r}): {key} differ between the preset ({ours!r}) "
                            f"and {info_path} ({theirs!r}){_WHY.get(key, '')}; fix the file, or "
                            f"pass {key}=... to local_task to choose")


def _local_splits(folder: str, info: dict, fields: dict) -> dict[str, str]:
    splits = ("train", "validation", "test")
    present = [s for s in splits if resolve_path(f"{folder}/{s}.jsonl").is_file()]
    if not present:
        expected = info.get("splits") or fields.get("data") or ()
        present = [s for s in splits if s in expected] or ["train", "validation"]
    return {s: f"{folder}/{s}.jsonl" for s in present}
