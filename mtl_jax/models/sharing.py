"""Sharing strategies (``config.sharing.mode``): how the tasks share the encoder.

Each strategy is one ``SharingStrategy`` entry in ``STRATEGIES``; ``MultiTaskModel`` only calls
the entry's functions and never looks at the mode's name. An entry is a frozen dataclass of pure
functions (no state, no Python side effects, safe under jit/vmap/eval_shape):

  init_encoder(rng, encoder_params, num_tasks) -> params["encoder"]
      From ONE encoder's parameters (pretrained or random) to what the model stores. ``rng`` is
      for parameters the strategy adds itself (hard and soft ignore it).
  encode(run_encoder, encoder_params, batch, homogeneous) -> (hidden [B, L, H], pooled [B, H])
      ``run_encoder(one_encoder_params) -> (hidden, pooled)`` runs one encoder's parameters (same
      tree as the init's input) on the whole batch; ``homogeneous``: every real example of the
      batch belongs to one task (data.batch_mode homogeneous or stacked).
  penalty(encoder_params, sharing_config) -> float32 scalar
      Added to the loss by the train step (``aux["soft_penalty"]``), lambda already applied.
  one_encoder(stored_encoder, choice, task_names) -> (one encoder's params, description)
      The inverse view of ``init_encoder``, on host arrays (``checkpoints/init_from.py`` reads a
      source run's encoder through its strategy): ONE encoder's tree from what the model stored;
      ``choice`` (``model.init_from_encoder``) is "mean" or the name of the task whose encoder
      to take where the strategy stores several, ``task_names`` the stored tasks in index order.
  encoder_spec(path, spec) -> PartitionSpec                         (default: ``spec`` as is)
      Logical axis names of the stored leaf at ``path`` (key path inside params["encoder"])
      given ``spec``, the one-encoder leaf's names at that path (PartitionSpec() if none).
  param_labels(params) -> labels tree                     (default: ``summary.param_labels``)
      Only for strategies whose parameters need other optimizer labels.
  check_config(config) -> None                                        (default: no checks)
      Raises ``UserError`` (one line naming the fix) for settings the strategy cannot run.

Entries:
  hard  one encoder for every task: stored as is, no penalty.
  soft  one encoder per task stacked on a leading task axis [T, ...], tied by an L2 penalty
        (the math and the cost of each batch mode: ``soft_sharing.py``); the task axis is
        replicated (None); refuses PEFT (each task already trains its own full encoder).

A new structure (hierarchical sharing, task attention, factorised encoders, hypernetwork
adapters, ...) is one more entry here, with its math in its own module as soft_sharing.py is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from mtl_jax.errors import UserError
from mtl_jax.models import soft_sharing
from mtl_jax.models import summary as summary_lib
from mtl_jax.registry import Registry

EncoderOutputs = tuple[jax.Array, jax.Array]  # hidden [B, L, H], pooled [B, H]
RunEncoder = Callable[[Any], EncoderOutputs]


def _spec_as_is(path, spec: PartitionSpec) -> PartitionSpec:
    del path
    return spec


def _no_checks(config) -> None:
    del config


@dataclasses.dataclass(frozen=True)
class SharingStrategy:
    """One ``sharing.mode``; the fields are described in the module docstring."""

    init_encoder: Callable[[Any, Any, int], Any]
    encode: Callable[[RunEncoder, Any, Mapping[str, Any], bool], EncoderOutputs]
    penalty: Callable[[Any, Any], jax.Array]
    one_encoder: Callable[[Any, str, Sequence[str]], tuple[Any, str]]
    encoder_spec: Callable[[tuple, PartitionSpec], PartitionSpec] = _spec_as_is
    param_labels: Callable[[Any], Any] = summary_lib.param_labels
    check_config: Callable[[Any], None] = _no_checks
    # The share of the stored encoder parameters one example runs through, given the number of
    # tasks (soft: one of T stacked encoders); the FLOPs count reads it.
    encoder_share: Callable[[int], float] = lambda num_tasks: 1.0


STRATEGIES: Registry[SharingStrategy] = Registry("sharing mode")


# --- hard: one encoder ---------------------------------------------------------------------------

def _hard_init(rng, encoder_params, num_tasks: int):
    del rng, num_tasks
    return encoder_params


def _hard_encode(run_encoder: RunEncoder, encoder_params, batch, homogeneous: bool):
    del batch, homogeneous
    return run_encoder(encoder_params)


def _no_penalty(encoder_params, sharing_config) -> jax.Array:
    del encoder_params, sharing_config
    return jnp.zeros((), jnp.float32)


def _hard_one(encoder_params, choice: str, task_names):
    del choice, task_names
    return encoder_params, "hard"


STRATEGIES.register("hard", SharingStrategy(init_encoder=_hard_init, encode=_hard_encode,
                                            penalty=_no_penalty, one_encoder=_hard_one))


# --- soft: one encoder per task, tied by an L2 penalty --------------------------------------------

def _soft_init(rng, encoder_params, num_tasks: int):
    del rng
    return soft_sharing.stack_copies(encoder_params, num_tasks)


def _soft_penalty(stack, sharing_config) -> jax.Array:
    return soft_sharing.soft_penalty(stack, sharing_config.soft_penalty,
                                     sharing_config.soft_lambda)


def _soft_spec(path, spec: PartitionSpec) -> PartitionSpec:
    del path
    return PartitionSpec(None, *spec)  # the task axis is replicated


def _soft_one(stack, choice: str, task_names):
    """The mean of the [T, ...] stack over tasks, or one task's row (NumPy, on the host)."""
    if choice == "mean":
        return (jax.tree.map(lambda x: np.mean(x, axis=0, dtype=x.dtype), stack),
                "soft, mean over tasks")
    if choice not in task_names:
        raise UserError(f"model.init_from_encoder={choice!r} is neither 'mean' nor a task of "
                        f"the soft-sharing source run (its tasks: {', '.join(task_names)}); use "
                        f"one of those")
    row = list(task_names).index(choice)
    return jax.tree.map(lambda x: np.asarray(x)[row], stack), f"soft, {choice}'s encoder"


def _soft_checks(config) -> None:
    if config.peft.kind != "none":
        raise UserError("sharing.mode=soft trains one full encoder per task; set peft.kind=none "
                        "(or use sharing.mode=hard with PEFT)")
    soft_sharing.PENALTIES.get(config.sharing.soft_penalty)


STRATEGIES.register("soft", SharingStrategy(
    init_encoder=_soft_init, encode=soft_sharing.encode, penalty=_soft_penalty,
    one_encoder=_soft_one, encoder_spec=_soft_spec, check_config=_soft_checks,
    encoder_share=lambda num_tasks: 1.0 / num_tasks))
