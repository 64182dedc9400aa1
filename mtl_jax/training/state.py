"""TrainState: everything a training step reads and writes, checkpointed as one pytree."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

from mtl_jax.training import optim as optim_lib
from mtl_jax.training import sharding as sharding_lib
from mtl_jax.training import weighting as weighting_lib


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 train-step counter (micro-steps under gradient accumulation)
    params: Any
    opt_state: optax.OptState
    weighting_state: dict
    rng: jax.Array  # raw uint32[2] key; the loop's base key for train_step
    # Static: not checkpointed, rebuilt by create_train_state from the config.
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    optimizer: optim_lib.Optimizer = struct.field(pytree_node=False)


def task_names(model) -> tuple[str, ...]:
    return tuple(s.name for s in sorted(model.specs, key=lambda s: s.index))


def _init_state(model, params, config, optimizer, rng) -> TrainState:
    weighting = weighting_lib.get(config)
    return TrainState(
        step=jnp.zeros([], jnp.int32), params=params, opt_state=optimizer.tx.init(params),
        weighting_state=weighting.init(len(model.specs), config), rng=rng,
        tx=optimizer.tx, optimizer=optimizer)


def create_train_state(model, params, config, total_steps: int, mesh=None) -> TrainState:
    """Builds the optimizer (groups checked here) and the initial state.

    With ``mesh``, the state is placed for ``config.parallel.mode``: sharded by the logical rules
    (jit) or replicated over the local devices (pmap). Without it, it stays where params are.
    """
    optimizer = optim_lib.build_optimizer(config, params, model.param_labels(params), total_steps)
    rng = jax.random.PRNGKey(int(config.seed))
    init = lambda p, r: _init_state(model, p, config, optimizer, r)  # noqa: E731
    if mesh is None:
        return init(params, rng)
    if config.parallel.mode == "pmap":
        return flax.jax_utils.replicate(init(params, rng))
    abstract = jax.eval_shape(init, params, rng)
    shardings = sharding_lib.state_shardings(abstract, model, config, mesh)
    return jax.jit(init, out_shardings=shardings)(params, rng)
