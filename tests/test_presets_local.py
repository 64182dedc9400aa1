"""Presets: every ../shared/data folder defines its task by name from its dataset_info.json; the
SuperGLUE presets and those not supported; evaluation-only tasks refused before training; a local
dataset repository read by the same hub reader (``datasets.load_dataset``) as a hub name."""
import json
import os
import pathlib

import pytest
import transformers

from data_helpers import base_config, write_jsonl
from mtl_jax.data import readers
from mtl_jax.data.pipeline import build_data
from mtl_jax.tasks import presets
from mtl_jax.tasks.types import TASK_TYPES
from run_helpers import one_line_error, tiny_config

SUPERGLUE = ("boolq", "cb", "copa", "multirc", "record", "wic", "wsc")
GLUE = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
READ_LIMIT = 8 << 20  # bytes: a bigger train file (SQuAD's 82 MiB) is skipped for a smaller split
CB_NAMES = ("entailment", "contradiction", "neutral")


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


error = one_line_error  # tests name it error()


def shared_infos(shared_data) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted(shared_data.glob("*/dataset_info.json"))}


# --- every shared folder by name ----------------------------------------------------------------

def test_every_shared_folder_defines_its_task_by_name(shared_data):
    infos = shared_infos(shared_data)
    assert {"squad", "qnli", "boolq", "copa"} <= set(infos)
    for name, info in infos.items():
        task = presets.local_task(name, str(shared_data))
        assert task.type == info["task_type"], name
        assert list(task.text_fields) == info["text_fields"], name
        assert task.label_field == info["label_field"], name
        assert list(task.label_names) == (info["label_names"] or []), name
        assert sorted(task.data) == sorted(info["splits"]), name
        assert all(pathlib.Path(p).is_file() for p in task.data.values()), name
        for key in TASK_TYPES.get(task.type).extra_fields.keys() & info.keys():
            value = info[key]  # a field the type defines (copa's choice_fields)
            assert task[key] == (tuple(value) if isinstance(value, list) else value), name


def _expected(task_type: str, line: dict, task) -> dict:
    """What parsing a raw JSON line must give, from the line itself."""
    if task_type == "token_classification":
        return dict(words=line[task.text_fields[0]], tags=line[task.label_field])
    if task_type == "extractive_qa":
        answers = line[task.label_field]
        return dict(id=line["id"], answers=answers["text"],
                    spans=[(s, s + len(t)) for t, s in zip(answers["text"],
                                                          answers["answer_start"])])
    if task_type == "multiple_choice":  # the context's phrasing: tests/test_multiple_choice.py
        return dict(choices=tuple(line[f] for f in task.choice_fields),
                    label=line[task.label_field])
    return dict(texts=tuple(line[f] for f in task.text_fields), label=line[task.label_field])


def test_a_few_rows_of_every_shared_task_read_and_parse(shared_data):
    """The train split where there is one (a smaller split when it is huge): every row is read,
    the first rows are the file's lines and parse into the task's labels."""
    for name, info in shared_infos(shared_data).items():
        task = presets.local_task(name, str(shared_data))
        sizes = {s: pathlib.Path(p).stat().st_size for s, p in task.data.items()}
        split = ("train" if sizes.get("train", READ_LIMIT) < READ_LIMIT
                 else min(sizes, key=sizes.get))
        rows = readers.read_split(name, split, task)
        assert len(rows) == info["splits"][split], name
        with open(task.data[split], encoding="utf-8") as f:
            lines = [json.loads(next(f)) for _ in range(5)]
        task_type = TASK_TYPES.get(task.type)
        label_ids = {n: i for i, n in enumerate(task.label_names)}
        for (where, record), line in zip(rows, lines):
            assert record == line, where
            example = task_type.parse(record, where, task, label_ids)
            expected = _expected(task.type, line, task)
            assert {k: example[k] for k in expected} == expected, where


# --- dataset_info.json against the preset ---------------------------------------------------------

def _folder(root, name, info, rows=()):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps(info))
    for split in ("train", "validation"):
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def test_a_preset_and_its_dataset_info_disagreeing_is_an_error_naming_both(tmp_path):
    info = dict(task_type="sequence_classification", text_fields=["sentence1", "sentence2"],
                label_field="label", label_names=["not_entailment", "entailment"])
    folder = _folder(tmp_path, "rte", info)
    message = error(presets.local_task, "rte", str(tmp_path))
    assert ("label_names differ between the preset (('entailment', 'not_entailment')) and "
            f"{folder / 'dataset_info.json'} (('not_entailment', 'entailment'))") in message
    assert "saved head" in message
    chosen = presets.local_task("rte", str(tmp_path), label_names=("not_entailment", "entailment"))
    assert chosen.label_names == ("not_entailment", "entailment")

    (folder / "dataset_info.json").write_text(json.dumps(dict(info, text_fields=["premise"],
                                                              label_names=None)))
    assert "text_fields differ between the preset" in error(presets.local_task, "rte",
                                                            str(tmp_path))


