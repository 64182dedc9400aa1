"""Presets for common tasks (GLUE, CoNLL-2003, SQuAD v1.1; CB, SICK, TREC, NCBI-disease): hub
names and label orders.

``hub_task("rte")`` reads the hub dataset; ``local_task("rte", "../shared/data")`` reads the same
task from ``DATA_DIR/rte/{train,validation,test}.jsonl`` (or from DATA_DIR itself when the files
lie directly in it). Relative paths are kept as given and resolved at load time (current
directory, then the repo root).
"""
from __future__ import annotations

import ml_collections

from mtl_jax.errors import UserError
from mtl_jax.tasks.definitions import resolve_path, task_definition

_NLI3 = ("entailment", "neutral", "contradiction")
_ENT2 = ("entailment", "not_entailment")
_NER = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def _glue(config: str, text_fields, label_names=(), metrics=("accuracy",),
          type="sequence_classification", validation="validation", max_length=128):
    return dict(type=type, hub="glue", hub_config=config,
                data=dict(train="train", validation=validation),
                text_fields=text_fields, label_names=label_names, metrics=metrics,
                max_length=max_length)


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
    "ax": _glue("ax", ("premise", "hypothesis"), _NLI3),
    "conll2003": dict(type="token_classification", hub="conll2003",
                      data=dict(train="train", validation="validation", test="test"),
                      text_fields=("tokens",), label_field="ner_tags", label_names=_NER,
                      metrics=("seqeval",), max_length=128),
    "squad": dict(type="extractive_qa", hub="squad",
                  data=dict(train="train", validation="validation"),
                  text_fields=("question", "context"), label_field="answers", metrics=("squad",),
                  max_length=384, doc_stride=128),
    # The few-shot transfer tasks (configs/transfer.py); fields and label orders as in each
    # ../shared/data/<name>/dataset_info.json (the same as the hub datasets').
    "cb": dict(type="sequence_classification", hub="super_glue", hub_config="cb",
               data=dict(train="train", validation="validation"),
               text_fields=("premise", "hypothesis"), label_names=("entailment", "contradiction",
                                                                   "neutral"),
               metrics=("accuracy", "f1_macro"), max_length=256),
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
# The hub's GLUE "ax" split is test-only (unlabelled); keep it out of the hub preset's training
# data.
PRESETS["ax"]["data"] = dict(validation="test")


def _preset(name: str) -> dict:
    if name not in PRESETS:
        raise UserError(f"no preset task {name!r}; presets: {', '.join(sorted(PRESETS))}")
    preset = dict(PRESETS[name])
    preset["data"] = dict(preset["data"])
    return preset


def hub_task(name: str, **overrides) -> ml_collections.ConfigDict:
    """The preset task ``name`` read from the Hugging Face hub."""
    return task_definition(**dict(_preset(name), **overrides))


def local_task(name: str, data_dir: str, **overrides) -> ml_collections.ConfigDict:
    """The preset task ``name`` read from ``data_dir`` (the ../shared/data layout).

    Splits are the ``*.jsonl`` files present in ``data_dir/name`` (or ``data_dir``); when the folder
    is not found now, the preset's split names are assumed and a missing file is reported at load.
    """
    preset = _preset(name)
    folder = f"{data_dir.rstrip('/')}/{name}"
    if not resolve_path(folder).is_dir() and resolve_path(f"{data_dir}/train.jsonl").is_file():
        folder = data_dir.rstrip("/")
    splits = ("train", "validation", "test")
    present = [s for s in splits if resolve_path(f"{folder}/{s}.jsonl").is_file()]
    if not present:
        present = [s for s in splits if s in preset["data"]] or ["train", "validation"]
    preset.update(hub="", hub_config="", data={s: f"{folder}/{s}.jsonl" for s in present})
    return task_definition(**dict(preset, **overrides))
