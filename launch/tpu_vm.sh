#!/usr/bin/env bash
# Train mtl_jax on a Cloud TPU VM (one host or a multi-host slice).
#
# Creates the TPU VM unless it exists, copies this checkout to every worker, installs it, and
# runs `python3 -m mtl_jax.main` on all workers at once (--worker=all). On TPU,
# jax.distributed.initialize() finds the coordinator and process ids by itself.
#
# Exit codes of mtl_jax.main: 0 finished, 2 user error, 3 non-finite loss, 4 failed checkpoint
# save, 75 (EX_TEMPFAIL) stopped by a signal after saving a checkpoint. On 75 the run is started again (it resumes from
# the checkpoint), at most MAX_RESTARTS times; the script exits with the last run's code.
set -euo pipefail

RESUME_EXIT_CODE=75  # mtl_jax.main: stopped after a checkpoint, run again to resume

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_vm.sh CONFIG WORKDIR [--config.KEY=VALUE ...] [other mtl_jax.main flags]

  CONFIG    config file, relative to the repository root (e.g. configs/bert_multitask.py)
  WORKDIR   run directory; on a multi-host slice a gs://bucket/path every worker can write

environment:
  TPU_NAME          TPU VM name (required)
  ZONE              e.g. us-central2-b (required)
  ACCELERATOR_TYPE  default v4-8 (v5litepod-8, v5p-16, ...)
  RUNTIME_VERSION   default tpu-ubuntu2204-base
  PROJECT           default: gcloud's configured project
  SPOT=1            create a spot (preemptible) VM; preemption saves a checkpoint, rerun resumes
  SKIP_INSTALL=1    do not copy and install the code (it is already there)
  REMOTE_DIR        checkout location on the workers, default mtl_jax (in the home dir)
  MAX_RESTARTS      reruns after a run stopped with a checkpoint (exit 75), default 100
  RESTART_SLEEP     seconds to wait before such a rerun, default 10
EOF
  exit 2
}

[[ $# -ge 2 ]] || usage
[[ -n "${TPU_NAME:-}" && -n "${ZONE:-}" ]] || { echo "error: set TPU_NAME and ZONE" >&2; usage; }

CONFIG=$1
WORKDIR=$2
shift 2
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-mtl_jax}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

[[ -f "$REPO_ROOT/$CONFIG" ]] || { echo "error: config $CONFIG not found under $REPO_ROOT" >&2; exit 2; }

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

if "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  echo "reusing TPU VM $TPU_NAME" >&2
else
  echo "creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE)" >&2
  create=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ "${SPOT:-0}" == 1 ]] && create+=(--spot)
  "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" "${create[@]}"
fi

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  archive=$(mktemp -t mtl_jax_src.XXXXXX.tar.gz)
  trap 'rm -f "$archive"' EXIT
  tar -C "$REPO_ROOT" --exclude=.git --exclude='__pycache__' --exclude='*.egg-info' \
      -czf "$archive" .
  "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:mtl_jax_src.tar.gz" "${where[@]}" --worker=all
  install="rm -rf $(printf '%q' "$REMOTE_DIR") && mkdir -p $(printf '%q' "$REMOTE_DIR")"
  install+=" && tar -xzf mtl_jax_src.tar.gz -C $(printf '%q' "$REMOTE_DIR")"
  install+=" && python3 -m pip install -q -U 'jax[tpu]==0.10.2'"
  install+=" && python3 -m pip install -q -e $(printf '%q' "$REMOTE_DIR")"
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$install"
fi

run="cd $(printf '%q' "$REMOTE_DIR") && python3 -m mtl_jax.main"
run+=" $(printf '%q' "--config=$CONFIG") $(printf '%q' "--workdir=$WORKDIR")"
for arg in "$@"; do
  run+=" $(printf '%q' "$arg")"
done
# A run stopped by a signal (e.g. a maintenance event) exits 75 after its checkpoint: rerun it
# on the same VM, which resumes. `ssh --worker=all` waits for every worker and exits with the
# first non-zero worker code (recent gcloud; early tpu-vm releases exited 0 for several workers).
max_restarts=${MAX_RESTARTS:-100}
for ((restarts = 0; ; restarts++)); do
  echo "running on all workers: $run" >&2
  code=0
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$run" || code=$?
  [[ $code -eq $RESUME_EXIT_CODE && $restarts -lt $max_restarts ]] || break
  echo "stopped after a checkpoint (exit $code): restart $((restarts + 1)) of at most" \
       "$max_restarts in ${RESTART_SLEEP:-10}s" >&2
  sleep "${RESTART_SLEEP:-10}"
done
if [[ $code -eq $RESUME_EXIT_CODE ]]; then
  echo "stopped after a checkpoint; MAX_RESTARTS=$max_restarts reruns done: run the same" \
       "command again to resume" >&2
fi
exit "$code"
