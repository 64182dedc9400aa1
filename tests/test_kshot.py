"""k-shot training subsets (tasks.<name>.k_shot / k_shot_seed) and the few-shot task presets."""
import collections
import json
import zlib

import numpy as np
import pytest
import transformers

from data_helpers import base_config, write_jsonl
from mtl_jax.data.kshot import k_shot
from mtl_jax.data.pipeline import build_data, train_examples
from mtl_jax.errors import UserError
from mtl_jax.tasks import presets
from mtl_jax.tasks.definitions import definition_fingerprint, task_definition

CLASSES = ("a", "b", "c")
COUNTS = dict(a=20, b=9, c=4)  # uneven; "c" has fewer than k=5


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


def class_rows(counts=COUNTS, order_seed=0):
    """Rows of every class, interleaved in a seeded order; each text is unique."""
    rows = [dict(sentence=f"{name} example number {i}", label=name)
            for name, n in counts.items() for i in range(n)]
    order = np.random.default_rng(order_seed).permutation(len(rows))
    return [rows[i] for i in order]


def cls_config(tmp_path, rows, k=5, seed=0, name="train.jsonl"):
    config = base_config(tmp_path)
    config.tasks.cls = task_definition(
        "sequence_classification", text_fields=("sentence",), label_names=CLASSES,
        max_length=32, k_shot=k, k_shot_seed=seed,
        data=dict(train=write_jsonl(tmp_path / name, rows),
                  validation=write_jsonl(tmp_path / "val.jsonl", class_rows(order_seed=9))))
    return config


def reference_pick(rows, k, seed):
    """The brief's rule by hand: per class, the first k of default_rng([seed, crc32(class)])'s
    permutation of that class's rows in file order."""
    chosen = set()
    for name in CLASSES:
        members = [r["sentence"] for r in rows if r["label"] == name]
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(members))
        chosen |= {members[i] for i in order[:k]}
    return chosen


def texts(task_data):
    return [e["texts"][0] for e in task_data.examples]


def test_exactly_k_per_class_through_build_data(tmp_path, tokenizer):
    rows = class_rows()
    lines = []
    run = build_data(cls_config(tmp_path, rows), tokenizer, log=lines.append)
    train = run.split("cls", "train")
    counts = collections.Counter(CLASSES[e["label"]] for e in train.examples)
    assert counts == {"a": 5, "b": 5, "c": 4}
    assert set(texts(train)) == reference_pick(rows, 5, 0)
    # kept in file order, and the tokenized features are those of the subset
    file_order = [r["sentence"] for r in rows]
    assert texts(train) == sorted(texts(train), key=file_order.index)
    assert train.features.arrays["label"].tolist() == [e["label"] for e in train.examples]
    assert "cls/train: k_shot=5 (seed 0): 14 of 33 examples" in lines
    assert "cls/train: k_shot=5: class c has only 4 examples, all taken" in lines
    assert len(run.split("cls", "validation").examples) == 33  # evaluation splits untouched
    # the driver-side count (mtl_jax.transfer) reads the same subset
    assert [e["texts"][0] for e in train_examples(run.config, "cls")] == texts(train)


def test_same_seed_same_subset_other_seed_differs(tmp_path, tokenizer):
    rows = class_rows()
    first = texts(build_data(cls_config(tmp_path, rows, seed=3), tokenizer).split("cls", "train"))
    again = texts(build_data(cls_config(tmp_path, rows, seed=3), tokenizer).split("cls", "train"))
    other = build_data(cls_config(tmp_path, rows, seed=4), tokenizer).split("cls", "train")
    assert first == again
    assert not other.from_cache  # the seed is part of the features' cache key
    assert set(texts(other)) != set(first) and set(texts(other)) == reference_pick(rows, 5, 4)
    # A class's pick depends on its own rows only: move and drop rows of the other classes (the
    # a rows keep their order among themselves).
    others = [r for r in rows if r["label"] != "a"][::-2]
    moved = others[:3] + [r for r in rows if r["label"] == "a"] + others[3:]
    moved_run = build_data(cls_config(tmp_path, moved, seed=3, name="moved.jsonl"), tokenizer)
    kept_a = {t for t in texts(moved_run.split("cls", "train")) if t.startswith("a ")}
    assert kept_a == {t for t in first if t.startswith("a ")}
    # nested in k for a fixed seed
    bigger = build_data(cls_config(tmp_path, rows, k=8, seed=3), tokenizer).split("cls", "train")
    assert set(first) < set(texts(bigger))


