#!/usr/bin/env bash
# The GPU benchmark on a lent device machine, in one call (see bench/README.md, "On a lent GPU").
# Installs mtl_jax (no deps) and the carried wheels over the machine's jax/torch, checks every
# import first (one line naming what is missing), runs the GPU preset and copies the new result
# rows to $OUT, then the real-data benchmark (bench/real_data.py on .data/shared_data, random
# MiniLM-shaped encoder) and its rows. Usage: bash bench/device_run.sh [extra train_step.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/bench_out}"
mkdir -p "$out"
pip install --quiet --no-deps .whl/*.whl
pip install --quiet --no-deps -e .
python - <<'PY'
import importlib
missing = []
for mod in ("jax", "flax", "optax", "orbax.checkpoint", "chex", "ml_collections", "transformers",
            "tokenizers", "torch", "numpy"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - report every missing module at once
        missing.append(f"{mod} ({type(e).__name__}: {e})")
if missing:
    raise SystemExit("error: missing on this machine: " + "; ".join(missing)
                     + " -- add their wheels to .whl/ (bench/device_bundle.sh)")
import jax, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device for torch"
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__, gpu)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
before=$(wc -l < bench/results/train_step.jsonl 2>/dev/null || echo 0)
python bench/train_step.py --preset=gpu --model_dir=.data/minilm "$@" 2>&1 | tee "$out/train_step.log"
tail -n +"$((before + 1))" bench/results/train_step.jsonl > "$out/train_step_new.jsonl"
before=$(wc -l < bench/results/real_data.jsonl 2>/dev/null || echo 0)
python bench/real_data.py --data_dir=.data/shared_data --model_dir=.data/minilm --random_init \
  --note="lent GPU" 2>&1 | tee "$out/real_data.log"
tail -n +"$((before + 1))" bench/results/real_data.jsonl > "$out/real_data_new.jsonl"
