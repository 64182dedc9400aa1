"""Per-task adapters and LoRA inside the encoder: zero init is the base model, LoRA merges,
per-example task routing, and the layers against NumPy."""
import numpy as np
import pytest

import jax
import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from mtl_jax.checkpoints.hf import random_encoder_config
from mtl_jax.errors import UserError
from mtl_jax.models.encoder import build_encoder, init_encoder_params
from mtl_jax.models.peft_layers import Adapter, Dense, merge_lora

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
PEFT = dict(num_tasks=3, adapter_kind="houlsby", adapter_size=8, lora_rank=4, lora_alpha=8.0)


def _batch(b=6, length=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, 100, (b, length)), jnp.int32)
    mask = np.ones((b, length), np.int32)
    mask[1, 4:] = 0
    return ids, jnp.asarray(mask)


def _is_peft(path):
    return any("adapter" in p or p.startswith("lora_") for p in path)


def _strip_peft(params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not _is_peft(k)})


def _randomize_peft(params, key, scale=0.1):
    """Nonzero values for every PEFT leaf (LoRA B and adapter up-projections start at zero)."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(key, len(flat))
    return traverse_util.unflatten_dict({
        path: (scale * jax.random.normal(k, v.shape) if _is_peft(path) else v)
        for k, (path, v) in zip(keys, flat.items())})


# Both families share the PEFT code; each pairing below covers one family in each layout.
FAMILY_LAYOUTS = [("bert", False), ("t5_v1_1", True)]


@pytest.mark.parametrize("family,scan_layers", FAMILY_LAYOUTS)
def test_zero_initialised_peft_is_exactly_the_base_encoder(family, scan_layers):
    cfg = random_encoder_config(family, 100, scan_layers=scan_layers, **TINY, **PEFT)
    peft_encoder = build_encoder(cfg)
    params = init_encoder_params(peft_encoder, jax.random.key(0))
    flat = traverse_util.flatten_dict(params)
    assert any(p[-1] == "lora_b" for p in flat) and any("mlp_adapter" in p for p in flat)
    base = build_encoder(cfg.replace(num_tasks=0, adapter_kind=None, lora_rank=0))
    ids, mask = _batch()
    task_ids = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    with_peft = peft_encoder.apply({"params": params}, ids, mask, task_ids=task_ids)
    without = base.apply({"params": _strip_peft(params)}, ids, mask)
    # The zero LoRA B / adapter up-projection add exact zeros; XLA may fuse the scanned body
    # differently, hence float32 rounding (measured <= 5e-7) rather than bit equality.
    np.testing.assert_allclose(np.asarray(with_peft), np.asarray(without), rtol=0, atol=2e-6)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_lora_targets_regex_selects_the_projections(family):
    def shapes(**peft):
        encoder = build_encoder(random_encoder_config(family, 100, **TINY, **peft))
        return jax.eval_shape(lambda: init_encoder_params(encoder, jax.random.key(0)))

    params = shapes(num_tasks=2, lora_rank=2)
    layer = params["layers"]["layer_0"]
    assert set(k for k, v in layer["attention"].items() if "lora_a" in v) == {"query", "value"}
    assert not any("lora_a" in v for v in layer["mlp"].values())
    assert layer["attention"]["query"]["lora_a"].shape == (2, 32, 2)
    assert layer["attention"]["query"]["lora_b"].shape == (2, 2, 4, 8)
    flat = traverse_util.flatten_dict(shapes(num_tasks=2, lora_rank=2, lora_targets=r"mlp/wo"))
    assert {p[-3:-1] for p in flat if p[-1] == "lora_a"} == {("mlp", "wo")}


@pytest.mark.parametrize("family,scan_layers", [("bert", True), ("t5_v1_1", False)])
def test_nonzero_lora_equals_merged_weights(family, scan_layers):
    cfg = random_encoder_config(family, 100, scan_layers=scan_layers, **TINY, num_tasks=3,
                                lora_rank=4, lora_alpha=8.0)
    encoder = build_encoder(cfg)
    params = _randomize_peft(init_encoder_params(encoder, jax.random.key(0)), jax.random.key(1))
    merged_encoder = build_encoder(cfg.replace(lora_rank=0))
    ids, mask = _batch()
    for task in range(3):
        task_ids = jnp.full((ids.shape[0],), task, jnp.int32)
        lora = encoder.apply({"params": params}, ids, mask, task_ids=task_ids)
        merged = merged_encoder.apply({"params": merge_lora(params, cfg, task)}, ids, mask)
        np.testing.assert_allclose(np.asarray(lora), np.asarray(merged), atol=2e-5)
    base = merged_encoder.apply({"params": _strip_peft(params)}, ids, mask)
    assert np.abs(np.asarray(lora) - np.asarray(base)).max() > 1e-2  # LoRA really acts


def test_mixed_task_batch_equals_each_task_alone():
    cfg = random_encoder_config("t5_v1_1", 100, **TINY, **PEFT)
    encoder = build_encoder(cfg)
    params = _randomize_peft(init_encoder_params(encoder, jax.random.key(0)), jax.random.key(2))
    ids, mask = _batch()
    task_ids = np.array([0, 2, 1, 0, 1, 2], np.int32)
    mixed = np.asarray(encoder.apply({"params": params}, ids, mask, task_ids=jnp.asarray(task_ids)))
    outs = []
    for task in range(3):
        rows = np.flatnonzero(task_ids == task)
        alone = np.asarray(encoder.apply({"params": params}, ids[rows], mask[rows],
                                         task_ids=jnp.asarray(task_ids[rows])))
        np.testing.assert_allclose(mixed[rows], alone, atol=1e-5)
        outs.append(alone[0])
    assert np.abs(outs[0] - outs[1]).max() > 1e-2  # the tasks really differ


def test_pfeiffer_has_only_the_mlp_adapter():
    cfg = random_encoder_config("bert", 100, **TINY, num_tasks=2, adapter_kind="pfeiffer",
                                adapter_size=4)
    encoder = build_encoder(cfg)
    params = jax.eval_shape(lambda: init_encoder_params(encoder, jax.random.key(0)))
    layer = params["layers"]["layer_0"]
    assert "mlp_adapter" in layer and "attention_adapter" not in layer
    assert layer["mlp_adapter"]["down_kernel"].shape == (2, 32, 4)


def test_adapter_and_lora_dense_match_numpy():
    cfg = random_encoder_config("bert", 100, **TINY, num_tasks=3, adapter_kind="houlsby",
                                adapter_size=5, lora_rank=2, lora_alpha=6.0,
                                lora_targets=".*")  # a top-level Dense has an empty path
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 32)).astype(np.float32)
    task_ids = np.array([2, 0, 1, 2], np.int32)

    adapter = Adapter(cfg)
    p = nn.meta.unbox(adapter.init(jax.random.key(0), x, task_ids)["params"])
    p = jax.tree_util.tree_map(
        np.asarray, _randomize_peft({"adapter": p}, jax.random.key(1))["adapter"])
    got = adapter.apply({"params": p}, x, task_ids)
    down = (np.einsum("ble,bes->bls", x, p["down_kernel"][task_ids])
            + p["down_bias"][task_ids][:, None])
    up = np.einsum("bls,bse->ble", np.maximum(down, 0), p["up_kernel"][task_ids])
    np.testing.assert_allclose(got, x + up + p["up_bias"][task_ids][:, None], atol=1e-5)

    dense = Dense((4, 8), ("embed", "heads", "kv"), cfg)
    p = nn.meta.unbox(dense.init(jax.random.key(0), x, task_ids)["params"])
    p = jax.tree_util.tree_map(np.asarray, _randomize_peft({"lora": p}, jax.random.key(3))["lora"])
    got = dense.apply({"params": p}, x, task_ids)
    base = np.einsum("ble,ehk->blhk", x, p["kernel"]) + p["bias"]
    delta = np.einsum("ble,ber,brhk->blhk", x, p["lora_a"][task_ids], p["lora_b"][task_ids])
    np.testing.assert_allclose(got, base + 3.0 * delta, atol=1e-5)  # alpha / r = 3


def test_peft_without_task_ids_is_a_user_error():
    cfg = random_encoder_config("bert", 100, **TINY, num_tasks=2, lora_rank=2)
    encoder = build_encoder(cfg)
    params = jax.eval_shape(lambda: init_encoder_params(encoder, jax.random.key(0)))
    ids, mask = _batch()
    with pytest.raises(UserError, match="task_ids"):
        jax.eval_shape(lambda p: encoder.apply({"params": p}, ids, mask), params)


def test_lora_dropout_only_in_training():
    cfg = random_encoder_config("bert", 100, **TINY, num_tasks=1, lora_rank=2, lora_dropout=0.5,
                                hidden_dropout=0.0, attention_dropout=0.0)
    encoder = build_encoder(cfg)
    params = _randomize_peft(init_encoder_params(encoder, jax.random.key(0)), jax.random.key(1))
    ids, mask = _batch()
    t = jnp.zeros((ids.shape[0],), jnp.int32)
    run = lambda det, seed: np.asarray(encoder.apply(  # noqa: E731
        {"params": params}, ids, mask, task_ids=t, deterministic=det,
        rngs={"dropout": jax.random.key(seed)}))
    np.testing.assert_array_equal(run(True, 0), run(True, 1))
    assert np.abs(run(False, 0) - run(False, 1)).max() > 1e-3
