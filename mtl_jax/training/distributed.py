"""Multi-host start-up: jax.distributed.initialize() only when the environment asks for it."""
from __future__ import annotations

import os

import jax
from absl import logging

# Any of these means several processes will form one JAX job.
_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _multi_process_env() -> str | None:
    """The launcher that asks for a multi-process job, or None for a single process."""
    env = os.environ
    if any(env.get(v) for v in _COORDINATOR_VARS):
        return "coordinator"
    if env.get("SLURM_JOB_ID") and _int_env("SLURM_NTASKS", 1) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if _int_env("OMPI_COMM_WORLD_SIZE", 1) > 1:
        return "mpi"
    return None


def maybe_initialize_distributed() -> bool:
    """Calls jax.distributed.initialize() under a multi-process launcher; True if it did.

    With JAX_COORDINATOR_ADDRESS the process count and id come from JAX_NUM_PROCESSES and
    JAX_PROCESS_ID; Slurm, TPU pods and Open MPI are auto-detected by JAX itself.
    """
    launcher = _multi_process_env()
    if launcher is None:
        return False
    kwargs = {}
    if launcher == "coordinator":
        env = os.environ
        kwargs["coordinator_address"] = (env.get("JAX_COORDINATOR_ADDRESS")
                                         or env.get("COORDINATOR_ADDRESS"))
        if "JAX_NUM_PROCESSES" in env:
            kwargs["num_processes"] = _int_env("JAX_NUM_PROCESSES", 1)
        if "JAX_PROCESS_ID" in env:
            kwargs["process_id"] = _int_env("JAX_PROCESS_ID", 0)
    logging.info("jax.distributed.initialize (%s) %s", launcher, kwargs)
    jax.distributed.initialize(**kwargs)
    return True
