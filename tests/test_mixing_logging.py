"""Per-task padding fraction and realised mixing (``train/padding_fraction[/<task>]``,
``train/mixing/<task>``, ``train/mixing_target/<task>``): HostWindow's vectorised counts against a
row-by-row NumPy reference on batches of every layout, the realised mixing of the train iterator
against the sampler's proportions within the binomial spread, and a tiny run that logs them at
every log step with the values recomputed from the iterator's own batches."""
import collections
import types

import numpy as np
import pytest

from configs.base import get_base_config
from mtl_jax.data import batching
from mtl_jax.data.features import Features
from mtl_jax.data.iterator import TrainIterator
from mtl_jax.training import loop, runner
from mtl_jax.training.metrics_window import HostWindow
from mtl_jax.training.metrics_writer import read_metrics
from run_helpers import cache_dir_for, persistent_compile_cache, tiny_config

NAMES = ["short", "long", "third"]
BUCKETS = (8, 16)
KEYS = batching.batch_keys(["label"])


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(cache_dir_for(tmp_path_factory)):
        yield


def fake_tasks(sizes, max_lengths, seed=0):
    """Task t: ``sizes[t]`` features of random lengths 1..max_lengths[t]."""
    rng = np.random.default_rng(seed)
    tasks = []
    for t, (n, longest) in enumerate(zip(sizes, max_lengths)):
        lengths = rng.integers(1, longest + 1, n).astype(np.int32)
        ids = rng.integers(1, 100, lengths.sum()).astype(np.int32)
        arrays = dict(lengths=lengths, input_ids=ids, token_type_ids=np.zeros_like(ids),
                      label=np.zeros(n, np.int32))
        tasks.append(types.SimpleNamespace(name=NAMES[t], index=t, features=Features(arrays)))
    return tasks


def reference(batches, names):
    """Row by row: (rows, token slots, pad slots) per task over the real rows."""
    rows, slots, pads = (collections.Counter() for _ in range(3))
    for batch in batches:
        ids, weights = batch["task_id"].ravel(), batch["weight"].ravel()
        masks = batch["attention_mask"].reshape(ids.size, -1)
        for task, weight, mask in zip(ids, weights, masks):
            if weight > 0:
                rows[task] += 1
                slots[task] += mask.size
                pads[task] += mask.size - int(mask.sum())
    total = sum(rows.values())
    out = {"train/padding_fraction": sum(pads.values()) / sum(slots.values())}
    for t, name in enumerate(names):
        out[f"train/mixing/{name}"] = rows[t] / total
        if rows[t]:
            out[f"train/padding_fraction/{name}"] = pads[t] / slots[t]
    return out


def counted(batches, names):
    host = HostWindow()
    for batch in batches:
        host.add(batch, lambda length: 1.0)
    return host.task_fractions(names)


def assert_close(got, want):
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_two_rows_by_hand():
    ids = np.arange(1, 9, dtype=np.int32)
    task = types.SimpleNamespace(name="short", index=0, features=Features(dict(
        lengths=np.array([3, 5], np.int32), input_ids=ids, token_type_ids=0 * ids,
        label=np.zeros(2, np.int32))))
    # 3 + 5 real tokens in 2 x 8 slots
    batch = batching.make_batch([(task, 0), (task, 1)], 2, BUCKETS, KEYS)
    out = counted([batch], NAMES[:1])
    assert out == {"train/padding_fraction": 0.5, "train/mixing/short": 1.0,
                   "train/padding_fraction/short": 0.5}


def test_mixed_batches_match_a_row_by_row_count():
    tasks = fake_tasks([20, 20, 20], [4, 15, 9])
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(6):
        choice = rng.choice(2, 8, p=[0.7, 0.3])  # the third task never appears
        rows = [(tasks[t], int(rng.integers(20))) for t in choice[:int(rng.integers(5, 9))]]
        batches.append(batching.make_batch(rows, 8, BUCKETS, KEYS))  # short: weight-0 rows
    assert any((b["weight"] == 0).any() for b in batches)
    assert len({b["input_ids"].shape[-1] for b in batches}) == 2  # both buckets
    out = counted(batches, NAMES)
    assert out["train/mixing/third"] == 0.0 and "train/padding_fraction/third" not in out
    assert_close(out, reference(batches, NAMES))


