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
