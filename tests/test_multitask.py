"""MultiTaskModel: outputs, per-task losses, hard/soft sharing, labels, specs, summary, configs."""
import pathlib
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from ml_collections.config_flags import config_flags

from mtl_jax.errors import UserError
from mtl_jax.models import bert, multitask, soft_sharing
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.tasks.spec import TaskSpec

REPO = pathlib.Path(__file__).resolve().parents[1]
SPECS = [TaskSpec("cls", "sequence_classification", 3, 0),
         TaskSpec("reg", "sequence_regression", 1, 1),
         TaskSpec("ner", "token_classification", 5, 2),
         TaskSpec("qa", "extractive_qa", 2, 3)]
VOCAB, B, L = 50, 8, 12


def load_config(name, arg=None):
    module = config_flags._LoadConfigModule(name, str(REPO / "configs" / f"{name}.py"))  # pylint: disable=protected-access
    return module.get_config(arg)


def tiny_model(specs=SPECS, family="bert", **sections):
    """A random 2-layer encoder (hidden 32) built without a checkpoint or tokenizer."""
    c = load_config("base")
    c.model.random_init = True
    c.peft.update(dict(adapter_size=8, lora_rank=4, prefix_length=3, prefix_hidden=16))
    for key, value in sections.items():
        section, field = key.split("__")
        c[section][field] = value
    enc = EncoderConfig(family=family, vocab_size=VOCAB, hidden_size=32, num_layers=2,
                        num_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=32,
                        **multitask.encoder_overrides(c, len(specs)))
    return multitask.MultiTaskModel(c, specs, enc)


