"""python -m mtl_jax.export: Transformers (PyTorch, CPU, float32) loads the export and gives what
``--mode=predict`` gives on the same inputs (probabilities to 1e-4, the same tags and answers).

The run directories hold one checkpoint of random parameters (N(0, 0.2), norm scales around 1:
no training, and a LoRA whose B is not zero), written with the run's own CheckpointManager and
read back through predict mode's restore. Refusals get one UserError line and write nothing.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from mtl_jax.checkpoints.manager import CheckpointManager
from mtl_jax.errors import UserError
from mtl_jax.tasks.definitions import task_definition
from mtl_jax.export import HEAD_FILE, HEAD_INFO_FILE, export_run
from mtl_jax.training import predict as predict_lib
from mtl_jax.training import runner
from run_helpers import REPO, cache_dir_for, main_env, persistent_compile_cache, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

L = 32  # the tiny config's only bucket
SENTENCES = [{"id": "a", "sentence": "the plot was great"}, {"sentence": "an awful film"},
             {"sentence": "the cast was poor but the movie was fine"}]
PAIRS = [{"sentence1": "a good film", "sentence2": "a bad plot"},
         {"sentence1": "fine", "sentence2": "the cast was fine"}]
WORDS = [{"tokens": ["Alice", "went", "to", "Paris", "yesterday"]},
         {"tokens": ["Bob", "saw", "Rome", "and", "Alice", "with", "awful", "friends"]}]
QUESTIONS = [{"id": "q1", "question": "who saw the film?",
              "context": "the film was seen by Alice today"},
             {"id": "q2", "question": "where did Bob go?", "context": "Bob went to Rome by car"}]


def random_params(abstract, seed: int):
    """Every leaf N(0, 0.2); LayerNorm/RMSNorm scales 1 + N(0, 0.2)."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        noise = rng.normal(0.0, 0.2, x.shape).astype(x.dtype)
        return noise + 1 if getattr(path[-1], "key", None) == "scale" else noise

    return jax.tree_util.tree_map_with_path(fill, abstract)


def trained_run(root, config, seed=0):
    """(workdir, run, params, state): a checkpoint at step 1 of random params, and the state
    predict mode restores from it."""
    workdir = str(root / "run")
    run = runner.build_run(config, splits=())
    state = run.strategy.init_state(random_params(run.model.abstract_params(), seed))
    with CheckpointManager(workdir, async_save=False) as ckpt:
        ckpt.save(1, state, config=run.config_json)
    restored, _ = runner.restore_for_eval(run, workdir)
    return workdir, run, jax.device_get(restored.params), restored


def params_only_run(root, config, seed=0):
    """(workdir, run, params): a checkpoint of params alone (nothing compiled; export reads
    only the params)."""
    workdir = str(root / "run")
    run = runner.build_run(config, splits=())
    params = random_params(run.model.abstract_params(), seed)
    with CheckpointManager(workdir, async_save=False) as ckpt:
        ckpt.save(1, {"params": params, "step": np.int32(1)}, config=run.config_json)
    return workdir, run, params


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(cache_dir_for(tmp_path_factory)):
        yield


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    """A hard-sharing BERT run with a task of every type, heads.pooling=pooler."""
    root = tmp_path_factory.mktemp("export_hard")
    config = tiny_config(root, ("sent", "sim", "ner", "qa"))
    config.heads.pooling = "pooler"
    config.tasks.qa.n_best = L  # every position: the brute-force span search sees the same
    return trained_run(root, config)


def export(workdir, task, tmp_path, name="hf", **kw):
    out = tmp_path / name
    result = export_run(workdir, task, str(out), **kw)
    assert result.out == out
    return out


def predict(trained, task, records):
    """--mode=predict's outputs (its restored state, its predict function)."""
    _, run, _, state = trained
    return predict_lib.predict(run, state, task, records)


def mtl_outputs(trained, task, enc):
    """The run's head outputs for a batch tokenized here (what predict's step computes)."""
    _, run, params = trained[:3]
    n = enc["input_ids"].shape[0]
    batch = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 token_type_ids=enc["token_type_ids"],
                 task_id=np.full((n,), run.spec(task).index, np.int32))
    return np.asarray(run.model.apply(params, batch)[task])


def tokenizer(out):
    return transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)


