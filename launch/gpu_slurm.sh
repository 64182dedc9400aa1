#!/usr/bin/env bash
# Train mtl_jax on GPUs with Slurm: one JAX process per GPU (default) or per node.
#
# One script, three stages (chosen by _MTL_JAX_STAGE, which the script sets for itself):
#   submit (outside Slurm)  sbatch this script with the requested nodes/GPUs
#   batch  (the job)        pick the coordinator (first node of the job) and srun the tasks
#   task   (each process)   export JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
#                           (read by mtl_jax.training.distributed) and exec mtl_jax.main
# Inside an existing allocation (salloc), the submit stage is skipped.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/gpu_slurm.sh CONFIG WORKDIR [--config.KEY=VALUE ...] [other mtl_jax.main flags]

  CONFIG    config file (e.g. configs/base.py)
  WORKDIR   run directory on a filesystem every node shares (checkpoints, metrics, slurm logs)

environment:
  NODES=1  GPUS_PER_NODE=8  PROCESS_PER=gpu|node (default gpu)
  PARTITION, ACCOUNT, TIME (default 24:00:00), JOB_NAME (default mtl_jax)
  PORT      coordinator port (default 12355)
  PYTHON    interpreter on the nodes (default python3)
  SBATCH_EXTRA  extra sbatch arguments, space-separated
EOF
  exit 2
}

[[ $# -ge 2 ]] || usage
CONFIG=$1
WORKDIR=$2
shift 2
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PROCESS_PER=${PROCESS_PER:-gpu}
PORT=${PORT:-12355}
PYTHON=${PYTHON:-python3}
case "$PROCESS_PER" in
  gpu) TASKS_PER_NODE=$GPUS_PER_NODE ;;
  node) TASKS_PER_NODE=1 ;;
  *) echo "error: PROCESS_PER must be gpu or node, got $PROCESS_PER" >&2; exit 2 ;;
esac

stage=${_MTL_JAX_STAGE:-}
if [[ -z "$stage" ]]; then
  stage=submit
  [[ -n "${SLURM_JOB_ID:-}" ]] && stage="batch"  # already inside an allocation
fi

case "$stage" in
  submit)
    [[ -f "$CONFIG" ]] || { echo "error: config $CONFIG not found" >&2; exit 2; }
    if [[ "$WORKDIR" != *://* ]]; then
      mkdir -p "$WORKDIR"
      WORKDIR=$(cd "$WORKDIR" && pwd)  # the job may start elsewhere
    fi
    SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
    sbatch_args=(--job-name="${JOB_NAME:-mtl_jax}" --nodes="$NODES"
                 --ntasks-per-node="$TASKS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE"
                 --time="${TIME:-24:00:00}" --output="$WORKDIR/slurm-%j.out"
                 --signal=TERM@120  # SIGTERM 2 min before the time limit: save and exit
                 --export="ALL,_MTL_JAX_STAGE=batch,_MTL_JAX_SCRIPT=$SCRIPT")
    [[ -n "${PARTITION:-}" ]] && sbatch_args+=(--partition="$PARTITION")
    [[ -n "${ACCOUNT:-}" ]] && sbatch_args+=(--account="$ACCOUNT")
    if [[ -n "${SBATCH_EXTRA:-}" ]]; then
      read -r -a extra <<<"$SBATCH_EXTRA"
      sbatch_args+=("${extra[@]}")
    fi
    exec sbatch "${sbatch_args[@]}" "$SCRIPT" "$CONFIG" "$WORKDIR" "$@"
    ;;
  batch)
    # Read every name (`| head -1` would SIGPIPE scontrol and fail under pipefail).
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    export JAX_COORDINATOR_ADDRESS="${nodes[0]}:$PORT"
    echo "coordinator $JAX_COORDINATOR_ADDRESS, ${SLURM_NTASKS:-?} processes" >&2
    # sbatch runs a spool copy of this script that other nodes lack: srun the original.
    exec srun --kill-on-bad-exit=1 --export="ALL,_MTL_JAX_STAGE=task" \
      "${_MTL_JAX_SCRIPT:-$0}" "$CONFIG" "$WORKDIR" "$@"
    ;;
  task)
    export JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS:?set by the batch stage}
    export JAX_NUM_PROCESSES=$SLURM_NTASKS
    export JAX_PROCESS_ID=$SLURM_PROCID
    if [[ "$PROCESS_PER" == gpu ]]; then
      export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID  # this process drives one GPU
    fi
    exec "$PYTHON" -m mtl_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
    ;;
  *)
    echo "error: unknown _MTL_JAX_STAGE=$stage" >&2
    exit 2
    ;;
esac
