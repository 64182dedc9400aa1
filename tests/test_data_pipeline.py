"""Loading, tokenization, label alignment, QA windows, buckets, samplers and the resumable
iterator."""
import json

import numpy as np
import pytest
import transformers

from data_helpers import base_config, write_jsonl
from mtl_jax.data import batching
from mtl_jax.data.pipeline import build_data
from mtl_jax.data.samplers import build_sampler
from mtl_jax.errors import UserError
from mtl_jax.evaluation import evaluate_task
from mtl_jax.evaluation.qa_postprocess import best_answers
from mtl_jax.tasks.definitions import task_definition
from mtl_jax.tasks.types import TASK_TYPES
from mtl_jax.text.tokenize import _answer_tokens

WORDS = (
    "the cat sat on a mat while an extraordinarily unaffable dog barked loudly at midnight"
).split()


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


def sentence_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [dict(sentence=" ".join(rng.choice(WORDS, size=rng.integers(2, 40))),
                 label=int(rng.integers(2)))
            for _ in range(n)]


def tag_rows(n, seed=1):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = list(rng.choice(WORDS, size=rng.integers(1, 20)))
        rows.append(dict(tokens=words,
                         ner_tags=[int(t) for t in rng.integers(0, 5, size=len(words))]))
    return rows


def multitask_config(tmp_path, n_cls=50, n_tag=30, **data):
    config = base_config(tmp_path, **data)
    config.tasks.cls = task_definition(
        "sequence_classification", text_fields=("sentence",), label_names=("neg", "pos"),
        max_length=64,
        data=dict(train=write_jsonl(tmp_path / "cls_train.jsonl", sentence_rows(n_cls)),
                  validation=write_jsonl(tmp_path / "cls_val.jsonl", sentence_rows(13, seed=5))))
    config.tasks.ner = task_definition(
        "token_classification", text_fields=("tokens",), label_field="ner_tags", max_length=64,
        label_names=("O", "B-PER", "I-PER", "B-LOC", "I-LOC"),
        data=dict(train=write_jsonl(tmp_path / "ner_train.jsonl", tag_rows(n_tag)),
                  validation=write_jsonl(tmp_path / "ner_val.jsonl", tag_rows(7, seed=3))))
    return config


