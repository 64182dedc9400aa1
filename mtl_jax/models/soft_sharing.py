"""Soft parameter sharing: per-task encoders stacked on a leading task axis, tied by an L2 penalty.

The math of the ``soft`` entry of ``sharing.STRATEGIES`` (the entry wires these functions in).

``params["encoder"]`` holds every encoder leaf as [T, ...] (all rows start from the same
pretrained weights). The penalty (``sharing.soft_penalty``) is

  mean:      lambda * sum_t ||theta_t - mean_s theta_s||^2
  pairwise:  lambda * sum_{s<t} ||theta_s - theta_t||^2   (= T * the mean form, computed that way)

summed over every encoder leaf; the model reports it as ``aux["soft_penalty"]`` for the train
step to add to the loss.

Running the encoders:
- a task-homogeneous batch (data.batch_mode homogeneous or stacked) runs ONE encoder, picked by a
  dynamic index into the stack under jit (same FLOPs as hard sharing; the backward pass scatters
  the gradient into a [T, ...] zero stack, and the penalty adds O(T * params) elementwise work);
- a mixed batch runs EVERY task's encoder on the whole batch (vmap over the stack) and keeps each
  example's own task output: T times the encoder FLOPs and activation memory of hard sharing.
  Prefer homogeneous batches with soft sharing.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mtl_jax.registry import Registry

PENALTIES: Registry[Callable] = Registry("soft-sharing penalty")


def stack_copies(params, num_tasks: int):
    """T identical copies of ``params`` on a new leading axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_tasks,) + x.shape).copy(), params)


def select(stack, index):
    """Row ``index`` (a traced int is fine: a dynamic slice) of every leaf of a stacked tree."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False), stack)


def encode(run_encoder, stack, batch, homogeneous: bool):
    """(hidden, pooled) of each example from its own task's encoder (see the module docstring).

    ``run_encoder(one_encoder_params) -> (hidden, pooled)`` runs one encoder on the whole batch.
    """
    task_ids = batch["task_id"]
    if homogeneous:  # one encoder: the task of the first real example (padding rows may differ)
        first_real = jnp.argmax(batch["weight"] > 0)
        return run_encoder(select(stack, task_ids[first_real]))
    hidden_all, pooled_all = jax.vmap(run_encoder)(stack)  # [T, B, ...]
    rows = jnp.arange(hidden_all.shape[1])
    return hidden_all[task_ids, rows], pooled_all[task_ids, rows]


def _sum_sq_dev_from_mean(stack):
    def leaf(x):
        # Unrolled over the (small, static) task axis: XLA:CPU runs a reduction over a leading
        # axis of 4 with a broadcast subtract ~2.5x slower than these contiguous row reductions.
        rows = [x[t].astype(jnp.float32) for t in range(x.shape[0])]
        mean = sum(rows) / len(rows)
        return sum(jnp.sum((r - mean) ** 2) for r in rows)
    return sum(leaf(x) for x in jax.tree.leaves(stack))


@PENALTIES.register("mean")
def mean_penalty(stack):
    return _sum_sq_dev_from_mean(stack)


@PENALTIES.register("pairwise")
def pairwise_penalty(stack):
    # sum_{s<t} ||a_s - a_t||^2 = T * sum_t ||a_t - mean||^2: O(T) instead of O(T^2) work.
    num_tasks = jax.tree.leaves(stack)[0].shape[0]
    return num_tasks * _sum_sq_dev_from_mean(stack)


def soft_penalty(stack, kind: str, lam: float):
    return lam * PENALTIES.get(kind)(stack)