def make_batch(task_ids, seed=0, length=L):
    rng = np.random.default_rng(seed)
    n = len(task_ids)
    mask = np.ones((n, length), np.int32)
    for i in range(n):
        mask[i, rng.integers(length // 2, length + 1):] = 0
    ids = np.where(mask > 0, rng.integers(1, VOCAB, (n, length)), 0).astype(np.int32)
    tags = np.where(mask > 0, rng.integers(0, 5, (n, length)), -100).astype(np.int32)
    return {
        "input_ids": ids, "attention_mask": mask,
        "token_type_ids": (np.arange(length)[None] >= length // 3).astype(np.int32) * mask,
        "task_id": np.asarray(task_ids, np.int32), "weight": np.ones(n, np.float32),
        "label": rng.integers(0, 3, n).astype(np.int32),
        "target": rng.normal(size=n).astype(np.float32),
        "tag_ids": tags,
        "start_positions": rng.integers(0, length // 2, n).astype(np.int32),
        "end_positions": rng.integers(0, length // 2, n).astype(np.int32),
    }


def take(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def perturb(tree, seed, scale=0.05):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


def jit_apply(model):
    return jax.jit(model.apply, static_argnames=("deterministic", "homogeneous"))


def assert_mixed_equals_per_task(model, params, mixed_kwargs=None, single_kwargs=None):
    """Each example's own-task output in a mixed batch == the output of its task's own batch."""
    batch = make_batch([0, 1, 2, 3, 2, 1, 0, 3], seed=3)  # 2 examples of each task
    apply = jit_apply(model)
    mixed = apply(params, batch, **(mixed_kwargs or {}))
    for spec in model.specs:
        rows = np.flatnonzero(batch["task_id"] == spec.index)
        alone = apply(params, take(batch, rows), **(single_kwargs or {}))
        np.testing.assert_allclose(np.asarray(mixed[spec.name])[rows], alone[spec.name],
                                   rtol=1e-5, atol=1e-5, err_msg=spec.name)
    return batch, mixed


def test_hard_sharing_outputs_every_head_on_every_example():
    model = tiny_model()
    params = model.init_params(jax.random.key(0))
    assert set(params) == {"encoder", "heads"}
    assert set(params["heads"]) == {"cls", "reg", "ner", "qa"}
    out = jax.jit(model.apply)(params, make_batch([0, 1, 2, 3] * 2))
    assert {k: v.shape for k, v in out.items()} == {
        "cls": (B, 3), "reg": (B,), "ner": (B, L, 5), "qa": (B, L, 2)}
    # The cls head is a linear map of the [CLS] hidden state of the shared encoder.
    batch = make_batch([0, 1, 2, 3] * 2)
    hidden = jax.jit(model.encoder.apply)({"params": params["encoder"]}, batch["input_ids"],
                                          batch["attention_mask"], batch["token_type_ids"])
    head = params["heads"]["cls"]["dense"]
    np.testing.assert_allclose(out["cls"], hidden[:, 0] @ head["kernel"] + head["bias"],
                               rtol=1e-5, atol=1e-5)


def test_task_losses_match_per_task_batches_and_absent_task_is_zero():
    model = tiny_model()
    params = model.init_params(jax.random.key(0))
    batch = make_batch([0, 1, 2, 0, 1, 2, 0, 1], seed=1)  # no QA example
    batch["weight"][7] = 0.0  # a padding example (task 1) must not count
    losses, counts, aux = jax.jit(model.task_losses, static_argnames="deterministic")(
        params, batch, None, deterministic=True)
    np.testing.assert_array_equal(counts, [3, 2, 2, 0])
    assert float(losses[3]) == 0.0 and float(aux["soft_penalty"]) == 0.0
    for spec in model.specs[:3]:
        rows = np.flatnonzero((batch["task_id"] == spec.index) & (batch["weight"] > 0))
        rows = np.resize(rows, 3)  # same shape for every task: one compile
        sub = take(batch, rows)
        n_real = (batch["task_id"][:7] == spec.index).sum()
        sub["weight"] = np.where(np.arange(3) < n_real, 1.0, 0.0)
        alone, _, _ = jax.jit(model.task_losses, static_argnames="deterministic")(
            params, sub, None, deterministic=True)
        np.testing.assert_allclose(losses[spec.index], alone[spec.index], rtol=1e-5)
    grads = jax.jit(jax.grad(
        lambda p: model.task_losses(p, batch, jax.random.key(1))[0].sum()))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads["heads"]["qa"]))


def test_dropout_needs_rng_and_changes_outputs():
    model = tiny_model()
    params = model.init_params(jax.random.key(0))
    batch = make_batch([0] * B)
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, batch, deterministic=False)
    train = model.apply(params, batch, jax.random.key(1), deterministic=False)
    assert not np.allclose(train["cls"], model.apply(params, batch)["cls"])


def test_soft_sharing_mixed_batch_equals_per_task_and_penalty():
    model = tiny_model(sharing__mode="soft", data__batch_mode="mixed", sharing__soft_lambda=0.1)
    params = model.init_params(jax.random.key(0))
    assert jax.tree.leaves(params["encoder"])[0].shape[0] == 4
    _, _, aux = model.task_losses(params, make_batch([0] * B), None, deterministic=True)
    assert float(aux["soft_penalty"]) == 0.0  # all copies start from the same weights
    params = {**params, "encoder": perturb(params["encoder"], seed=1)}
    batch, mixed = assert_mixed_equals_per_task(model, params,
                                                single_kwargs=dict(homogeneous=True))
    # The encoders really differ: running task 0's examples through encoder 1 changes them.
    rows = np.flatnonzero(batch["task_id"] == 0)
    other = take(batch, rows)
    other["task_id"] = np.ones_like(other["task_id"])
    assert not np.allclose(jit_apply(model)(params, other, homogeneous=True)["cls"],
                           np.asarray(mixed["cls"])[rows], atol=1e-4)
    _, _, aux = model.task_losses(params, batch, None, deterministic=True)
    np.testing.assert_allclose(aux["soft_penalty"],
                               0.1 * soft_sharing.mean_penalty(params["encoder"]), rtol=1e-6)


def test_soft_homogeneous_batch_uses_first_real_examples_encoder():
    model = tiny_model(sharing__mode="soft")
    params = model.init_params(jax.random.key(0))
    params = {**params, "encoder": perturb(params["encoder"], seed=2)}
    batch = make_batch([0, 2, 2, 2], seed=4)
    batch["weight"][0] = 0.0  # a padding row of another task first
    homogeneous = jit_apply(model)(params, batch)
    mixed = jit_apply(model)(params, batch, homogeneous=False)
    np.testing.assert_allclose(homogeneous["ner"][1:], mixed["ner"][1:], rtol=1e-5, atol=1e-5)


def test_param_labels_trainable_mask_and_logical_specs():
    model = tiny_model(peft__kind="lora", heads__pooling="pooler")
    params = model.init_params(jax.random.key(0))
    labels = model.param_labels(params)
    layer = labels["encoder"]["layers"]["layer_0"]
    assert labels["encoder"]["embeddings"]["word_embeddings"]["embedding"] == "embeddings"
    assert labels["encoder"]["pooler"]["dense"]["kernel"] == "pooler"
    assert layer["attention"]["query"]["kernel"] == "encoder"
    assert layer["attention"]["query"]["lora_a"] == "peft"
    assert labels["heads"]["ner"]["dense"]["bias"] == "heads/ner"
    mask = model.trainable_mask(params)
    assert not mask["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    assert mask["encoder"]["layers"]["layer_1"]["attention"]["value"]["lora_b"]
    assert mask["heads"]["cls"]["dense"]["kernel"]
    specs = model.logical_specs(params)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)) == \
        jax.tree.structure(params)
    assert specs["encoder"]["embeddings"]["word_embeddings"]["embedding"] == \
        PartitionSpec("vocab", "embed")
    assert specs["heads"]["cls"]["dense"]["kernel"] == PartitionSpec()
    soft = tiny_model(sharing__mode="soft")
    soft_specs = soft.logical_specs(soft.init_params(jax.random.key(0)))
    assert soft_specs["encoder"]["embeddings"]["word_embeddings"]["embedding"] == \
        PartitionSpec(None, "vocab", "embed")


def test_summary_counts_parameters():
    model = tiny_model(peft__kind="adapter")
    params = model.init_params(jax.random.key(0))
    sizes = {"/".join(str(k.key) for k in path): x.size
             for path, x in jax.tree_util.tree_leaves_with_path(params)}
    total = sum(sizes.values())
    trainable = sum(n for p, n in sizes.items() if p.startswith("heads/") or "adapter" in p)
    text = model.summary(params)
    m = re.fullmatch(r"params: total ([\d.]+)M, trainable ([\d.]+)M \(([\d.]+)%\)", text)
    assert m, text
    assert float(m.group(1)) == pytest.approx(total / 1e6, rel=5e-3)
    assert float(m.group(2)) == pytest.approx(trainable / 1e6, rel=5e-3)
    assert float(m.group(3)) == pytest.approx(100 * trainable / total, rel=5e-2)


def test_pooler_pooling_uses_the_checkpoints_pooler():
    model = tiny_model(heads__pooling="pooler")
    params = model.init_params(jax.random.key(0))
    batch = make_batch([0] * B)
    feats = model.features(params, batch)
    np.testing.assert_allclose(feats.pooled, bert.pool(params["encoder"], feats.hidden,
                                                       model.encoder_config), rtol=1e-5, atol=1e-6)
    t5 = tiny_model(family="t5", heads__pooling="pooler")
    with pytest.raises(UserError, match="heads.pooling=cls or mean"):
        t5.init_params(jax.random.key(0))


def test_t5_mean_pooling_end_to_end():
    model = tiny_model(family="t5", heads__pooling="mean")
    params = model.init_params(jax.random.key(0))
    batch = make_batch([0, 1, 2, 3] * 2)
    feats = model.features(params, batch)
    m = batch["attention_mask"][..., None]
    np.testing.assert_allclose(feats.pooled, (np.asarray(feats.hidden) * m).sum(1) / m.sum(1),
                               rtol=1e-5, atol=1e-6)
    losses, _, _ = model.task_losses(params, batch, jax.random.key(0))
    assert np.all(np.isfinite(losses)) and np.all(np.asarray(losses) > 0)


def test_user_errors():
    c = load_config("base")
    c.sharing.mode = "soft"
    c.peft.kind = "lora"
    with pytest.raises(UserError, match="peft.kind=none"):
        multitask.build_model(c, SPECS)
    c.peft.kind = "prefx"
    with pytest.raises(UserError, match="valid peft kind names"):
        multitask.encoder_overrides(c, 4)
    with pytest.raises(UserError, match="consecutive"):
        tiny_model(specs=[TaskSpec("a", "sequence_classification", 2, 1)])


@pytest.mark.parametrize("name", ["bert_multitask", "t5_prefix"])
def test_tiny_configs_build_a_runnable_model(name):
    config = load_config(name, "tiny")
    model = multitask.build_model(config, SPECS)
    cfg = model.encoder_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (2, 32, len(model.tokenizer))
    assert cfg.family == ("t5" if name == "t5_prefix" else "bert")
    params = model.init_params(jax.random.key(0))
    batch = make_batch([0, 1, 2, 3] * 2)
    losses, counts, aux = jax.jit(model.task_losses)(params, batch, jax.random.key(1))
    assert np.all(np.isfinite(losses)) and np.all(np.asarray(losses) > 0)
    np.testing.assert_array_equal(counts, [2, 2, 2, 2])
    assert np.isfinite(aux["soft_penalty"])