def test_jsonl_task_loads_tokenizes_and_batches(tmp_path, tokenizer):
    rows = sentence_rows(10)
    config = base_config(tmp_path, buckets=(8, 16, 64))
    config.tasks.sst = dict(type="sequence_classification", text_fields=("sentence",),
                            label_names=("n", "p"), max_length=64,
                            data=dict(train=write_jsonl(tmp_path / "t.jsonl", rows)))
    run = build_data(config, tokenizer, splits=("train",))
    assert run.specs[0].num_labels == 2 and run.specs[0].index == 0
    data = run.split("sst", "train")
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(data.features.tokens("input_ids", i),
                                      tokenizer(row["sentence"])["input_ids"])
    (indices, batch), = list(data.batches(16, sort_by_length=False))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "task_id", "weight",
                          "label"}
    longest = max(len(tokenizer(r["sentence"])["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (16, batching.bucket_length(longest, (8, 16, 64)))
    np.testing.assert_array_equal(batch["label"][:10], [r["label"] for r in rows])
    np.testing.assert_array_equal(batch["weight"], [1.0] * 10 + [0.0] * 6)
    np.testing.assert_array_equal(batch["attention_mask"][:10].sum(1), data.features.lengths)


def test_sentence_pairs_truncate_to_max_length(tmp_path, tokenizer):
    rows = [dict(a=" ".join(WORDS * 3), b="short one", label="yes"),
            dict(a="tiny", b="also tiny", label="no")]
    config = base_config(tmp_path)
    config.tasks.pair = dict(type="sequence_classification", text_fields=("a", "b"), max_length=20,
                             data=dict(train=write_jsonl(tmp_path / "p.jsonl", rows)))
    run = build_data(config, tokenizer, splits=("train",))
    data = run.split("pair", "train")
    assert run.specs[0].label_names == ("no", "yes")  # derived from string labels, sorted
    expected = tokenizer(rows[0]["a"], rows[0]["b"], truncation=True, max_length=20)
    np.testing.assert_array_equal(data.features.tokens("input_ids", 0), expected["input_ids"])
    np.testing.assert_array_equal(data.features.tokens("token_type_ids", 0),
                                  expected["token_type_ids"])
    assert data.features.lengths[0] == 20 and data.features.arrays["label"].tolist() == [1, 0]


def test_token_label_alignment_first_subtoken(tmp_path, tokenizer):
    words = ["EU", "rejects", "unaffable", "Germans"]
    assert tokenizer.convert_ids_to_tokens(
        tokenizer(words, is_split_into_words=True)["input_ids"]
    ) == ["[CLS]", "eu", "rejects", "una", "##ffa", "##ble", "germans", "[SEP]"]
    names = ("O", "B-ORG", "I-ORG", "B-MISC", "I-MISC")
    rows = [dict(tokens=words, tags=["B-ORG", "O", "B-MISC", "B-MISC"])]
    for label_all, expected in [(False, [-100, 1, 0, 3, -100, -100, 3, -100]),
                                (True, [-100, 1, 0, 3, 4, 4, 3, -100])]:
        config = base_config(tmp_path, label_all_subtokens=label_all)
        config.tasks.ner = dict(type="token_classification", text_fields=("tokens",),
                                label_field="tags", label_names=names,
                                data=dict(train=write_jsonl(tmp_path / "n.jsonl", rows)))
        data = build_data(config, tokenizer, splits=("train",)).split("ner", "train")
        assert data.features.tokens("tag_ids", 0).tolist() == expected
        assert data.features.tokens("word_ids", 0).tolist() == [-1, 0, 1, 2, -1, -1, 3, -1]


def test_conll_column_file(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text(
        "-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\n")
    config = base_config(tmp_path)
    config.tasks.ner = dict(type="token_classification", text_fields=("tokens",),
                            label_field="ner_tags", label_names=("O", "B-PER", "B-ORG"),
                            data=dict(train=str(tmp_path / "train.txt")))
    data = build_data(config, tokenizer, splits=("train",)).split("ner", "train")
    assert [e["words"] for e in data.examples] == [["EU", "rejects"], ["Peter"]]
    assert [e["tags"] for e in data.examples] == [[2, 0], [1]]
    assert data.examples[1]["where"].endswith("train.txt:6")


def test_csv_tsv_and_dataset_info_label_names(tmp_path, tokenizer):
    folder = tmp_path / "mytask"
    folder.mkdir()
    (folder / "train.tsv").write_text('sentence\tlabel\nhe said "hi\t1\nno\t0\n')
    (folder / "validation.csv").write_text('sentence,label\n"a, b",0\n')
    (folder / "dataset_info.json").write_text(
        json.dumps(dict(label_field="label", label_names=["bad", "good"])))
    config = base_config(tmp_path)
    config.tasks.t = dict(type="sequence_classification", text_fields=("sentence",),
                          data=dict(train=str(folder / "train.tsv"),
                                    validation=str(folder / "validation.csv")))
    run = build_data(config, tokenizer)
    assert run.specs[0].label_names == ("bad", "good")
    assert [e["texts"][0] for e in run.split("t", "train").examples] == ['he said "hi', "no"]
    assert run.split("t", "train").features.arrays["label"].tolist() == [1, 0]
    assert run.split("t").examples[0]["texts"] == ("a, b",)


def long_context():
    sentences = [f"Sentence number {i} talks about the weather in town {i}." for i in range(40)]
    sentences[31] = "The treasure was hidden by Captain Flint near the old oak tree."
    return " ".join(sentences)


def test_qa_windows_and_postprocessing_recover_answer(tmp_path, tokenizer):
    context = long_context()
    answer = "Captain Flint"
    rows = [dict(id="q1", question="Who hid the treasure?", context=context,
                 answers=dict(text=[answer], answer_start=[context.index(answer)])),
            dict(id="q2", question="What talks about the weather?", context=context,
                 answers=dict(text=["Sentence number 0"], answer_start=[0]))]
    config = base_config(tmp_path, buckets=(64,))
    config.tasks.qa = dict(type="extractive_qa", text_fields=("question", "context"),
                           label_field="answers", max_length=64, doc_stride=16,
                           max_answer_length=10,
                           data=dict(validation=write_jsonl(tmp_path / "qa.jsonl", rows)))
    data = build_data(config, tokenizer, splits=("validation",)).split("qa")
    features = data.features
    windows = np.flatnonzero(features.arrays["example_index"] == 0)
    assert len(windows) > 5  # the long context is split into many windows
    with_answer = []
    for f in windows:
        s, e = features.arrays["start_positions"][f], features.arrays["end_positions"][f]
        if s == 0:
            assert e == 0  # answer outside this window -> CLS
            continue
        with_answer.append(f)
        offsets = features.tokens("offset_mapping", f)
        assert context[offsets[s][0]:offsets[e][1]] == answer
        assert tokenizer.decode(features.tokens("input_ids", f)[s:e + 1]) == answer.lower()
    assert with_answer  # at least one window holds the whole answer

    # Gold one-hot logits plus a distractor in a window without the answer: the merged best is
    # exact.
    def predict(batch):
        logits = np.full(batch["input_ids"].shape + (2,), -5.0, np.float32)
        for r in range(len(batch["weight"])):
            s, e = batch["start_positions"][r], batch["end_positions"][r]
            if s > 0:
                logits[r, s, 0] = logits[r, e, 1] = 10.0
            else:  # a weaker span of valid context tokens
                logits[r, 20, 0] = logits[r, 21, 1] = 3.0
        return logits

    metrics, report = evaluate_task(data, predict, batch_size=4)
    assert metrics == {"exact_match": 1.0, "f1": 1.0}
    outputs = [predict(b)[i, :features.lengths[f]]
               for idx, b in data.batches(64) for i, f in enumerate(idx)]
    order = np.concatenate([idx for idx, _ in data.batches(64)])
    by_feature = [None] * len(order)
    for f, o in zip(order, outputs):
        by_feature[f] = o
    assert (best_answers(data.examples, features, by_feature, max_answer_length=10)
            == [answer, "Sentence number 0"])
    assert (best_answers(data.examples, features, by_feature, max_answer_length=1)
            != [answer, "Sentence number 0"])


def test_buckets_bound_shapes_and_eval_keeps_every_example_once(tmp_path, tokenizer):
    buckets = (8, 16, 32, 64)
    config = multitask_config(tmp_path, buckets=buckets)
    run = build_data(config, tokenizer)
    it = run.train_iterator(8, seed=3, process_index=0, process_count=1)
    lengths = set()
    for _ in range(40):
        batch = next(it)
        length = batch["input_ids"].shape[1]
        real = batch["attention_mask"].sum(1).max()
        assert length == min(b for b in buckets if b >= real)
        lengths.add(length)
    assert lengths <= set(buckets) and len(lengths) >= 2
    for name in run.eval_tasks():
        data = run.split(name)
        seen = np.concatenate([idx for idx, _ in data.batches(4)])
        weights = sum(b["weight"].sum() for _, b in data.batches(4))
        assert (sorted(seen.tolist()) == list(range(len(data.features)))
                and weights == len(data.features))


@pytest.mark.parametrize("name", ["proportional", "temperature", "uniform", "round_robin",
                                  "rates"])
def test_sampler_empirical_rates_match_formula(name, tmp_path):
    sizes = np.array([4000, 900, 100])
    data = base_config(tmp_path, temperature=3.0, size_cap=1000).data
    data.sampling_rates = dict(c=1.0, a=2.0, b=5.0)  # by name, any order, normalised
    expected = dict(proportional=np.minimum(sizes, 1000) / np.minimum(sizes, 1000).sum(),
                    temperature=sizes ** (1 / 3) / (sizes ** (1 / 3)).sum(),
                    uniform=np.ones(3) / 3, round_robin=np.ones(3) / 3,
                    rates=np.array([2.0, 5.0, 1.0]) / 8.0)[name]
    sampler = build_sampler(name, sizes.tolist(), data, seed=0, names=("a", "b", "c"))
    np.testing.assert_allclose(sampler.rates, expected, rtol=1e-12)
    draws = np.concatenate([sampler.tasks(step, 1) for step in range(6000)])
    counts = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(counts, expected, atol=4 * np.sqrt(0.25 / 6000))  # 4 sigma
    mixed = np.concatenate([sampler.tasks(step, 16) for step in range(600)])
    np.testing.assert_allclose(np.bincount(mixed, minlength=3) / len(mixed), expected, atol=0.02)
    if name == "round_robin":
        assert draws[:6].tolist() == [0, 1, 2, 0, 1, 2]


def test_given_rates_must_name_every_trained_task_and_be_positive(tmp_path):
    data = base_config(tmp_path).data
    data.sampling_rates = dict(a=1.0, z=1.0)
    with pytest.raises(UserError, match=r"rate for each trained task \['a', 'b'\]; "
                                        r"unknown \['z'\]; missing \['b'\]"):
        build_sampler("rates", [10, 10], data, seed=0, names=("a", "b"))
    data.sampling_rates = dict(a=0.0, b=-1.0)
    with pytest.raises(UserError, match="must be >= 0 with a positive sum"):
        build_sampler("rates", [10, 10], data, seed=0, names=("a", "b"))


@pytest.mark.parametrize("mode", ["homogeneous", "mixed", "stacked"])
def test_iterator_save_restore_gives_identical_batches(mode, tmp_path, tokenizer):
    config = multitask_config(tmp_path, n_cls=11, n_tag=7, batch_mode=mode, sampler="temperature")
    run = build_data(config, tokenizer)
    reference = run.train_iterator(6, seed=1, process_index=0, process_count=1)
    expected = [next(reference) for _ in range(15)]  # several epochs of both tasks
    first = run.train_iterator(6, seed=1, process_index=0, process_count=1)
    for _ in range(8):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = run.train_iterator(6, seed=1, process_index=0, process_count=1)
    resumed.set_state(state)
    for want in expected[8:]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert state["tasks"]["ner"]["epoch"] >= 1  # restored across an epoch boundary
    other_seed = run.train_iterator(6, seed=2, process_index=0, process_count=1)
    assert any(not np.array_equal(next(other_seed)["input_ids"], b["input_ids"])
               for b in expected[:3])


def test_mixed_and_stacked_batch_contents(tmp_path, tokenizer):
    config = multitask_config(tmp_path, batch_mode="mixed", sampler="uniform")
    run = build_data(config, tokenizer)
    keys = ("input_ids", "attention_mask", "token_type_ids", "task_id", "weight", "label",
            "tag_ids")
    batch = next(run.train_iterator(64, seed=0, process_index=0, process_count=1))
    assert tuple(batch) == keys
    is_cls = batch["task_id"] == 0  # cls is index 0 (sorted config order)
    assert 0 < is_cls.sum() < 64
    assert np.all(batch["tag_ids"][is_cls] == -100) and np.all(batch["label"][~is_cls] == -100)
    assert (set(batch["label"][is_cls]) <= {0, 1}
            and np.all((batch["tag_ids"][~is_cls] >= 0).sum(1) > 0))
    config.data.batch_mode = "stacked"
    stacked = next(run.train_iterator(8, seed=0, process_index=0, process_count=1))
    assert stacked["input_ids"].shape[:2] == (2, 4) and stacked["tag_ids"].shape[:2] == (2, 4)
    np.testing.assert_array_equal(stacked["task_id"], [[0] * 4, [1] * 4])


def test_hosts_read_disjoint_shards(tmp_path, tokenizer):
    config = multitask_config(tmp_path, n_cls=40, n_tag=40, sampler="round_robin")
    run = build_data(config, tokenizer)
    seen = []
    for host in range(2):
        it = run.train_iterator(8, seed=0, process_index=host, process_count=2)
        assert next(it)["input_ids"].shape[0] == 4  # the global batch 8 split over 2 hosts
        seen.append({int(i) for i in it.streams[0].shard})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(40))


def test_tokenized_splits_are_cached(tmp_path, tokenizer, monkeypatch):
    config = multitask_config(tmp_path)
    first = build_data(config, tokenizer)
    def refuse(*args, **kwargs):
        raise RuntimeError("tokenized again")

    for name in ("sequence_classification", "token_classification"):
        monkeypatch.setattr(TASK_TYPES.get(name), "tokenize", refuse)
    second = build_data(config, tokenizer)
    assert all(d.from_cache for s in second.data.values() for d in s.values())
    for name in ("cls", "ner"):
        for key, value in first.split(name).features.arrays.items():
            np.testing.assert_array_equal(second.split(name).features.arrays[key], value)
    config.tasks.cls.max_length = 16  # a changed definition is a new cache entry
    with pytest.raises(RuntimeError, match="tokenized again"):
        build_data(config, tokenizer)


def test_max_train_examples_is_a_deterministic_subset(tmp_path, tokenizer):
    config = multitask_config(tmp_path, n_cls=50)
    config.tasks.cls.max_train_examples = 12
    a = build_data(config, tokenizer).split("cls", "train")
    config.data.cache_dir = str(tmp_path / "other_cache")
    b = build_data(config, tokenizer).split("cls", "train")
    where = [e["where"] for e in a.examples]
    assert len(where) == 12 and where == [e["where"] for e in b.examples]
    lines = [int(w.rsplit(":", 1)[1]) for w in where]
    assert lines == sorted(lines) and lines != list(range(1, 13))
    # The same examples as Hugging Face's `shuffle(seed=0).select(range(12))` (kept in file order).
    import datasets

    hf = datasets.Dataset.from_dict({"line": list(range(1, 51))}).shuffle(seed=0).select(range(12))
    assert lines == sorted(hf["line"])


def test_local_task_preset_paths(tmp_path):
    from mtl_jax.tasks import presets

    (tmp_path / "rte").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "rte" / f"{split}.jsonl").write_text("")
    task = presets.local_task("rte", str(tmp_path), max_train_examples=5)
    assert dict(task.data) == {s: f"{tmp_path}/rte/{s}.jsonl" for s in ("train", "validation")}
    assert (task.text_fields == ("sentence1", "sentence2") and task.hub == ""
            and task.max_train_examples == 5)
    assert presets.hub_task("mnli").data.validation == "validation_matched"
    assert presets.hub_task("stsb").type == "sequence_regression"


def test_regression_task_and_label_file_order(tmp_path, tokenizer):
    rows = [dict(s1="a man", s2="a person", score=4.5), dict(s1="x", s2="y", score="1.25")]
    config = base_config(tmp_path)
    config.tasks.sts = dict(type="sequence_regression", text_fields=("s1", "s2"),
                            label_field="score",
                            data=dict(validation=write_jsonl(tmp_path / "s.jsonl", rows)))
    data = build_data(config, tokenizer, splits=("validation",)).split("sts")
    assert data.spec.num_labels == 1 and data.features.arrays["target"].tolist() == [4.5, 1.25]
    metrics, _ = evaluate_task(data, lambda b: b["target"] * 2 + 1, batch_size=4)
    assert metrics["pearson"] == pytest.approx(1.0) and metrics["spearman"] == pytest.approx(1.0)


def test_answer_token_span_by_hand():
    # [CLS] q [SEP] "the"(0,3) "cat"(4,7) "sat"(8,11) [SEP]; question/special tokens carry -1
    # offsets.
    offsets = [(-1, -1), (-1, -1), (-1, -1), (0, 3), (4, 7), (8, 11), (-1, -1)]
    assert _answer_tokens(offsets, 4, 11) == (4, 5)  # "cat sat"
    assert _answer_tokens(offsets, 5, 6) == (4, 4)  # inside one token
    assert _answer_tokens(offsets, 8, 20) == (0, 0)  # runs past this window
    assert _answer_tokens(offsets, 0, 0) == (0, 0)  # no answer (predict inputs)
    assert _answer_tokens(offsets, 3, 4) == (0, 0)  # only the space between "the" and "cat"
    assert _answer_tokens([(-1, -1)] * 3, 0, 3) == (0, 0)  # window without context tokens