def load(cls, out):
    model = getattr(transformers, cls).from_pretrained(str(out), local_files_only=True)
    assert next(model.parameters()).dtype == torch.float32
    return model.eval()


def torch_inputs(enc, keys=("input_ids", "attention_mask", "token_type_ids")):
    return {k: torch.as_tensor(np.asarray(enc[k])) for k in keys}


def softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_sequence_classification_probabilities_match_predict(hard, tmp_path):
    out = export(hard[0], "sent", tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"]["pos"] == 1
    enc = tokenizer(out)([r["sentence"] for r in SENTENCES], padding=True, truncation=True,
                         max_length=L, return_tensors="np")
    with torch.no_grad():
        logits = load("BertForSequenceClassification", out)(**torch_inputs(enc)).logits.numpy()
    expected = predict(hard, "sent", SENTENCES)
    want = np.array([list(o["probabilities"].values()) for o in expected])
    assert np.abs(softmax(logits) - want).max() < 1e-4
    assert np.abs(want[:, 0] - 0.5).max() > 0.05  # not a flat head: the comparison can fail
    names = [config["id2label"][str(i)] for i in logits.argmax(-1)]
    assert names == [o["label"] for o in expected]


def test_regression_values_match_predict(hard, tmp_path):
    out = export(hard[0], "sim", tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    enc = tokenizer(out)([r["sentence1"] for r in PAIRS], [r["sentence2"] for r in PAIRS],
                         padding=True, truncation=True, max_length=L, return_tensors="np")
    with torch.no_grad():
        values = load("BertForSequenceClassification", out)(**torch_inputs(enc)).logits.numpy()
    expected = [o["value"] for o in predict(hard, "sim", PAIRS)]
    np.testing.assert_allclose(values[:, 0], expected, atol=1e-4)


def test_token_classification_tags_and_probabilities_match(hard, tmp_path):
    out = export(hard[0], "ner", tmp_path)
    model, tok = load("BertForTokenClassification", out), tokenizer(out)
    id2label = model.config.id2label
    assert [id2label[i] for i in range(5)] == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    expected = predict(hard, "ner", WORDS)
    for record, predicted in zip(WORDS, expected):
        enc = tok([record["tokens"]], is_split_into_words=True, padding="max_length",
                  truncation=True, max_length=L, return_tensors="np")
        with torch.no_grad():
            logits = model(**torch_inputs(enc)).logits.numpy()[0]
        word_ids = enc.word_ids(0)
        firsts = [word_ids.index(w) for w in range(len(record["tokens"]))]
        assert [id2label[int(np.argmax(logits[p]))] for p in firsts] == predicted["tags"]
        real = enc["attention_mask"][0].astype(bool)
        want = softmax(mtl_outputs(hard, "ner", enc)[0])
        assert np.abs(softmax(logits)[real] - want[real]).max() < 1e-4
    assert len({t for o in expected for t in o["tags"]}) > 1  # the tags do vary


def best_span(start, end, context_positions, max_length=30):
    return max((start[s] + end[e], s, e) for s in context_positions for e in context_positions
               if s <= e < s + max_length)[1:]


def test_question_answering_spans_match_predict(hard, tmp_path):
    out = export(hard[0], "qa", tmp_path)
    model, tok = load("BertForQuestionAnswering", out), tokenizer(out)
    expected = predict(hard, "qa", QUESTIONS)
    for record, predicted in zip(QUESTIONS, expected):
        enc = tok([record["question"]], [record["context"]], padding="max_length",
                  truncation="only_second", max_length=L, return_offsets_mapping=True,
                  return_tensors="np")
        with torch.no_grad():
            result = model(**torch_inputs(enc))
        start, end = result.start_logits.numpy()[0], result.end_logits.numpy()[0]
        ours = mtl_outputs(hard, "qa", enc)[0]  # [L, 2]: start, end
        real = enc["attention_mask"][0].astype(bool)
        assert np.abs(np.stack([start, end], -1)[real] - ours[real]).max() < 1e-4
        context = [i for i, s in enumerate(enc.sequence_ids(0)) if s == 1]
        s, e = best_span(start, end, context)
        offsets = enc["offset_mapping"][0]
        assert record["context"][offsets[s][0]:offsets[e][1]] == predicted["answer"]
        assert predicted["id"] == record["id"]


def test_encoder_only_is_the_run_encoder_as_bert_model(hard, tmp_path):
    _, run, params, _ = hard
    out = export(hard[0], "sent", tmp_path, encoder_only=True)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    enc = tokenizer(out)([r["sentence"] for r in SENTENCES], padding=True, return_tensors="np")
    with torch.no_grad():
        result = load("BertModel", out)(**torch_inputs(enc))
    encoder = params["encoder"]
    hidden = np.asarray(run.model.encoder.apply({"params": encoder}, enc["input_ids"],
                                                enc["attention_mask"],
                                                token_type_ids=enc["token_type_ids"]))
    real = enc["attention_mask"].astype(bool)
    assert np.abs(result.last_hidden_state.numpy()[real] - hidden[real]).max() < 1e-4
    dense = encoder["pooler"]["dense"]
    pooled = np.tanh(hidden[:, 0] @ dense["kernel"] + dense["bias"])
    assert np.abs(result.pooler_output.numpy() - pooled).max() < 1e-4


def test_lora_merged_export_matches_predict(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("export_lora")
    config = tiny_config(root, ("sent", "ner"))
    config.heads.pooling = "pooler"
    config.peft.update(kind="lora", lora_rank=4)
    config.model.scan_layers = True  # merged on the stacked layout, then unstacked
    trained = trained_run(root, config, seed=1)
    out = export(trained[0], "sent", tmp_path)
    enc = tokenizer(out)([r["sentence"] for r in SENTENCES], padding=True, return_tensors="np")
    with torch.no_grad():
        logits = load("BertForSequenceClassification", out)(**torch_inputs(enc)).logits.numpy()
    want = np.array([list(o["probabilities"].values())
                     for o in predict(trained, "sent", SENTENCES)])
    assert np.abs(softmax(logits) - want).max() < 1e-4
    kernel = trained[2]["encoder"]["layers"]["layer"]["attention"]["query"]["kernel"][0]
    merged = load_file(str(out / "model.safetensors"))  # kernel: [H, heads, head_dim]
    delta = (merged["bert.encoder.layer.0.attention.self.query.weight"]
             - kernel.reshape(kernel.shape[0], -1).T)
    assert np.abs(delta).max() > 0.1  # the LoRA really was merged


ENDINGS = [{"ctx": "a good movie", "endings": ["with a poor cast", "the plot", "fine"]},
           {"ctx": "the awful film was", "endings": ["great", "a bad plot and cast", "poor"]}]


def test_multiple_choice_probabilities_match_predict(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("export_mc")
    config = tiny_config(root, ("sent",))
    rows = "".join(json.dumps(dict(r, label=i % 3)) + "\n" for i, r in enumerate(ENDINGS * 4))
    (root / "mc.jsonl").write_text(rows)
    config.tasks.pick3 = task_definition(
        "multiple_choice", data={"train": str(root / "mc.jsonl")}, max_length=L,
        text_fields=("ctx",), choice_fields=("endings",), label_names=("0", "1", "2"))
    config.heads.pooling = "pooler"
    trained = trained_run(root, config, seed=2)
    out = export(trained[0], "pick3", tmp_path)
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "BertForMultipleChoice"]
    pairs = [(r["ctx"], e) for r in ENDINGS for e in r["endings"]]
    enc = tokenizer(out)([a for a, _ in pairs], [b for _, b in pairs], padding=True,
                         return_tensors="np")
    inputs = {k: v.reshape(len(ENDINGS), 3, -1) for k, v in torch_inputs(enc).items()}
    with torch.no_grad():
        scores = load("BertForMultipleChoice", out)(**inputs).logits.numpy()
    expected = predict(trained, "pick3", ENDINGS)
    want = np.array([o["probabilities"] for o in expected])
    assert np.abs(softmax(scores) - want).max() < 1e-4
    assert np.abs(want - 1 / 3).max() > 0.01  # 100x the tolerance: the comparison can fail
    assert [int(s.argmax()) for s in scores] == [o["choice"] for o in expected]


def test_soft_sharing_exports_the_task_encoder(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("export_soft")
    config = tiny_config(root, ("sent", "ner"))
    config.sharing.mode = "soft"
    trained = params_only_run(root, config, seed=2)
    out = export(trained[0], "ner", tmp_path)
    enc = tokenizer(out)([r["tokens"] for r in WORDS], is_split_into_words=True,
                         padding="max_length", max_length=L, return_tensors="np")
    with torch.no_grad():
        logits = load("BertForTokenClassification", out)(**torch_inputs(enc)).logits.numpy()
    real = enc["attention_mask"].astype(bool)
    want = softmax(mtl_outputs(trained, "ner", enc))
    assert np.abs(softmax(logits)[real] - want[real]).max() < 1e-4


def test_t5_encoder_with_head_side_file_matches_predict(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("export_t5")
    config = tiny_config(root, ("sent",))
    config.model.family = "t5"
    config.heads.pooling = "mean"
    trained = trained_run(root, config, seed=3)
    out = export(trained[0], "sent", tmp_path)
    info = json.loads((out / HEAD_INFO_FILE).read_text())
    assert info["pooling"] == "mean" and info["label_names"] == ["neg", "pos"]
    head = load_file(str(out / HEAD_FILE))
    enc = tokenizer(out)([r["sentence"] for r in SENTENCES], padding=True, return_tensors="np")
    with torch.no_grad():
        hidden = load("T5EncoderModel", out)(
            **torch_inputs(enc, ("input_ids", "attention_mask"))).last_hidden_state.numpy()
    mask = enc["attention_mask"][..., None]
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    logits = pooled @ head["classifier.weight"].T + head["classifier.bias"]
    want = np.array([list(o["probabilities"].values())
                     for o in predict(trained, "sent", SENTENCES)])
    assert np.abs(softmax(logits) - want).max() < 1e-4


@pytest.mark.parametrize("kind,why", [("prefix", "place for per-layer prefix keys and values"),
                                      ("adapter", "bottleneck adapter layers")])
def test_prefix_and_adapters_are_refused_in_one_line(tmp_path_factory, tmp_path, kind, why):
    root = tmp_path_factory.mktemp(f"export_{kind}")
    config = tiny_config(root, ("sent",))
    config.peft.update(kind=kind, prefix_length=2, prefix_hidden=8, adapter_size=4)
    workdir = params_only_run(root, config)[0]
    for encoder_only in (False, True):
        with pytest.raises(UserError, match=rf"^peft\.kind={kind} cannot be exported: vanilla "
                                            rf"Transformers BERT/T5 models have no {why}, .*"
                                            rf"peft\.kind=lora") as e:
            export(workdir, "sent", tmp_path, encoder_only=encoder_only)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_cls_pooling_and_bad_flags_are_one_line_errors(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("export_cls")
    workdir = params_only_run(root, tiny_config(root, ("sent", "ner")))[0]  # pooling=cls
    with pytest.raises(UserError, match=r"^heads\.pooling=cls cannot be exported as "
                                        r"BertForSequenceClassification: .*tanh.* train with "
                                        r"heads\.pooling=pooler") as e:
        export(workdir, "sent", tmp_path)
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match=r"^--task='x' is not a task of the run .*ner, sent\); "
                                        r"pass one of those$"):
        export(workdir, "x", tmp_path)
    with pytest.raises(UserError, match=r"^--checkpoint='first'; use best, latest or a step"):
        export(workdir, "sent", tmp_path, checkpoint="first")
    with pytest.raises(UserError, match=r"is the run's workdir \(its config.json would be "):
        export_run(workdir, "ner", workdir)


def test_cli_export_never_touches_the_hub(hard, tmp_path):
    """The command line, with the hub offline and unreachable and an empty HF cache, writes the
    same files as the in-process export."""
    empty = tmp_path / "hf_home"
    empty.mkdir()
    env = main_env(devices=1, HF_HUB_OFFLINE="1", HF_HOME=str(empty),
                   HF_ENDPOINT="http://127.0.0.1:9")
    cli_out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "mtl_jax.export", f"--workdir={hard[0]}",
                           "--task=sent", f"--out={cli_out}", "--checkpoint=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "BertForSequenceClassification of task sent (checkpoint step 1)" in proc.stdout
    assert not any(empty.rglob("*"))  # nothing was downloaded or cached
    here = export(hard[0], "sent", tmp_path)
    a, b = load_file(str(cli_out / "model.safetensors")), load_file(str(here / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(cli_out)) == sorted(os.listdir(here))
    assert "vocab.txt" in os.listdir(here) and "tokenizer.json" in os.listdir(here)
