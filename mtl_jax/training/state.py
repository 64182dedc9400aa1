"""TrainState: everything a training step reads and writes, checkpointed as one pytree.

Where the state lives (sharded over a mesh, replicated per device) is the parallel strategy's
business (``training/parallel.py``); this module builds it unplaced.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mtl_jax.training import optim as optim_lib
from mtl_jax.training import weighting as weighting_lib


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 train-step counter (micro-steps under gradient accumulation)
    params: Any
    opt_state: optax.OptState
    weighting_state: dict
    rng: jax.Array  # raw uint32[2] key; the loop's base key for train_step
    # Static: not checkpointed, rebuilt from the config. The Optimizer hashes by identity, so a
    # jitted step compiled for one state accepts only states built with the same Optimizer.
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    optimizer: optim_lib.Optimizer = struct.field(pytree_node=False)


def task_names(model) -> tuple[str, ...]:
    return tuple(s.name for s in sorted(model.specs, key=lambda s: s.index))


def build_optimizer(model, params, config, total_steps: int) -> optim_lib.Optimizer:
    """The optimizer of ``params`` (parameter groups checked here; abstract params are fine)."""
    return optim_lib.build_optimizer(config, params, model.param_labels(params), total_steps)


def new_train_state(model, params, config, optimizer: optim_lib.Optimizer) -> TrainState:
    """The initial state of ``params`` under ``optimizer`` (traceable: jit it to place it)."""
    weighting = weighting_lib.get(config)
    return TrainState(
        step=jnp.zeros([], jnp.int32), params=params, opt_state=optimizer.tx.init(params),
        weighting_state=weighting.init(len(model.specs), config),
        rng=jax.random.PRNGKey(int(config.seed)), tx=optimizer.tx, optimizer=optimizer)


def create_train_state(model, params, config, total_steps: int) -> TrainState:
    """A fresh, unplaced TrainState (where ``params`` are); strategies place theirs."""
    optimizer = build_optimizer(model, params, config, total_steps)
    return new_train_state(model, params, config, optimizer)


def abstract_train_state(model, abstract_params, config, total_steps: int) -> TrainState:
    """The TrainState as ShapeDtypeStructs (nothing allocated), with a real Optimizer in its
    static fields: the one every state of this run is then built with."""
    return jax.eval_shape(lambda p: create_train_state(model, p, config, total_steps),
                          abstract_params)
