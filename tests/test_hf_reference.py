"""bench/hf_reference.py's models for the extra task types, on a tiny random BERT saved locally:
their losses against a NumPy cross-entropy and against mtl_jax's own loss functions."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_reference_module
from mtl_jax.models.losses import span_loss

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference():
    return hf_reference_module()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    path = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertModel(config).save_pretrained(path)
    return str(path)


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def _tokens(rng, shape) -> dict:
    return dict(input_ids=torch.from_numpy(rng.integers(1, 50, shape)).long(),
                attention_mask=torch.ones(shape, dtype=torch.long),
                token_type_ids=torch.zeros(shape, dtype=torch.long))


def test_qa_reference_loss_is_transformers_span_loss_and_drops_padding_examples(
        reference, tiny_bert_dir):
    rng = np.random.default_rng(0)
    model = reference.SpanReference(tiny_bert_dir).eval()
    batch = _tokens(rng, (4, 12))
    batch["start_positions"] = torch.tensor([3, 0, 5, 7])
    batch["end_positions"] = torch.tensor([4, 0, 9, 11])
    keep = torch.tensor([True, True, False, True])  # row 2 is a padding example (weight 0)
    with torch.no_grad():
        outputs, loss = model(batch, keep=keep)
        again, none = model(batch)
    out = outputs.numpy()
    assert out.shape == (4, 12, 2) and none is None and np.array_equal(again.numpy(), out)
    rows = keep.numpy()
    starts, ends = batch["start_positions"].numpy(), batch["end_positions"].numpy()
    expected = ((_cross_entropy(out[..., 0], starts) + _cross_entropy(out[..., 1], ends)) / 2)
    np.testing.assert_allclose(float(loss), expected[rows].mean(), rtol=1e-5)
    # Without padding tokens it is mtl_jax's span loss, mean over the kept examples.
    ours, valid = span_loss(jnp.asarray(out), dict(
        attention_mask=jnp.ones((4, 12)), start_positions=jnp.asarray(starts),
        end_positions=jnp.asarray(ends)))
    np.testing.assert_allclose(float(loss), float((np.asarray(ours) * rows).sum() / rows.sum()),
                               rtol=1e-5)


def test_choice_reference_scores_each_pair_and_takes_the_softmax_over_choices(
        reference, tiny_bert_dir):
    rng = np.random.default_rng(1)
    model = reference.ChoiceScorer(tiny_bert_dir, dropout=0.1).eval()
    batch = _tokens(rng, (3, 2, 10))
    batch["label"] = torch.tensor([1, 0, 1])
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        scores, loss = model(batch, keep=keep)
        pairs = model.scores({k: v.reshape(6, 10) for k, v in batch.items() if k != "label"})
    assert scores.shape == (3, 2)
    np.testing.assert_allclose(scores.numpy(), pairs.reshape(3, 2).numpy(), rtol=1e-6)
    expected = _cross_entropy(scores.numpy(), batch["label"].numpy())[keep.numpy()].mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_every_protocol_task_type_has_a_reference_model(reference, shared_data):
    protocol = reference.protocol  # configs/compare.py, as the script imports it
    c = protocol.get_config("tasks=" + "+".join(protocol.TASKS + protocol.EXTRA_TASKS))
    assert {t.type for t in c.tasks.values()} == set(reference.REFERENCE_MODELS)


def test_interrupted_reference_run_resumes_to_the_uninterrupted_result(
        reference, shared_data, tmp_path, monkeypatch):
    """3 steps of SST-2 (tiny data, the real MiniLM, an evaluation every step) straight, and
    killed during the second evaluation, stopped by SIGTERM's flag, then resumed: the same loss
    at every step and the same evaluations, each logged once."""
    import json

    get_config, evaluate_task = reference.protocol.get_config, reference.evaluate_task

    def every_step_logged(arg):
        c = get_config(arg)
        c.train.log_every = 1
        return c

    calls = []

    def killed_in_the_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate_task(*args, **kwargs)

    monkeypatch.setattr(reference.protocol, "get_config", every_step_logged)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert reference.train_task("sst2", str(straight), 3, True) is not None
    monkeypatch.setattr(reference, "evaluate_task", killed_in_the_second_evaluation)
    with pytest.raises(KeyboardInterrupt):
        reference.train_task("sst2", str(resumed), 3, True)
    monkeypatch.setattr(reference, "evaluate_task", evaluate_task)
    assert (resumed / reference.CHECKPOINT).exists() and not (resumed / "results.json").exists()
    flag = reference.StopFlag()
    flag.requested = True  # SIGTERM: the pending evaluation of step 2, a checkpoint, no step 3
    assert reference.train_task("sst2", str(resumed), 3, True, stop=flag) is None
    assert reference.train_task("sst2", str(resumed), 3, True) is not None
    assert not (resumed / reference.CHECKPOINT).exists()  # removed once finished
    logs = [[json.loads(line) for line in open(d / "metrics.jsonl", encoding="utf-8")]
            for d in (straight, resumed)]
    losses = [{r["step"]: r["train/loss"] for r in log if "train/loss" in r} for log in logs]
    evals = [[(r["step"], r["eval/sst2/accuracy"]) for r in log if "eval/sst2/accuracy" in r]
             for log in logs]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3]
    assert evals[0] == evals[1] and [step for step, _ in evals[0]] == [1, 2, 3]
    results = [json.loads((d / "results.json").read_text()) for d in (straight, resumed)]
    assert results[0]["final"] == results[1]["final"] and results[0]["final_step"] == 3
    assert results[0]["best_step"] == results[1]["best_step"]