def test_stacked_episode_and_choice_layouts_match_a_row_by_row_count():
    tasks = fake_tasks([12, 12, 12], [3, 14, 7], seed=2)
    stacked = batching.make_stacked_batch([[(t, i) for i in range(4)] for t in tasks], 4,
                                          BUCKETS, KEYS)
    episode = batching.make_episode_batch([[(tasks[k], i) for i in range(6)] for k in (2, 0)],
                                          3, 2, BUCKETS, KEYS)
    assert stacked["task_id"].shape == (3, 4) and episode["task_id"].shape == (2, 3, 2)
    choice = batching.make_batch([(tasks[1], i) for i in range(3)], 4, BUCKETS, KEYS)
    choice = dict(choice, attention_mask=np.stack([choice["attention_mask"]] * 2, 1))
    choice["attention_mask"][1, 1, 3:] = 0  # [B, C, L]: a shorter second choice
    batches = [stacked, episode, choice]
    assert_close(counted(batches, NAMES), reference(batches, NAMES))


def test_held_out_rows_are_not_counted():
    tasks = fake_tasks([8, 8], [5, 12], seed=3)
    batch = batching.make_batch([(tasks[0], i) for i in range(4)], 4, BUCKETS, KEYS)
    held = batching.make_batch([(tasks[1], i) for i in range(4)], 4, BUCKETS, KEYS)
    with_held = dict(batch, **{f"meta/{k}": v for k, v in held.items()})
    assert counted([with_held], NAMES[:2]) == counted([batch], NAMES[:2])


def realised(mode, sampler, steps, sizes=(300, 100), batch=8):
    data = get_base_config().data
    data.batch_mode, data.sampler, data.buckets = mode, sampler, BUCKETS
    it = TrainIterator(fake_tasks(list(sizes), [6, 12]), batch, 0, data, KEYS)
    out = counted([next(it) for _ in range(steps)], NAMES[:2])
    return [out[f"train/mixing/{n}"] for n in NAMES[:2]], list(it.mixing_target.values())


@pytest.mark.parametrize("mode,steps", [("mixed", 250), ("homogeneous", 1000)])
def test_realised_mixing_approaches_the_proportional_rates(mode, steps):
    got, target = realised(mode, "proportional", steps)
    np.testing.assert_allclose(target, [0.75, 0.25], rtol=1e-12)  # sizes 3:1
    draws = steps * (8 if mode == "mixed" else 1)  # i.i.d. task draws: examples or batches
    spread = np.sqrt(0.75 * 0.25 / draws)
    np.testing.assert_allclose(got, target, atol=4 * spread)


def test_stacked_batches_mix_evenly_whatever_the_sampler():
    got, target = realised("stacked", "proportional", 3)
    assert got == [0.5, 0.5] and target == [0.5, 0.5]


def test_a_tiny_run_logs_the_fractions_of_its_own_batches(tmp_path, compile_cache):
    config = tiny_config(tmp_path, ("sent", "ner"))
    config.train.log_every = 2  # windows of two steps: steps 1-2 and 3-4
    run = runner.build_run(config)
    no_eval = lambda state, step: ({}, {})  # noqa: E731  (no eval step to compile)
    loop.train(run, str(tmp_path / "run"), evaluate_fn=no_eval)
    events = [e for e in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
              if "train/loss" in e]
    assert [e["step"] for e in events] == [2, 4]
    # The loop's iterator replayed from the start: the same batches the steps were fed.
    it = run.data.train_iterator(config.train.batch_size, config.data.shuffle_seed)
    batches = [next(it) for _ in range(4)]
    names = [s.name for s in run.model.specs]  # in task id order
    sizes = {n: len(run.data.split(n, "train").features) for n in names}
    for event, window in zip(events, (batches[:2], batches[2:])):
        logged = {k: v for k, v in event.items()
                  if k.startswith(("train/padding_fraction", "train/mixing/"))}
        assert_close(logged, reference(window, names))
        for name, size in sizes.items():
            assert event[f"train/mixing_target/{name}"] == pytest.approx(
                size / sum(sizes.values()), rel=1e-12)
