"""Sequence packing: the packer, the packed batch layout, and that a packed batch's per-task
losses and gradients equal the unpacked batch's (BERT and T5; hard and soft sharing; LoRA,
adapters and prefixes routed per segment in mixed-task rows), with no attention across
segments."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.data import packing
from mtl_jax.errors import UserError
from test_multitask import SPECS, make_batch, tiny_model

LENGTH = 12
# 16 examples of the four task types, mixed (their lengths are 6..12 tokens, make_batch)
MIXED = [0, 1, 2, 3, 2, 1, 0, 3, 3, 0, 2, 1, 1, 3, 0, 2]


def brute_force_fits(lengths, capacity, bins):
    """The fewest bins any assignment can use (exhaustive; a handful of items only)."""
    for count in range(1, len(lengths) + 1):
        for assignment in itertools.product(range(count), repeat=len(lengths)):
            loads = np.bincount(assignment, weights=lengths, minlength=count)
            if loads.max() <= capacity:
                return count
    return len(lengths)


@pytest.mark.parametrize("seed", range(6))
def test_first_fit_decreasing_places_every_item_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 11, 7)
    bins = packing.first_fit_decreasing(lengths, 12)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(lengths[b].sum() <= 12 for b in bins)
    # FFD's guarantee: at most 11/9 OPT + 6/9 bins (Dosa 2007); here within one bin of optimal
    assert len(bins) <= brute_force_fits(lengths, 12, bins) + 1
    assert bins == packing.first_fit_decreasing(lengths, 12)  # deterministic


def test_first_fit_decreasing_example_by_hand():
    # decreasing: 7 (i1), 5 (i0), 4 (i3), 3 (i2), 2 (i4); capacity 10
    # 7 -> bin0 (3 left); 5 -> bin1 (5 left); 4 -> bin1 (1 left); 3 -> bin0 (0); 2 -> bin2
    assert packing.first_fit_decreasing([5, 7, 3, 4, 2], 10) == [[1, 2], [0, 3], [4]]


def test_row_counts_are_few_and_waste_under_a_third():
    sizes = sorted({2 ** k for k in range(8)} | {3 * 2 ** k for k in range(7)})
    for multiple in (1, 2, 8):
        for bins in range(1, 129):
            rows = packing.row_count(bins, multiple)
            units = -(-bins // multiple)
            assert rows == multiple * min(s for s in sizes if s >= units), (bins, multiple)
            assert rows - bins < max(rows / 3, multiple), (bins, multiple)
    assert len({packing.row_count(b, 1) for b in range(1, 33)}) == 10  # 1, 2, 3, 4, 6, ..., 32


def test_an_example_longer_than_a_row_is_one_line():
    with pytest.raises(UserError, match="raise data.packing_length"):
        packing.first_fit_decreasing([3, 13], 12)


def unpacked(task_ids, seed=0, weights=None):
    batch = make_batch(task_ids, seed=seed, length=LENGTH)
    if weights is not None:
        batch["weight"] = np.asarray(weights, np.float32)
    return batch


def test_packed_rows_hold_every_example_once_with_restarted_positions():
    batch = unpacked(MIXED, seed=1)
    packed = packing.pack_batch(batch, row_length=24, row_multiple=4)
    rows, length = packed["packed_input_ids"].shape
    assert length == 24 and rows % 4 == 0
    assert "input_ids" not in packed and packed["attention_mask"].shape == (16, LENGTH)
    flat = {k: packed[k].reshape(-1) for k in packing.PACKED_KEYS}
    for e in range(16):
        n = int(batch["attention_mask"][e].sum())
        where = packed["packed_index"][e, :n]
        np.testing.assert_array_equal(flat["packed_input_ids"][where], batch["input_ids"][e, :n])
        np.testing.assert_array_equal(flat["packed_token_type_ids"][where],
                                      batch["token_type_ids"][e, :n])
        np.testing.assert_array_equal(flat["packed_position_ids"][where], np.arange(n))
        assert (flat["packed_task_ids"][where] == batch["task_id"][e]).all()
        assert len(set(flat["packed_segment_ids"][where])) == 1  # one segment, in one row
        assert len(set(where // 24)) == 1
    # every real token slot is used exactly once; fewer rows than examples
    used = packed["packed_index"][batch["attention_mask"] > 0]
    assert len(set(used.tolist())) == used.size == (flat["packed_segment_ids"] > 0).sum()
    assert rows < 16


def test_padding_examples_take_no_row_space():
    batch = unpacked(MIXED[:8], seed=2, weights=[1, 1, 1, 1, 1, 0, 0, 0])
    packed = packing.pack_batch(batch, row_length=LENGTH, row_multiple=1)
    real_tokens = batch["attention_mask"][:5].sum()
    assert (packed["packed_segment_ids"] > 0).sum() == real_tokens
    assert (packed["packed_index"][5:] == 0).all()


# --- the model on packed rows ------------------------------------------------------------------

MODELS = {
    "bert": dict(family="bert"),
    "t5": dict(family="t5"),
    "bert_lora": dict(family="bert", peft__kind="lora", peft__lora_dropout=0.0),
    "bert_adapter": dict(family="bert", peft__kind="adapter"),
    "bert_houlsby": dict(family="bert", peft__kind="adapter", peft__adapter_kind="houlsby"),
    "t5_prefix": dict(family="t5", peft__kind="prefix"),
    "bert_prefix": dict(family="bert", peft__kind="prefix"),
    "bert_soft": dict(family="bert", sharing__mode="soft"),
}


def build(name):
    options = dict(MODELS[name])
    family = options.pop("family")
    model = tiny_model(SPECS, family=family, data__batch_mode="mixed", **options)
    params = model.init_params(jax.random.key(0))
    # move every parameter off its init (LoRA B and adapter up-projections start at zero)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                          for x, k in zip(leaves, keys)])
    return model, params


def losses_and_grads(model, params, batch):
    def total(p):
        losses, counts, _ = model.task_losses(p, batch, deterministic=True)
        return losses.sum(), losses
    (_, losses), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    return losses, grads


@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_losses_and_gradients_equal_unpacked(name):
    model, params = build(name)
    batch = unpacked(MIXED, seed=3, weights=[1] * 14 + [0, 0])
    packed = packing.pack_batch(batch, row_length=3 * LENGTH, row_multiple=2)
    assert packed["packed_input_ids"].shape[0] < 16  # several examples per row
    want_losses, want_grads = losses_and_grads(model, params, batch)
    got_losses, got_grads = losses_and_grads(model, params, packed)
    assert np.all(np.asarray(want_losses) > 0)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5, atol=1e-6)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads),
                                 jax.tree.leaves(got_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_no_token_attends_across_segments():
    """Changing one example's tokens leaves every other example in its row unchanged."""
    model, params = build("bert_lora")
    batch = unpacked(MIXED, seed=4)
    packed = packing.pack_batch(batch, row_length=4 * LENGTH, row_multiple=1)
    features = jax.jit(lambda p, b: model.features(p, b, homogeneous=False).hidden)
    before = np.asarray(features(params, packed))
    target = 0
    row = packed["packed_index"][target, 0] // (4 * LENGTH)
    neighbours = [e for e in range(16) if e != target
                  and packed["packed_index"][e, 0] // (4 * LENGTH) == row]
    assert neighbours, "the test needs a row holding several examples"
    changed = dict(packed)
    ids = changed["packed_input_ids"].copy().reshape(-1)
    n = int(batch["attention_mask"][target].sum())
    ids[packed["packed_index"][target, :n]] = (ids[packed["packed_index"][target, :n]] % 40) + 5
    changed["packed_input_ids"] = ids.reshape(packed["packed_input_ids"].shape)
    after = np.asarray(features(params, changed))
    assert np.abs(after[target] - before[target]).max() > 1e-3
    for e in neighbours:
        m = batch["attention_mask"][e] > 0
        np.testing.assert_array_equal(after[e][m], before[e][m])


def test_mixed_rows_route_each_segment_to_its_task():
    """A row's segments of different tasks each get their own task's LoRA: swapping one
    example's task id changes that example's hidden states only."""
    model, params = build("bert_lora")
    batch = unpacked(MIXED, seed=5)
    packed = packing.pack_batch(batch, row_length=4 * LENGTH, row_multiple=1)
    rows_tasks = [set(packed["packed_task_ids"][r][packed["packed_segment_ids"][r] > 0])
                  for r in range(packed["packed_input_ids"].shape[0])]
    assert any(len(t) > 1 for t in rows_tasks), "the test needs a mixed-task row"
    features = jax.jit(lambda p, b: model.features(p, b, homogeneous=False).hidden)
    before = np.asarray(features(params, packed))
    swapped = dict(packed)
    tasks = packed["packed_task_ids"].copy().reshape(-1)
    n = int(batch["attention_mask"][0].sum())
    tasks[packed["packed_index"][0, :n]] = (batch["task_id"][0] + 1) % 4
    swapped["packed_task_ids"] = tasks.reshape(packed["packed_task_ids"].shape)
    after = np.asarray(features(params, swapped))
    assert np.abs(after[0] - before[0]).max() > 1e-3
    np.testing.assert_array_equal(after[1:], before[1:])


def test_packed_mask_sees_own_segment_and_own_task_prefix_only():
    from mtl_jax.models import attention
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    tasks = jnp.array([[0, 0, 1, 1, 1, 0]])
    prefix = attention.Prefix(None, None, jnp.ones((1, 4), jnp.int32),
                              key_tasks=jnp.array([[0, 0, 1, 1]]), query_tasks=tasks)
    mask = np.asarray(attention.packed_mask(segments, prefix))[0, 0]
    want = np.array([[1, 1, 0, 0, 1, 1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 1, 1, 0, 0, 0, 0],
                     [0, 0, 1, 1, 0, 0, 1, 1, 1, 0],
                     [0, 0, 1, 1, 0, 0, 1, 1, 1, 0],
                     [0, 0, 1, 1, 0, 0, 1, 1, 1, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, want)


# --- the iterator, the logged padding, and a tiny run ------------------------------------------

def packed_iterator(**data):
    from configs.base import get_base_config
    from mtl_jax.data import batching
    from mtl_jax.data.iterator import TrainIterator
    from test_mixing_logging import fake_tasks

    config = get_base_config().data
    config.update(dict(batch_mode="mixed", buckets=(8, 16), packing=True, packing_row_multiple=2))
    config.update(data)
    tasks = fake_tasks([40, 30], [6, 14], seed=7)
    return TrainIterator(tasks, 8, 0, config, batching.batch_keys(["label"]))


def test_packed_iterator_resumes_with_the_same_batches():
    it = packed_iterator()
    assert it.packing == (16, 2)  # the bucket of the longest example; rows in pairs
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    again = packed_iterator()
    again.set_state(state)
    for a, b in zip(want, (next(again) for _ in range(4))):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert all(b["packed_input_ids"].shape[0] % 2 == 0 for b in want)


def test_packing_refuses_what_it_cannot_pack_in_one_line():
    from run_helpers import one_line_error

    assert "data.batch_mode=mixed" in one_line_error(packed_iterator, batch_mode="stacked")
    assert "raise it or set it to 0" in one_line_error(packed_iterator, packing_length=10)


def test_logged_padding_counts_the_packed_rows():
    from mtl_jax.training.metrics_window import HostWindow

    batch = packing.pack_batch(unpacked(MIXED[:8], seed=6), row_length=24, row_multiple=1)
    host = HostWindow()
    host.add(batch, lambda length: float(length))
    rows = batch["packed_segment_ids"].shape[0]
    tokens = batch["attention_mask"].sum()
    out = host.task_fractions([s.name for s in SPECS])
    assert out["train/padding_fraction"] == pytest.approx(1 - tokens / (rows * 24), rel=1e-12)
    assert not any(k.startswith("train/padding_fraction/") for k in out)  # rows mix tasks
    assert out["train/mixing/cls"] == pytest.approx(2 / 8)
    assert host.flops == rows * 24.0  # what runs: R rows of Lp tokens


def test_a_tiny_packed_run_trains_like_the_unpacked_one(tmp_path):
    """Without dropout, two steps of a packed mixed-task run give the unpacked run's losses."""
    from mtl_jax.training import loop, runner
    from mtl_jax.training.metrics_writer import read_metrics
    from run_helpers import tiny_config

    def losses(packed: bool):
        config = tiny_config(tmp_path / str(packed), ("sent", "ner"))
        config.model.dropout, config.heads.dropout = 0.0, 0.0
        config.train.num_steps, config.train.batch_size = 3, 32  # rows in multiples of 8
        config.data.update(dict(packing=packed, packing_row_multiple=2))
        run = runner.build_run(config)
        loop.train(run, str(tmp_path / str(packed) / "run"), evaluate_fn=lambda s, n: ({}, {}))
        return [e for e in read_metrics(str(tmp_path / str(packed) / "run" / "metrics.jsonl"))
                if "train/loss" in e]

    plain, packed = losses(False), losses(True)
    assert [e["step"] for e in packed] == [1, 2, 3]
    for a, b in zip(plain, packed):
        for key in ("train/loss/sent", "train/loss/ner"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    assert packed[0]["train/padding_fraction"] < plain[0]["train/padding_fraction"]


@pytest.mark.parametrize("setting,message", [
    (dict(data__batch_mode="stacked"), "data.packing packs homogeneous and mixed batches"),
    (dict(parallel__mode="pmap"), "data.packing runs with parallel.mode=jit"),
    (dict(data__packing_row_multiple=0), "data.packing_row_multiple=0 must be at least 1"),
    (dict(copa=True), "cannot pack the choices of multiple-choice task copa"),
])
def test_configs_packing_cannot_run_are_refused_before_training(setting, message, tmp_path):
    from mtl_jax.tasks.definitions import task_definition
    from mtl_jax.training import validate
    from run_helpers import one_line_error, tiny_config

    config = tiny_config(tmp_path, ("sent",))
    config.data.packing = True
    setting = dict(setting)
    if setting.pop("copa", False):
        config.tasks.copa = task_definition(
            type="multiple_choice", text_fields=("premise", "choice1", "choice2"),
            choice_fields=("choice1", "choice2"), label_names=("choice1", "choice2"),
            data=dict(train=str(tmp_path / "copa.jsonl")))
    for key, value in setting.items():
        section, field = key.split("__")
        config[section][field] = value
    assert message in one_line_error(validate.check_config, config)
