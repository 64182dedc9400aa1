"""bench/real_data.py: the PyTorch side's batches are exactly what Hugging Face's collators give,
and the three frameworks train on the same examples with the row fields the issue names.

A tiny run of tests/run_helpers (random 2-layer BERT on both sides, MiniLM's vocabulary); the
throughput figures themselves are benchmarks, never asserted here.
"""
import sys
import types

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
real_data = pytest.importorskip("real_data")
torch = pytest.importorskip("torch")
ROW_KEYS = {"date", "device", "framework", "examples_s", "nonpad_tokens_s", "padding_fraction",
            "versions", "steps", "batch", "tasks", "examples"}


def tiny(tmp_path, packing: bool = False):
    from run_helpers import tiny_config

    config = tiny_config(tmp_path, ("sent", "ner"))
    config.data.batch_mode = "homogeneous"  # the PyTorch side trains one task per batch
    config.data.update(dict(packing=packing, packing_row_multiple=1))
    # Rows are split over data x fsdp: on one data shard a batch's 8 short examples fill 2 rows.
    config.parallel.mesh.update(dict(data=1, fsdp=1, tensor=-1))
    return config


def first_batches(tmp_path, count: int = 4):
    batches, specs = real_data.host_batches(tiny(tmp_path), count)
    return batches, specs, real_data.build(tiny(tmp_path))[0].tokenizer


def test_dynamic_padding_is_what_the_hf_collators_give(tmp_path):
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    batches, specs, tokenizer = first_batches(tmp_path)
    batches[0]["weight"][-1] = 0.0  # a padding row of the batch: the collator never sees it
    seen = set()
    for batch in batches:
        real = batch["weight"] > 0
        spec = specs[int(batch["task_id"][real][0])]
        seen.add(spec.type)
        lengths = batch["attention_mask"][real].sum(1)
        features = [dict(input_ids=ids[:n].tolist(), token_type_ids=types_[:n].tolist(),
                         attention_mask=mask[:n].tolist())
                    for ids, types_, mask, n in zip(batch["input_ids"][real],
                                                    batch["token_type_ids"][real],
                                                    batch["attention_mask"][real], lengths)]
        if spec.type == "token_classification":
            for f, tags, n in zip(features, batch["tag_ids"][real], lengths):
                f["labels"] = tags[:n].tolist()
            expected = DataCollatorForTokenClassification(tokenizer, return_tensors="pt")(features)
        else:
            for f, label in zip(features, batch["label"][real]):
                f["labels"] = int(label)
            expected = DataCollatorWithPadding(tokenizer, return_tensors="pt")(features)
        got = real_data.dynamic_padding(batch, spec, "cpu")
        assert set(got) == set(expected)
        for key in got:
            np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy(), err_msg=key)
    assert seen == {"sequence_classification", "token_classification"}


def test_all_frameworks_train_on_the_same_examples(tmp_path):
    args = types.SimpleNamespace(steps=3, random_init=True, note="test", overrides={})
    rows = real_data.measure(args, make=lambda packing: tiny(tmp_path / str(packing), packing))
    assert [r["framework"] for r in rows] == list(real_data.FRAMEWORKS)
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert np.isfinite(r["loss"])
    torch_row, buckets, packed = rows
    assert torch_row["examples"] == buckets["examples"] == packed["examples"] == 3 * 8
    # Same examples, so the same non-pad tokens per example; only the padding differs.
    per_example = [r["nonpad_tokens_s"] / r["examples_s"] for r in rows]
    assert per_example == pytest.approx([per_example[0]] * 3, rel=1e-9)
    assert torch_row["padding_fraction"] < buckets["padding_fraction"]  # 32-token bucket
    assert packed["padding_fraction"] < buckets["padding_fraction"]
    for r in (buckets, packed):
        assert r["ratio_vs_torch"] == pytest.approx(r["examples_s"] / torch_row["examples_s"])


def test_config_flags_reach_mtl_jax_only_and_others_are_refused(shared_data):
    import argparse

    parser = argparse.ArgumentParser()
    assert real_data.config_overrides(parser, ["--config.model.attention_impl=bnth"]) == {
        "model.attention_impl": "bnth"}
    with pytest.raises(SystemExit):
        real_data.config_overrides(parser, ["--stepz=3"])
    config = real_data.protocol_config("", "", True, True, {"data.packing_row_multiple": "4"})
    assert (config.data.packing, config.data.packing_row_multiple) == (True, 4)
