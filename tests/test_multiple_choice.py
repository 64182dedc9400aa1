"""The multiple_choice task type: scores and loss against Transformers' BertForMultipleChoice with
the same weights, mixed-task batches against task-homogeneous ones (with per-task LoRA, so a row
routed to the wrong task would show), COPA from ../shared/data (parsing, tokens, a tiny train +
eval run whose accuracy is recomputed here) and --mode=predict's choice and probabilities."""
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from mtl_jax.checkpoints import hf
from mtl_jax.checkpoints.manager import CheckpointManager
from mtl_jax.data import batching
from mtl_jax.errors import UserError
from mtl_jax.tasks import presets
from mtl_jax.tasks.definitions import normalize, task_definition
from mtl_jax.tasks.types import TASK_TYPES
from mtl_jax.training import loop, runner
from mtl_jax.training.metrics_writer import read_metrics
from conftest import SHARED_DATA
from run_helpers import cache_dir_for, persistent_compile_cache, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

L = 32  # tiny_config's one bucket
COPA_QUESTIONS = {"cause": "What was the cause of this?", "effect": "What happened as a result?"}
_WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "cast", "film"]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(cache_dir_for(tmp_path_factory)):
        yield


def _write(folder, rows_of):
    folder.mkdir(parents=True, exist_ok=True)
    for split, offset in (("train", 0), ("validation", 100)):
        rows = [rows_of(i) for i in range(offset, offset + 16)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {s: str(folder / f"{s}.jsonl") for s in ("train", "validation")}


def _pick2_row(i):  # COPA's schema: one column per choice, the question word in the context
    a, b = _WORDS[i % 10], _WORDS[(3 * i + 1) % 10]
    return {"premise": f"the {a} {b} was {a}", "question": ("cause", "effect")[i % 2],
            "choice1": f"a {b} film", "choice2": f"the {a} plot was {b} and {a}",
            "label": i % 2}


def _pick3_row(i):  # HellaSwag's schema: the choices as one list column
    a, b = _WORDS[i % 10], _WORDS[(7 * i + 2) % 10]
    return {"ctx": f"a {a} movie", "endings": [f"with {b}", f"a {a} {b} cast", b],
            "label": i % 3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run for every test (compiling dominates): sent (sequence classification) + pick2
    (COPA's schema, 2 choices) + pick3 (3 choices: the run's batches have 3 slots, pick2 rows
    one padding slot) + COPA from ../shared/data when it is there; LoRA, BERT pooler, trained
    3 steps on mixed batches of 8, evaluated and saved at step 3."""
    root = tmp_path_factory.mktemp("mc")
    config = tiny_config(root, ("sent",))
    config.tasks.pick2 = task_definition(
        "multiple_choice", data=_write(root / "pick2", _pick2_row), max_length=L,
        text_fields=("premise", "choice1", "choice2", "question"),
        choice_fields=("choice1", "choice2"), label_names=("choice1", "choice2"),
        context_phrases=COPA_QUESTIONS)
    config.tasks.pick3 = task_definition(
        "multiple_choice", data=_write(root / "pick3", _pick3_row), max_length=L,
        text_fields=("ctx",), choice_fields=("endings",), label_names=("0", "1", "2"))
    if (SHARED_DATA / "copa").is_dir():
        config.tasks.copa = presets.local_task("copa", str(SHARED_DATA), max_length=L,
                                               max_train_examples=48, max_eval_examples=32)
    config.heads.pooling = "pooler"
    config.peft.kind = "lora"
    config.train.update(dict(num_steps=3, eval_every=3, checkpoint_every=3))
    run = runner.build_run(config)
    workdir = root / "run"
    loop.train(run, str(workdir))
    with CheckpointManager.from_config(str(workdir), config) as ckpt:
        params = jax.device_get(run.restore(ckpt).state.params)
    return run, config, workdir, params, _forward(run)


def _with_leaves(params, name: str, make):
    """``params`` with every leaf whose path contains ``name`` replaced by ``make(leaf, i)``."""
    count = iter(range(1000))
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: make(np.asarray(leaf), next(count))
        if name in jax.tree_util.keystr(path) else leaf, params)


def _random_like(leaf, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=leaf.shape)).astype(np.float32)


def _forward(run):
    """jit(params, batch -> ({task: head output}, per-task losses [T])), dropout off."""
    def forward(params, batch):
        losses, _, _ = run.model.task_losses(params, batch, deterministic=True)
        return run.model.apply(params, batch), losses
    return jax.jit(forward)


def _split(run, task, split="validation"):
    return run.data.split(task, split)


def _bert_for_multiple_choice(run, params, task):
    """Transformers' BertForMultipleChoice holding our encoder and ``task``'s head."""
    cfg = run.model.encoder_config
    model = transformers.BertForMultipleChoice(transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()
    flat = traverse_util.flatten_dict(jax.device_get(params["encoder"]))
    state = {}
    for name, (path, transform) in hf.FAMILY_CONVERTERS.get("bert").tensor_map(cfg).items():
        leaf = np.asarray(flat[path])
        state[f"bert.{name}"] = torch.tensor(transform.to_hf(leaf, transform.hf_shape(leaf.shape)))
    head = params["heads"][task]["dense"]
    state["classifier.weight"] = torch.tensor(np.asarray(head["kernel"]).T.copy())
    state["classifier.bias"] = torch.tensor(np.asarray(head["bias"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_ids") for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("task,choices", [("pick2", 2), ("pick3", 3)])
def test_scores_and_loss_match_bert_for_multiple_choice(trained, task, choices):
    run, _, _, params, forward = trained
    # No LoRA (BERT has none), and head and pooler weights larger than BERT's init (std
    # 0.02), so the choices' scores differ well beyond the tolerance; a nonzero bias checks
    # the bias mapping.
    params = _with_leaves(params, "lora_b", lambda leaf, i: np.zeros_like(leaf))
    params = _with_leaves(params, f"'{task}'", lambda leaf, i: _random_like(leaf, i) + 0.3)
    params = _with_leaves(params, "'pooler'", lambda leaf, i: _random_like(leaf, i, 0.5))
    spec = run.spec(task)
    _, batch = next(_split(run, task).batches(8))
    assert batch["input_ids"].shape == (8, 3, L)
    outputs, losses = forward(params, batch)
    scores = np.asarray(outputs[task])
    inputs = {k: torch.tensor(batch[k][:, :choices].astype(np.int64))
              for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        out = _bert_for_multiple_choice(run, params, task)(
            **inputs, labels=torch.tensor(batch["label"].astype(np.int64)))
    expected = out.logits.numpy()
    assert scores.shape == (8, choices)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.abs(np.diff(expected, axis=1)).max() > 1e-3  # a swap of choices would show
    np.testing.assert_allclose(float(losses[spec.index]), float(out.loss), atol=1e-5)


def test_mixed_batch_equals_homogeneous_batches(trained):
    run, _, _, params, forward = trained
    # Per-task LoRA far from zero: each task's rows encode differently (see the last check).
    params = _with_leaves(params, "lora_b", lambda leaf, i: _random_like(leaf, i, 0.5))
    sent, pick2, pick3 = (_split(run, t) for t in ("sent", "pick2", "pick3"))
    keys, buckets = run.data.keys, sent.buckets
    mixed_rows = [(pick2, 0), (sent, 0), (pick3, 0), (pick2, 1), (sent, 1), (pick3, 1),
                  (pick2, 2), (pick3, 2)]
    mixed = batching.make_batch(mixed_rows, 8, buckets, keys)
    mixed_out, mixed_losses = forward(params, mixed)
    for task, data, rows in (("pick2", pick2, [0, 3, 6]), ("pick3", pick3, [2, 5, 7]),
                             ("sent", sent, [1, 4])):
        alone = batching.make_batch([(data, i) for i in range(len(rows))], 8, buckets, keys)
        alone_out, alone_losses = forward(params, alone)
        alone_out = np.asarray(alone_out[task])[:len(rows)]
        got = np.asarray(mixed_out[task])[rows]
        np.testing.assert_allclose(got, alone_out, atol=1e-5)
        np.testing.assert_array_equal(got.argmax(-1), alone_out.argmax(-1))
        index = run.spec(task).index
        np.testing.assert_allclose(float(mixed_losses[index]), float(alone_losses[index]),
                                   atol=1e-5)
    # The check can fail: pick2's rows routed to sent's LoRA score differently.
    wrong = dict(mixed, task_id=np.where(mixed["task_id"] == run.spec("pick2").index,
                                         run.spec("sent").index, mixed["task_id"]))
    rerouted = np.asarray(forward(params, wrong)[0]["pick2"])[[0, 3, 6]]
    assert np.abs(rerouted - np.asarray(mixed_out["pick2"])[[0, 3, 6]]).max() > 1e-3


def test_definition_errors_are_one_line():
    base = dict(type="multiple_choice", data={"train": "x.jsonl"}, label_names=("a", "b"))
    mc = TASK_TYPES.get("multiple_choice")
    with pytest.raises(UserError, match="choice_fields is empty"):
        mc.check_definition("t", normalize("t", dict(base, text_fields=("premise",))))
    good = normalize("t", dict(base, text_fields=("p",), choice_fields=("c1", "c2")))
    with pytest.raises(UserError, match="no context column"):
        mc.check_definition("t", normalize("t", dict(base, text_fields=("c1", "c2"),
                                                      choice_fields=("c1", "c2"))))
    with pytest.raises(UserError, match="2 choices but the task has 3"):
        mc.parse({"p": "x", "c1": "y", "c2": "z", "label": 0}, "f:1", good,
                 {"a": 0, "b": 1, "c": 2})


# --- COPA from ../shared/data (in the trained run when the folder is there) ---------------------

def _copa_context(row):
    return f"{row['premise']} {COPA_QUESTIONS[row['question']]}"  # jiant's formulation


def test_copa_parses_and_tokenizes_as_pairs(trained, shared_data):
    run = trained[0]
    data = _split(run, "copa")
    assert run.spec("copa").label_names == ("choice1", "choice2")
    lines = (shared_data / "copa" / "validation.jsonl").read_text().splitlines()
    for i, example in enumerate(data.examples):
        row = json.loads(lines[int(example["where"].rsplit(":", 1)[1]) - 1])
        assert example["context"] == _copa_context(row)
        assert example["choices"] == (row["choice1"], row["choice2"])
        assert example["label"] == row["label"]
        for c, choice in enumerate(example["choices"]):
            ids = run.tokenizer(example["context"], choice, truncation=True, max_length=L)
            n = data.features.row_lengths(i)[c]
            assert data.features.token_rows("input_ids", i)[c, :n].tolist() == ids["input_ids"]
            assert data.features.token_rows("token_type_ids", i)[c, :n].tolist() == \
                ids["token_type_ids"]


def test_copa_train_and_eval_reports_accuracy(trained, shared_data):
    run, _, workdir, params, forward = trained
    events = [e for e in read_metrics(str(workdir / "metrics.jsonl")) if "eval/copa/accuracy" in e]
    assert [e["step"] for e in events] == [3]
    data = _split(run, "copa")
    correct = []
    for start in range(0, len(data.features), 8):  # file order, independent of the eval batches
        rows = [(data, i) for i in range(start, min(start + 8, len(data.features)))]
        batch = batching.make_batch(rows, 8, data.buckets, run.data.keys)
        scores = np.asarray(forward(params, batch)[0]["copa"])[:len(rows)]
        correct += list(scores.argmax(-1) == batch["label"][:len(rows)])
    assert events[-1]["eval/copa/accuracy"] == pytest.approx(np.mean(correct), abs=1e-9)


def test_predict_gives_the_choice_and_per_choice_probabilities(trained, tmp_path, capsys):
    run, config, workdir, params, forward = trained
    rows = [_pick2_row(i) for i in (200, 201, 202)]
    records = [{k: r[k] for k in ("premise", "choice1", "choice2", "question")} for r in rows]
    records[0]["id"] = "first"
    path = tmp_path / "pick2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    runner.run("predict", config, str(workdir), task="pick2", input_path=str(path))
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    enc = run.tokenizer([_copa_context(r) for r in rows for _ in range(2)],
                        [r[c] for r in rows for c in ("choice1", "choice2")],
                        padding="max_length", truncation=True, max_length=L, return_tensors="np")
    n = len(rows)
    batch = batching.empty_batch(run.data.keys, 8, L)  # the shapes the forward compiled for
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        batch[k][:n, :2] = enc[k].reshape(n, 2, L)
    batch["task_id"][:] = run.spec("pick2").index
    scores = np.asarray(forward(params, batch)[0]["pick2"])[:n].astype(np.float64)
    expected = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    assert out[0]["id"] == "first" and "id" not in out[1]
    assert sorted(out[1]) == ["choice", "label", "probabilities", "text"]
    for o, p, r in zip(out, expected, records):
        np.testing.assert_allclose(o["probabilities"], p, atol=1e-5)
        assert o["choice"] == int(np.argmax(p))
        assert o["label"] == ("choice1", "choice2")[o["choice"]]
        assert o["text"] == r[o["label"]]
