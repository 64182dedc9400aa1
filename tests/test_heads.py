"""Heads: output shapes per task type, pooling, and losses against a NumPy computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.models import heads as heads_lib
from mtl_jax.models import losses as losses_lib
from mtl_jax.models import soft_sharing
from mtl_jax.tasks.spec import TaskSpec

B, L, H = 4, 6, 8


def _features(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, L, H)).astype(np.float32)
    mask = np.ones((B, L), np.int32)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return hidden, mask


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("task_type,num_labels,shape", [
    ("sequence_classification", 3, (B, 3)),
    ("sequence_regression", 1, (B,)),
    ("token_classification", 5, (B, L, 5)),
    ("extractive_qa", 2, (B, L, 2)),
])
def test_head_shapes_and_linear_map(task_type, num_labels, shape):
    hidden, mask = _features()
    pooled = hidden[:, 0]
    feats = heads_lib.Features(jnp.asarray(hidden), jnp.asarray(mask), jnp.asarray(pooled))
    head = heads_lib.build_head(task_type, num_labels, dropout=0.1)
    params = head.init(jax.random.key(0), feats)["params"]
    out = np.asarray(head.apply({"params": params}, feats, deterministic=True))
    assert out.shape == shape
    kernel, bias = np.asarray(params["dense"]["kernel"]), np.asarray(params["dense"]["bias"])
    source = pooled if task_type.startswith("sequence") else hidden
    expected = source @ kernel + bias
    np.testing.assert_allclose(out, expected.reshape(shape), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
    hidden, mask = _features()
    feats = heads_lib.Features(jnp.asarray(hidden), jnp.asarray(mask), jnp.asarray(hidden[:, 0]))
    head = heads_lib.build_head("sequence_classification", 2, dropout=0.5)
    params = head.init(jax.random.key(0), feats)["params"]
    eval_out = head.apply({"params": params}, feats, deterministic=True)
    train_out = head.apply({"params": params}, feats, deterministic=False,
                           rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(eval_out, train_out)


def test_poolings_match_numpy():
    hidden, mask = _features()
    np.testing.assert_allclose(heads_lib.cls_pooling(hidden, mask, None), hidden[:, 0])
    m = mask[..., None].astype(np.float32)
    np.testing.assert_allclose(heads_lib.mean_pooling(jnp.asarray(hidden), jnp.asarray(mask), None),
                               (hidden * m).sum(1) / m.sum(1), rtol=1e-6)
    rng = np.random.default_rng(1)
    dense = {"kernel": rng.normal(size=(H, H)).astype(np.float32),
             "bias": rng.normal(size=(H,)).astype(np.float32)}
    pooled = heads_lib.bert_pooler(jnp.asarray(hidden), mask, {"pooler": {"dense": dense}})
    np.testing.assert_allclose(pooled, np.tanh(hidden[:, 0] @ dense["kernel"] + dense["bias"]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="heads.pooling=cls"):
        heads_lib.check_pooling("pooler", {"embeddings": {}})
    with pytest.raises(UserError, match="valid pooling names"):
        heads_lib.check_pooling("max", {})


# --- losses on a fixed example against NumPy -----------------------------------------------

SPECS = [TaskSpec("cls", "sequence_classification", 3, 0),
         TaskSpec("reg", "sequence_regression", 1, 1),
         TaskSpec("ner", "token_classification", 4, 2),
         TaskSpec("qa", "extractive_qa", 2, 3),
         TaskSpec("absent", "sequence_classification", 2, 4)]


def _fixed_batch_and_outputs():
    rng = np.random.default_rng(7)
    n = 8
    batch = {
        "task_id": np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32),
        "weight": np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32),  # example 3 is padding
        "label": np.array([2, -100, -100, -100, -100, -100, -100, -100], np.int32),
        # NaN where regression does not apply must not leak into any loss.
        "target": np.array([np.nan, np.nan, 0.5, 3.0, np.nan, np.nan, np.nan, np.nan], np.float32),
        "tag_ids": np.full((n, L), -100, np.int32),
        "start_positions": np.array([0, 0, 0, 0, 0, 0, 2, 1], np.int32),
        "end_positions": np.array([0, 0, 0, 0, 0, 0, 3, -100], np.int32),  # ex 7 unanswerable
    }
    batch["tag_ids"][4, :4] = [0, 3, -100, 1]
    batch["tag_ids"][5, :2] = [2, 2]
    outputs = {
        "cls": rng.normal(size=(n, 3)).astype(np.float32),
        "reg": rng.normal(size=(n,)).astype(np.float32),
        "ner": rng.normal(size=(n, L, 4)).astype(np.float32),
        "qa": rng.normal(size=(n, L, 2)).astype(np.float32),
        "absent": rng.normal(size=(n, 2)).astype(np.float32),
    }
    return batch, outputs


def test_task_losses_match_numpy():
    batch, out = _fixed_batch_and_outputs()
    losses, counts = jax.jit(lambda o, b: losses_lib.task_mean_losses(o, b, SPECS))(out, batch)
    cls = -_np_log_softmax(out["cls"][0])[2]  # example 1's label is ignored
    reg = (out["reg"][2] - 0.5) ** 2  # example 3 has weight 0
    ner_lp = _np_log_softmax(out["ner"])
    ner = -(ner_lp[4, 0, 0] + ner_lp[4, 1, 3] + ner_lp[4, 3, 1] + ner_lp[5, 0, 2]
            + ner_lp[5, 1, 2]) / 5  # mean over labelled tokens
    s, e = _np_log_softmax(out["qa"][6, :, 0]), _np_log_softmax(out["qa"][6, :, 1])
    qa = -(s[2] + e[3]) / 2  # example 7 has an ignored end position
    np.testing.assert_allclose(losses, [cls, reg, ner, qa, 0.0], rtol=1e-5)
    np.testing.assert_allclose(counts, [2, 1, 2, 2, 0])


def test_absent_task_has_zero_loss_and_finite_gradient():
    batch, out = _fixed_batch_and_outputs()

    def total(o):
        losses, _ = losses_lib.task_mean_losses(o, batch, SPECS)
        return losses.sum(), losses

    grads, losses = jax.grad(total, has_aux=True)(out)
    assert float(losses[4]) == 0.0
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
    assert np.all(np.asarray(grads["absent"]) == 0)
    assert np.all(np.asarray(grads["reg"])[[0, 1, 3, 4, 5, 6, 7]] == 0)


def test_soft_penalty_matches_hand_computation():
    stack = {"a": jnp.array([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]]),  # 3 tasks
             "b": {"c": jnp.array([[1.0], [1.0], [4.0]])}}
    # mean of a: [2, 2] -> squared deviations 1+0, 1+4, 0+4 = 10; mean of c: 2 -> 1+1+4 = 6.
    np.testing.assert_allclose(soft_sharing.soft_penalty(stack, "mean", 0.5), 0.5 * 16)
    # pairwise a: |t0-t1|^2 = 4+4, |t0-t2|^2 = 1+4, |t1-t2|^2 = 1+16 -> 30; c: 0+9+9 = 18.
    np.testing.assert_allclose(soft_sharing.soft_penalty(stack, "pairwise", 0.5), 0.5 * 48)
    with pytest.raises(UserError, match="valid soft-sharing penalty names"):
        soft_sharing.soft_penalty(stack, "l1", 1.0)
