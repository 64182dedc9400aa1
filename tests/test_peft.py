"""Per-task prefixes, adapters and LoRA through the full model; exports; trainable fractions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mtl_jax.models import export, multitask, summary
from mtl_jax.models.attention import Prefix
from mtl_jax.models.encoder import build_encoder
from mtl_jax.models.prefix import gather_prefix, prefix_table
from mtl_jax.tasks.spec import TaskSpec
from test_multitask import (assert_mixed_equals_per_task, jit_apply, load_config,
                            make_batch, tiny_model)

B = 8


def _with_base_weights(peft_encoder, base_encoder):
    """The PEFT encoder tree with every non-PEFT leaf taken from the base encoder."""
    flat, base = traverse_util.flatten_dict(peft_encoder), traverse_util.flatten_dict(base_encoder)
    assert set(base) == {k for k in flat if not summary.PEFT_PATH.search("/".join(k))}
    return traverse_util.unflatten_dict({k: base.get(k, v) for k, v in flat.items()})


def _perturb_peft(params, seed):
    """Nonzero LoRA B / adapter up-projections, different per task."""
    flat = traverse_util.flatten_dict(params["encoder"])
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    flat = {k: (v + 0.1 * jax.random.normal(next(keys), v.shape)
                if summary.PEFT_PATH.search("/".join(k)) else v) for k, v in flat.items()}
    return {**params, "encoder": traverse_util.unflatten_dict(flat)}


@pytest.fixture(scope="module")
def base():
    model = tiny_model()
    return model, model.init_params(jax.random.key(0)), make_batch([0, 1, 2, 3] * 2, seed=5)


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_zero_initialised_lora_and_adapters_give_the_base_outputs_exactly(base, kind):
    base_model, base_params, batch = base
    model = tiny_model(peft__kind=kind)
    params = model.init_params(jax.random.key(0))  # LoRA B = 0; adapter up-projection = 0
    params = {**params, "encoder": _with_base_weights(params["encoder"], base_params["encoder"]),
              "heads": base_params["heads"]}
    out, ref = jit_apply(model)(params, batch), jit_apply(base_model)(base_params, batch)
    for name in ref:  # equal up to float32 rounding (XLA may fuse the "+ 0" differently)
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
    changed = jit_apply(model)(_perturb_peft(params, 1), batch)
    assert not np.allclose(changed["cls"], ref["cls"], atol=1e-4)


@pytest.mark.parametrize("kind", ["prefix", "adapter", "lora"])
def test_mixed_task_batch_equals_per_task_forwards(kind):
    model = tiny_model(peft__kind=kind, data__batch_mode="mixed")
    params = model.init_params(jax.random.key(0))
    params = _perturb_peft(params, 2) if kind != "prefix" else params
    batch, mixed = assert_mixed_equals_per_task(model, params)
    # Per-task parameters matter: the same examples labelled as another task give other outputs.
    relabelled = {**batch, "task_id": (batch["task_id"] + 1) % 4}
    assert not np.allclose(jit_apply(model)(params, relabelled)["cls"], mixed["cls"], atol=1e-4)


def test_prefix_masked_out_gives_base_outputs_and_nonzero_prefix_changes_them():
    model = tiny_model(peft__kind="prefix")
    params = model.init_params(jax.random.key(0))
    batch = make_batch([0, 1, 2, 3] * 2, seed=6)
    prefix = gather_prefix(params["prefix"], batch["task_id"])
    assert prefix.keys.shape == (2, B, 3, 4, 8) and np.all(np.asarray(prefix.mask) == 1)
    run = jax.jit(lambda p: model.encoder.apply(
        {"params": params["encoder"]}, batch["input_ids"], batch["attention_mask"],
        token_type_ids=batch["token_type_ids"], prefix=p))
    plain = run(None)
    masked = run(Prefix(prefix.keys, prefix.values, jnp.zeros_like(prefix.mask)))
    np.testing.assert_allclose(masked, plain, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(run(prefix)) - np.asarray(plain)).max() > 1e-3


def test_prefix_table_matches_numpy_mlp_and_folded_prefix_gives_same_outputs():
    model = tiny_model(peft__kind="prefix")
    params = model.init_params(jax.random.key(0))
    p = jax.tree.map(np.asarray, params["prefix"])
    h = np.tanh(p["embedding"] @ p["mlp"]["hidden"]["kernel"] + p["mlp"]["hidden"]["bias"])
    out = np.einsum("tph,hx->tpx", h, p["mlp"]["out"]["kernel"].reshape(16, -1))
    # axes: T P layers k/v N H
    out = (out + p["mlp"]["out"]["bias"].reshape(-1)).reshape(4, 3, 2, 2, 4, 8)
    keys, values = prefix_table(params["prefix"])
    np.testing.assert_allclose(keys, out[:, :, :, 0].transpose(0, 2, 1, 3, 4), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values, out[:, :, :, 1].transpose(0, 2, 1, 3, 4),
                               rtol=1e-5, atol=1e-6)
    folded = export.fold_prefix(params)
    assert set(folded["prefix"]) == {"keys", "values"}
    batch = make_batch([3, 2, 1, 0] * 2, seed=7)
    ref, out = jit_apply(model)(params, batch), jit_apply(model)(folded, batch)
    for name in ref:
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6)


def test_merge_lora_gives_a_plain_encoder_with_the_tasks_outputs():
    model = tiny_model(peft__kind="lora")
    params = _perturb_peft(model.init_params(jax.random.key(0)), 3)
    batch = make_batch([2] * B, seed=8)
    merged, cfg = export.merge_lora(params, model, "ner")
    assert cfg.lora_rank == 0 and "lora_a" not in str(jax.tree_util.tree_structure(merged))
    run = lambda enc, p, task_ids: enc.apply(  # noqa: E731
        {"params": p}, batch["input_ids"], batch["attention_mask"],
        token_type_ids=batch["token_type_ids"], task_ids=task_ids)
    np.testing.assert_allclose(run(build_encoder(cfg), merged["encoder"], None),
                               run(model.encoder, params["encoder"], batch["task_id"]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["prefix", "adapter", "lora"])
def test_peft_trains_only_heads_and_peft(kind):
    model = tiny_model(peft__kind=kind)
    params = model.init_params(jax.random.key(0))
    labels = jax.tree.leaves(model.param_labels(params))
    mask = jax.tree.leaves(model.trainable_mask(params))
    trainable = {lab.split("/")[0] for lab, m in zip(labels, mask) if m}
    frozen = {lab for lab, m in zip(labels, mask) if not m}
    assert trainable == {"heads", "prefix" if kind == "prefix" else "peft"}
    assert frozen == {"embeddings", "encoder", "pooler"}


# --- MiniLM: trainable fractions of the shipped configs -----------------------------------------

MINILM_CONFIGS = {"prefix": ("bert_multitask", {"peft.kind": "prefix"}),
                  "adapter": ("bert_adapters", {}), "lora": ("bert_lora", {})}
MINILM_SPECS = [TaskSpec(name, task_type, num_labels, i) for i, (name, task_type, num_labels) in
                enumerate([("cola", "sequence_classification", 2),
                           ("conll2003", "token_classification", 9),
                           ("rte", "sequence_classification", 2),
                           ("sst2", "sequence_classification", 2)])]


@pytest.mark.parametrize("kind", ["prefix", "adapter", "lora"])
def test_minilm_peft_trains_under_5_percent(kind, minilm_path, capsys):
    del minilm_path  # ensures the offline MiniLM package is installed
    name, changes = MINILM_CONFIGS[kind]
    config = load_config(name)
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    model = multitask.build_model(config, MINILM_SPECS)
    assert model.encoder_config.hidden_size == 384 and model.encoder_config.num_layers == 6
    params = model.abstract_params()  # shapes only: no weights loaded
    fraction = summary.trainable_fraction(params, kind)
    with capsys.disabled():
        print(f"\nMiniLM {kind} (4 tasks): {model.summary(params)}; fraction {fraction:.4%}")
    assert 0 < fraction < 0.05


@pytest.mark.slow
def test_minilm_pretrained_params_match_the_abstract_tree(minilm_path):
    del minilm_path
    config = load_config("bert_lora")
    model = multitask.build_model(config, MINILM_SPECS)
    params = model.init_params(jax.random.key(0))
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, str(x.dtype)), t)  # noqa: E731
    assert shapes(params) == shapes(model.abstract_params())
    assert model.summary(params).startswith("params: total 23.0M, trainable 0.301M (1.3%)")
    batch = make_batch([0, 1, 2, 3] * 2, seed=9)
    losses, counts, _ = jax.jit(model.task_losses, static_argnames="deterministic")(
        params, batch, None, deterministic=True)
    assert np.all(np.isfinite(losses)) and np.all(np.asarray(counts) == 2)
