"""The parallel strategies agree: jit on 1 device, jit on 8 (data parallel, FSDP) and pmap on 8
train the real MultiTaskModel (tiny random BERT) to the same losses and parameters, on a mixed
batch of every task type whose labelled tokens are spread unevenly over the devices."""
import jax
import numpy as np
import pytest

from configs.base import get_base_config
from mtl_jax.models import multitask
from mtl_jax.tasks.spec import TaskSpec
from mtl_jax.training import parallel, sharding, state as state_lib

SPECS = [TaskSpec("cls", "sequence_classification", 3, 0),
         TaskSpec("reg", "sequence_regression", 1, 1),
         TaskSpec("ner", "token_classification", 5, 2),
         TaskSpec("qa", "extractive_qa", 2, 3)]
B, L, VOCAB, STEPS = 16, 16, 100, 3
RNG = jax.random.PRNGKey(3)

SETUPS = {  # name -> (parallel.mode, mesh (data, fsdp, tensor), rules, devices)
    "jit1": ("jit", (1, 1, 1), "replicated", 1),
    "jit8_data": ("jit", (-1, 1, 1), "replicated", 8),
    "jit8_fsdp": ("jit", (2, 4, 1), "fsdp", 8),
    "pmap8": ("pmap", (-1, 1, 1), "replicated", 8),
}


def _config(mode, mesh, rules):
    c = get_base_config()
    c.parallel.mode, c.parallel.rules = mode, rules
    c.parallel.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
    c.data.batch_mode = "mixed"
    c.model.random_init, c.model.family = True, "bert"
    c.model.size.update(dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64))
    # 1e-12, not 0: hf.random_encoder_config drops 0-valued overrides (keeps 0.1 dropout).
    c.model.dropout, c.heads.dropout = 1e-12, 0.0
    c.optim.lr, c.optim.warmup_fraction = 1e-3, 0.0
    return c


def _batch(seed):
    """Tasks in blocks of 2 rows (each of 8 devices holds one task's pair of rows). The two NER
    blocks hold 1 and 12 labelled tokens per example: the token task's per-device denominators
    differ 12x, so a mean of per-device means would weight its tokens wrongly."""
    r = np.random.RandomState(seed)
    task = np.repeat(r.permutation(np.arange(8) % 4), 2).astype(np.int32)
    lengths = np.where(task == 2, L, r.randint(4, L + 1, B))
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    tags = np.full((B, L), -100, np.int32)
    ner_rows = np.flatnonzero(task == 2)
    for k, i in enumerate(ner_rows):
        n = 1 if k < 2 else 12  # the first NER block: 1 token per example; the second: 12
        tags[i, 1:1 + n] = r.randint(0, 5, n)
    start = r.randint(1, 4, B).astype(np.int32)
    return {"input_ids": (r.randint(1, VOCAB, (B, L)) * mask).astype(np.int32),
            "attention_mask": mask, "token_type_ids": np.zeros_like(mask), "task_id": task,
            "weight": np.where(np.arange(B) == 5, 0.0, 1.0).astype(np.float32),  # a padding row
            "label": r.randint(0, 3, B).astype(np.int32),
            "target": r.normal(size=B).astype(np.float32), "tag_ids": tags,
            "start_positions": start, "end_positions": start + r.randint(0, 3, B).astype(np.int32)}


def _train(name, params0):
    mode, mesh_shape, rules, n = SETUPS[name]
    c = _config(mode, mesh_shape, rules)
    model = multitask.build_model(c, SPECS)
    mesh = sharding.make_mesh(c, jax.devices()[:n])
    strategy = parallel.build(model, c, mesh,
                              state_lib.abstract_train_state(model, params0, c, STEPS))
    state = strategy.init_state(params0)
    rng = strategy.place_rng(RNG)
    losses = []
    for i in range(STEPS):
        state, m = strategy.train_step(state, strategy.place_batch(_batch(i)), rng)
        losses.append([float(m[f"train/loss/{s.name}"]) for s in SPECS])
    return np.asarray(losses), jax.tree.map(np.asarray, strategy.saved(state).params), state


@pytest.fixture(scope="module")
def runs():
    c = _config("jit", (1, 1, 1), "replicated")
    params0 = multitask.build_model(c, SPECS).init_params(jax.random.PRNGKey(0))
    params0 = jax.tree.map(np.asarray, params0)
    return {name: _train(name, params0) for name in SETUPS}


def test_batch_spreads_token_counts_unevenly_over_devices():
    for seed in range(STEPS):
        b = _batch(seed)
        per_device = [int((b["tag_ids"][2 * d:2 * d + 2] >= 0).sum()) for d in range(8)]
        assert sorted(c for c in per_device if c) == [2, 24], per_device


@pytest.mark.slow  # trains every strategy; test_step's one-device/data/fsdp/pmap test is the
# default tier's check that they agree
@pytest.mark.parametrize("name", [n for n in SETUPS if n != "jit1"])
def test_strategies_agree_on_every_task_type(runs, name):
    ref_losses, ref_params, _ = runs["jit1"]
    losses, params, _ = runs[name]
    # Step 1 (before any update) is one reduction of the same numbers: 1e-6.
    np.testing.assert_allclose(losses[0], ref_losses[0], rtol=1e-6, atol=1e-6, err_msg=name)
    # Later steps: Adam divides by sqrt(v) and magnifies reduction-order noise.
    np.testing.assert_allclose(losses[1:], ref_losses[1:], rtol=1e-4, atol=1e-4, err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(ref_params)):
        where = f"{name} {jax.tree_util.keystr(path)}"
        if "'qa']['dense']['bias']" in where:
            # A bias shared by every position of a softmax over positions has gradient exactly
            # 0; what is left is rounding noise, which Adam scales up to lr-sized steps.
            assert np.abs(a).max() <= 1e-3 * STEPS * 1.01, where
            continue
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=where)


@pytest.mark.slow  # shares the fixture that trains every strategy
def test_fsdp_really_shards_and_pmap_really_replicates(runs):
    fsdp_state, pmap_state = runs["jit8_fsdp"][2], runs["pmap8"][2]
    emb = fsdp_state.params["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    assert "fsdp" in jax.tree.leaves(tuple(emb.sharding.spec))
    assert emb.addressable_shards[0].data.size * 4 == emb.size
    leaf = jax.tree.leaves(pmap_state.params)[0]
    assert leaf.shape[0] == 8  # one copy per device