def test_a_folder_without_preset_is_defined_by_its_dataset_info(tmp_path, tokenizer):
    rows = [dict(s1="a man sleeps", s2="a person rests", gold=2),
            dict(s1="a dog runs", s2="a cat sits", gold=0),
            dict(s1="kids play", s2="children play", gold=1)]
    info = dict(task_type="sequence_classification", text_fields=["s1", "s2"], label_field="gold",
                label_names=["yes", "no", "maybe"], splits=dict(train=3, validation=3))
    _folder(tmp_path, "mynli", info, rows)
    task = presets.local_task("mynli", str(tmp_path))
    assert (task.type, task.text_fields, task.label_field, task.label_names) == (
        "sequence_classification", ("s1", "s2"), "gold", ("yes", "no", "maybe"))
    assert task.metrics == TASK_TYPES.get(task.type).default_metrics and task.max_length == 128
    config = base_config(tmp_path)
    config.tasks.mynli = task
    data = build_data(config, tokenizer).split("mynli", "train")
    assert data.spec.label_names == ("yes", "no", "maybe")
    assert data.features.arrays["label"].tolist() == [r["gold"] for r in rows]
    # A name whose preset is not supported: the user's own dataset_info.json defines it.
    _folder(tmp_path, "wic", dict(info, text_fields=["s1", "s2"]), rows)
    assert presets.local_task("wic", str(tmp_path)).text_fields == ("s1", "s2")
    qa = dict(task_type="extractive_qa", text_fields=["question", "context"],
              label_field="answers", label_names=None)
    _folder(tmp_path, "myqa", qa)
    assert presets.local_task("myqa", str(tmp_path)).max_length == 384
    (tmp_path / "nothing").mkdir()
    assert "no preset task 'nothing' and no" in error(presets.local_task, "nothing",
                                                      str(tmp_path))


# --- hub presets ----------------------------------------------------------------------------------

def test_glue_and_superglue_presets_or_a_reason(tmp_path):
    assert set(GLUE) <= set(presets.PRESETS)
    assert "superglue_rte" in presets.PRESETS
    for name in SUPERGLUE:
        assert (name in presets.PRESETS) != (name in presets.UNSUPPORTED), name
    for name, reason in presets.UNSUPPORTED.items():
        expected = f"preset task {name!r} is not supported: {reason}"
        assert error(presets.hub_task, name) == expected
        assert error(presets.local_task, name, str(tmp_path)) == expected
    sg = presets.hub_task("superglue_rte")
    assert (sg.hub, sg.hub_config, sg.text_fields) == ("super_glue", "rte",
                                                       ("premise", "hypothesis"))
    copa = presets.hub_task("copa")
    assert (copa.type, copa.hub_config, copa.choice_fields) == ("multiple_choice", "copa",
                                                                ("choice1", "choice2"))


# --- evaluation-only ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qnli", "boolq"])
def test_an_evaluation_only_task_is_refused_before_training(tmp_path, shared_data, name,
                                                            monkeypatch):
    from mtl_jax.training import runner

    config = tiny_config(tmp_path, tasks=("sent",))
    config.tasks[name] = presets.local_task(name, str(shared_data), max_length=32)
    workdir = tmp_path / "run"
    built = []  # build_run reads and tokenizes every split: the config check comes first
    monkeypatch.setattr(runner, "build_run", lambda *args, **kwargs: built.append(args))
    message = error(runner.run, "train", config, str(workdir))
    assert built == []
    assert message.startswith(f"tasks.{name} is evaluation-only: it has no train split (only "
                              f"validation)")
    assert "--mode=eval" in message and f"tasks.{name}.data.train=PATH" in message
    assert not workdir.exists()  # refused before anything was written


# --- a local dataset repository through the hub reader ------------------------------------------

CARD = """---
dataset_info:
  features:
  - name: premise
    dtype: string
  - name: hypothesis
    dtype: string
  - name: idx
    dtype: int32
  - name: label
    dtype:
      class_label:
        names:
          '0': entailment
          '1': contradiction
          '2': neutral
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train.jsonl
  - split: validation
    path: data/validation.jsonl
---
# A CB-shaped dataset repository (super_glue/cb schema)
"""


def _cb_rows(n: int, offset: int) -> list[dict]:
    return [dict(premise=f"premise number {i}", hypothesis=f"hypothesis {i}", idx=i, label=i % 3)
            for i in range(offset, offset + n)]


def test_a_local_dataset_repository_reads_through_the_hub_reader(tmp_path, monkeypatch,
                                                                  tokenizer):
    import datasets

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    repo = tmp_path / "cb_repo"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(CARD)
    rows = dict(train=_cb_rows(6, 0), validation=_cb_rows(4, 100))
    for split, split_rows in rows.items():
        write_jsonl(repo / "data" / f"{split}.jsonl", split_rows)
    loaded = []
    load_dataset = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, *a, **k: loaded.append(path) or load_dataset(path, *a, **k))

    task = presets.hub_task("cb", hub=str(repo), hub_config="", label_names=(), max_length=32)
    read = readers.read_split("cb", "validation", task)
    assert [record for _, record in read] == rows["validation"]
    assert read[0][0] == f"{repo}[validation] row 0" and loaded == [str(repo)]

    config = base_config(tmp_path)
    config.tasks.cb = task
    data = build_data(config, tokenizer).split("cb", "train")
    assert data.spec.label_names == CB_NAMES  # from the card's ClassLabel, as for a hub name
    assert data.features.arrays["label"].tolist() == [r["label"] for r in rows["train"]]

    before = readers.source_fingerprint("cb", "train", task)
    write_jsonl(repo / "data" / "train.jsonl", _cb_rows(7, 0))
    assert readers.source_fingerprint("cb", "train", task) != before  # edits re-tokenize
    assert readers.source_fingerprint("cb", "train", presets.hub_task("cb")) == dict(
        hub="super_glue/cb[train]")