def test_regression_and_token_tasks_take_k_examples(tmp_path, tokenizer):
    config = base_config(tmp_path)
    sim = [dict(s1=f"a sentence {i}", s2=f"another one {i}", score=i / 10) for i in range(30)]
    ner = [dict(tokens=["word", str(i)], tags=["O", "B-X"]) for i in range(30)]
    config.tasks.sim = task_definition(
        "sequence_regression", text_fields=("s1", "s2"), label_field="score", k_shot=7,
        k_shot_seed=1, max_length=32, data=dict(train=write_jsonl(tmp_path / "sim.jsonl", sim)))
    config.tasks.ner = task_definition(
        "token_classification", text_fields=("tokens",), label_field="tags", k_shot=40,
        label_names=("O", "B-X"), max_length=32,
        data=dict(train=write_jsonl(tmp_path / "ner.jsonl", ner)))
    lines = []
    run = build_data(config, tokenizer, splits=("train",), log=lines.append)
    targets = [e["target"] for e in run.split("sim", "train").examples]
    expected = np.sort(np.random.default_rng([1, zlib.crc32(b"")]).permutation(30)[:7])
    assert targets == [i / 10 for i in expected]
    assert len(run.split("ner", "train").examples) == 30  # fewer than k: all of them
    assert "ner/train: k_shot=40: only 30 examples, all taken" in lines


def test_k_shot_with_max_train_examples_is_refused(tmp_path, tokenizer):
    config = cls_config(tmp_path, class_rows())
    config.tasks.cls.max_train_examples = 10
    with pytest.raises(UserError, match="sets both k_shot=5 and max_train_examples=10; k_shot "
                                        "replaces max_train_examples"):
        build_data(config, tokenizer)
    config.tasks.cls.max_train_examples = 0
    config.tasks.cls.k_shot = -1
    with pytest.raises(UserError, match="must be >= 0"):
        build_data(config, tokenizer)


def test_fingerprint_has_the_k_shot_fields():
    task = task_definition("sequence_classification", text_fields=("s",), data=dict(train="x"),
                           k_shot=16, k_shot_seed=2)
    assert definition_fingerprint(task)["k_shot"] == 16
    assert definition_fingerprint(task)["k_shot_seed"] == 2


def test_k_shot_function_notes_a_class_without_examples():
    examples = [dict(texts=("x",), label=0), dict(texts=("y",), label=0)]
    subset, notes = k_shot(examples, 1, 0, ("p", "q"))
    assert len(subset) == 1
    assert notes == ["k_shot=1 (seed 0): 1 of 2 examples",
                     "k_shot=1: class q has only 0 examples, all taken"]


@pytest.mark.parametrize("name,splits,label_field", [
    ("cb", ("train", "validation"), "label"),
    ("sick", ("test", "train", "validation"), "label"),
    ("trec", ("test", "train"), "coarse_label"),
    ("ncbi_disease", ("test", "train", "validation"), "ner_tags"),
])
def test_few_shot_presets_match_the_shared_data(shared_data, name, splits, label_field):
    task = presets.local_task(name, str(shared_data))
    info = json.loads((shared_data / name / "dataset_info.json").read_text())
    assert tuple(sorted(task.data)) == splits
    assert task.type == info["task_type"] and task.label_field == label_field
    assert list(task.text_fields) == info["text_fields"]
    assert list(task.label_names) == info["label_names"]
    first = json.loads((shared_data / name / "train.jsonl").open().readline())
    assert all(f in first for f in (*task.text_fields, task.label_field))
