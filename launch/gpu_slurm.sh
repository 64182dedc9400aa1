#!/usr/bin/env bash
# Train mtl_jax on GPUs with Slurm: one JAX process per GPU (default) or per node.
#
# One script, three stages (chosen by _MTL_JAX_STAGE, which the script sets for itself):
#   submit (outside Slurm)  sbatch this script with the requested nodes/GPUs
#   batch  (the job)        pick the coordinator (first node of the job) and srun the tasks
#   task   (each process)   export JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
#                           (read by mtl_jax.training.distributed) and exec mtl_jax.main
# Inside an existing allocation (salloc), the submit stage is skipped.
#
# Exit codes of mtl_jax.main: 0 finished, 2 user error, 3 non-finite loss, 4 failed checkpoint
# save, 75 (EX_TEMPFAIL) stopped by a signal after saving a checkpoint. On 75 the batch stage requeues the job
# (`scontrol requeue`; the job is submitted with --requeue), which resumes from the checkpoint;
# every other code is the job's exit code.
set -euo pipefail

RESUME_EXIT_CODE=75  # mtl_jax.main: stopped after a checkpoint, run again to resume

usage() {
  cat >&2 <<'EOF'
usage: launch/gpu_slurm.sh CONFIG WORKDIR [--config.KEY=VALUE ...] [other mtl_jax.main flags]

  CONFIG    config file (e.g. configs/bert_multitask.py)
  WORKDIR   run directory on a filesystem every node shares (checkpoints, metrics, slurm logs)

environment:
  NODES=1  GPUS_PER_NODE=8  PROCESS_PER=gpu|node (default gpu)
  PARTITION, ACCOUNT, TIME (default 24:00:00), JOB_NAME (default mtl_jax)
  PORT      coordinator port (default 12355)
  PYTHON    interpreter on the nodes (default python3)
  SBATCH_EXTRA  extra sbatch arguments, space-separated
  MAX_RESTARTS  requeues after a run stopped with a checkpoint (exit 75), default 100
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

# The run stopped after a checkpoint: put this job back in the queue (same id, same script and
# arguments, SLURM_RESTART_COUNT + 1), at most MAX_RESTARTS times.
# Where a task says "stopped after a checkpoint" to the batch stage: WORKDIR is on a filesystem all
# nodes share (the checkpoints are written there too).
stopped_marker() {
  echo "$WORKDIR/.mtl_jax_stopped.${SLURM_JOB_ID:-local}"
}

requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_RESTARTS:-100}
  if [[ $restarts -ge $max ]]; then
    echo "stopped after a checkpoint; MAX_RESTARTS=$max requeues done, not requeueing:" \
         "submit the same command again to resume" >&2
    return 0
  fi
  echo "stopped after a checkpoint: requeueing job $SLURM_JOB_ID (restart $((restarts + 1))" \
       "of at most $max)" >&2
  scontrol requeue "$SLURM_JOB_ID" ||
    echo "error: scontrol requeue failed; submit the same command again to resume" >&2
}

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
                 --requeue --open-mode=append  # exit 75 requeues; keep the earlier runs' log
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
    code=0
    rm -f "$(stopped_marker)"
    srun --kill-on-bad-exit=1 --export="ALL,_MTL_JAX_STAGE=task" \
      "${_MTL_JAX_SCRIPT:-$0}" "$CONFIG" "$WORKDIR" "$@" || code=$?
    if [[ -e "$(stopped_marker)" ]]; then  # a task stopped after the checkpoint (see task)
      rm -f "$(stopped_marker)"
      [[ $code -eq 0 ]] && code=$RESUME_EXIT_CODE
    fi
    if [[ $code -eq $RESUME_EXIT_CODE ]]; then
      if [[ "${_MTL_JAX_STAGE:-}" == batch ]]; then  # our sbatch job (salloc cannot requeue)
        requeue
      else
        echo "stopped after a checkpoint: run the same command again to resume" >&2
      fi
    fi
    exit "$code"  # the job's exit code is the run's, requeued or not
    ;;
  task)
    export JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS:?set by the batch stage}
    export JAX_NUM_PROCESSES=$SLURM_NTASKS
    export JAX_PROCESS_ID=$SLURM_PROCID
    if [[ "$PROCESS_PER" == gpu ]]; then
      export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID  # this process drives one GPU
    fi
    # Exit 75 is reported through a marker and exit 0: a task that exits 75 first would make
    # srun (--kill-on-bad-exit) kill the others, and srun would then report their signal.
    code=0
    "$PYTHON" -m mtl_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" || code=$?
    if [[ $code -eq $RESUME_EXIT_CODE ]]; then
      touch "$(stopped_marker)"
      exit 0
    fi
    exit "$code"
    ;;
  *)
    echo "error: unknown _MTL_JAX_STAGE=$stage" >&2
    exit 2
    ;;
esac
