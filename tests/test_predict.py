"""``--mode=predict`` on hand-written inputs, one task of each type, checked against the model
applied directly to batches tokenized here (and seqeval / a brute-force span search)."""
import json

import jax
import numpy as np
import pytest
from seqeval.metrics.sequence_labeling import get_entities

from mtl_jax.checkpoints.manager import CheckpointManager
from mtl_jax.errors import UserError
from mtl_jax.training import runner
from run_helpers import (cache_dir_for, main_env, persistent_compile_cache, run_main, tiny_config,
                         write_config_file)

TASKS = ("sent", "sim", "ner", "qa")
L = 32  # the tiny config's only bucket


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir whose checkpoint holds the (untrained) state of a 4-task tiny model."""
    root = tmp_path_factory.mktemp("predict")
    with persistent_compile_cache(cache_dir_for(tmp_path_factory)):
        config = tiny_config(root, TASKS)
        config.tasks.qa.n_best = L  # every position: the brute-force search below sees the same
        run = runner.build_run(config)
        state = run.init_state()
        with CheckpointManager.from_config(str(root / "run"), config) as ckpt:
            ckpt.save(1, state, config=config)
        params = jax.device_get(state.params)
        yield root, config, run, params


def predict(trained, task, records, capsys, tmp_path):
    root, config, _, _ = trained
    path = tmp_path / f"{task}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    runner.run("predict", config, str(root / "run"), task=task, input_path=str(path))
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


def head_outputs(run, params, task, encoded):
    spec = run.spec(task)
    n = encoded["input_ids"].shape[0]
    batch = dict(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                 token_type_ids=encoded["token_type_ids"],
                 task_id=np.full((n,), spec.index, np.int32), weight=np.ones((n,), np.float32))
    return np.asarray(run.model.apply(params, batch)[task])


def encode(run, *columns, **kw):
    return run.tokenizer(*columns, padding="max_length", max_length=L, truncation=True,
                         return_tensors="np", **kw)


def test_classification_labels_with_probabilities(trained, capsys, tmp_path):
    _, _, run, params = trained
    records = [{"id": "a", "sentence": "the plot was great"}, {"sentence": "an awful film"}]
    out = predict(trained, "sent", records, capsys, tmp_path)
    logits = head_outputs(run, params, "sent", encode(run, [r["sentence"] for r in records]))
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert [sorted(o) for o in out] == [["id", "label", "probabilities"],
                                        ["label", "probabilities"]]
    assert out[0]["id"] == "a"
    for o, p in zip(out, expected):
        assert list(o["probabilities"]) == ["neg", "pos"]
        np.testing.assert_allclose(list(o["probabilities"].values()), p, atol=1e-5)
        assert o["label"] == ["neg", "pos"][int(np.argmax(p))]


def test_regression_values(trained, capsys, tmp_path):
    _, _, run, params = trained
    records = [{"sentence1": "a good film", "sentence2": "a bad plot"},
               {"sentence1": "fine", "sentence2": "the cast was fine"}]
    out = predict(trained, "sim", records, capsys, tmp_path)
    expected = head_outputs(run, params, "sim", encode(
        run, [r["sentence1"] for r in records], [r["sentence2"] for r in records]))
    assert [sorted(o) for o in out] == [["value"], ["value"]]
    np.testing.assert_allclose([o["value"] for o in out], np.ravel(expected), atol=1e-5)


def test_token_tags_and_entity_spans_with_text(trained, capsys, tmp_path):
    _, _, run, params = trained
    records = [{"tokens": ["Alice", "went", "to", "Paris", "yesterday"]},
               {"tokens": "Bob saw Rome and Alice"}]  # a string is split on whitespace
    out = predict(trained, "ner", records, capsys, tmp_path)
    names = run.spec("ner").label_names
    for record, o in zip(records, out):
        words = record["tokens"] if isinstance(record["tokens"], list) else record["tokens"].split()
        enc = encode(run, [words], is_split_into_words=True)
        logits = head_outputs(run, params, "ner", enc)[0]
        word_ids = enc.word_ids(0)
        firsts = [word_ids.index(w) for w in range(len(words))]
        tags = [names[int(np.argmax(logits[p]))] for p in firsts]
        assert o["tags"] == tags
        assert [(e["type"], e["start"], e["end"] - 1) for e in o["entities"]] == get_entities(tags)
        for e in o["entities"]:
            assert e["text"] == " ".join(words[e["start"]:e["end"]])


def test_qa_answer_is_the_best_span_of_the_context(trained, capsys, tmp_path):
    _, _, run, params = trained
    records = [{"id": "q1", "question": "who saw the film?",
                "context": "the film was seen by Alice today"},
               {"id": "q2", "question": "where did Bob go?", "context": "Bob went to Rome"}]
    out = predict(trained, "qa", records, capsys, tmp_path)
    assert [o["id"] for o in out] == ["q1", "q2"]
    for record, o in zip(records, out):
        enc = encode(run, [record["question"]], [record["context"]], return_offsets_mapping=True)
        logits = head_outputs(run, params, "qa", enc)[0]
        context = [i for i, s in enumerate(enc.sequence_ids(0)) if s == 1]
        score, s, e = max((logits[s, 0] + logits[e, 1], s, e) for s in context for e in context
                          if s <= e < s + 30)
        offsets = enc["offset_mapping"][0]
        assert o["answer"] == record["context"][offsets[s][0]:offsets[e][1]]
        assert o["answer"] and o["answer"] in record["context"]


def test_unknown_field_is_a_user_error(trained, tmp_path):
    root, config, _, _ = trained
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "no sentence field"}) + "\n")
    with pytest.raises(UserError, match=r"^input line 1: field 'sentence' missing \(this task "
                                        r"reads sentence\); fix the input$"):
        runner.run("predict", config, str(root / "run"), task="sent", input_path=str(path))


def test_cli_predict_from_stdin_writes_only_jsonl_to_stdout(trained, tmp_path_factory):
    root, _, _, _ = trained
    config_file = write_config_file(root)
    lines = [{"sentence": "the cast was good"}, {"sentence": "poor"}]
    proc = run_main(f"--config={config_file}:{','.join(TASKS)}", f"--workdir={root / 'run'}",
                    "--mode=predict", "--task=sent", "--input=-",
                    stdin="".join(json.dumps(r) + "\n" for r in lines),
                    env=main_env(cache_dir=cache_dir_for(tmp_path_factory)))
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 2 and all(set(o) == {"label", "probabilities"} for o in out)
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-6 for o in out)
