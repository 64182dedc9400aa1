"""bench/train_step.py: both sides train the same model, rows carry what the issue asks,
ratios add up.

A tiny BERT shape (the vocabulary stays MiniLM's: the benchmark takes it from the tokenizer); the
figures themselves are benchmarks, never asserted here.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
train_step = pytest.importorskip("train_step")
torch_baseline = pytest.importorskip("torch_baseline")

TINY = dict(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
ROW_KEYS = {"device", "framework", "model", "batch", "seq", "dtype", "examples_s", "tokens_s",
            "mfu", "date", "versions", "compile_s", "params", "non_embedding_params"}


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(train_step.SHAPES, "tiny", TINY)
    monkeypatch.setitem(train_step.PRESETS, "tiny",
                        ("tiny", [(4, 16)], "float32", "xla", "cpu", ("eager",)))
    return "tiny"


def test_rows_have_the_fields_and_ratio(tiny_preset):
    rows = train_step.measure(tiny_preset, steps=2, warmup=1)
    torch_row, ours = rows
    assert [r["framework"] for r in rows] == ["torch_eager", "mtl_jax"]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert (r["batch"], r["seq"], r["dtype"], r["model"]) == (4, 16, "float32", "tiny")
        assert r["tokens_s"] == pytest.approx(r["examples_s"] * 16)
        assert r["mfu"] is None  # no known peak for a CPU
    assert ours["ratio_vs_torch_eager"] == pytest.approx(
        ours["examples_s"] / torch_row["examples_s"])
    assert ours["versions"]["jax_version"] and torch_row["versions"]["torch_version"]
    # Non-embedding parameters of a 2-layer BERT (hidden 32, MLP 64), heads and pooler, by hand.
    layer = 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 2 * 32
    assert ours["non_embedding_params"] == 2 * layer + (32 * 32 + 32) + (32 * 2 + 2) + (32 * 9 + 9)


def test_both_frameworks_build_the_same_parameter_count():
    _, state, _ = train_step.jax_setup(TINY, "float32", "xla")
    embeddings = (30522 + 512 + 2) * 32 + 2 * 32
    expected = embeddings + 2 * (4 * (32 * 32 + 32) + 2 * 32 * 64 + 64 + 32 + 4 * 32) \
        + (32 * 32 + 32) + (32 * 2 + 2) + (32 * 9 + 9)
    assert train_step.param_count(state.params) == expected
    assert torch_baseline.param_count(TINY, 2, 9) == expected


def test_a_parameter_mismatch_stops_the_benchmark(tiny_preset, monkeypatch):
    monkeypatch.setattr(torch_baseline, "param_count", lambda *a: 1)
    with pytest.raises(SystemExit, match="different models"):
        train_step.measure(tiny_preset, steps=1, warmup=1)


def test_model_dir_supplies_the_vocabulary(minilm_path, tmp_path):
    """What bench/device_bundle.sh carries to a GPU machine: tokenizer + config, no weights."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_path / name, tmp_path / name)
    model, _, _ = train_step.jax_setup(TINY, "float32", "xla", model_dir=str(tmp_path))
    assert model.encoder_config.vocab_size == 30522


def test_table_shows_each_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    common = dict(date="2026-11-30T01:23:00", device="cpu", model="tiny", batch=4, seq=16,
                  dtype="float32", mfu=None, compile_s=1.0)
    path.write_text("\n".join(json.dumps(r) for r in [
        dict(common, framework="torch_eager", examples_s=10.0, tokens_s=160.0),
        dict(common, framework="mtl_jax", examples_s=5.0, tokens_s=80.0,
             ratio_vs_torch_eager=0.5)]))
    lines = train_step.table(path).splitlines()
    assert len(lines) == 4
    assert lines[3].startswith(
        "| 2026-11-30T01:23 | cpu | mtl_jax | tiny | 4 | 16 | float32 | 5.0 | 80 |")
    assert lines[3].endswith("| 0.50 | - |")


def test_device_run_installs_then_runs_the_gpu_preset(tmp_path):
    """bench/device_run.sh up to the benchmark, here: pip (faked) installs the carried wheels and
    mtl_jax without deps, the import check passes, and the GPU preset refuses a CPU in one line."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "pip").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/pip.log\n')
    (fake_bin / "pip").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_run.sh"), "--steps=1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 1
    pip_calls = (tmp_path / "pip.log").read_text().splitlines()
    assert pip_calls[0].startswith("install --quiet --no-deps .whl/")
    assert pip_calls[1] == "install --quiet --no-deps -e ."
    assert "error: --preset=gpu needs a GPU (jax sees only cpu); use --preset=cpu" in \
        (tmp_path / "out" / "train_step.log").read_text()

