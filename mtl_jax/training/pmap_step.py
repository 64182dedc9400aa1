"""pmap path (``parallel.mode=pmap``): replicated state, batch split over the local devices.

Same step body as the jit path; ``Reducer("batch")`` makes it numerically the same: each
device's task losses are re-weighted by its share of the global example counts before the
backward, and the gradients are psum-ed (a count-weighted pmean).
"""
from __future__ import annotations

import jax
import numpy as np

from mtl_jax.errors import UserError
from mtl_jax.training import sharding as sharding_lib
from mtl_jax.training import step as step_lib

AXIS = "batch"


def split_batch(batch: dict, num_devices: int) -> dict:
    """[B, ...] -> [D, B/D, ...] (stacked [T, b, ...] -> [D, T, b/D, ...]) on the host."""
    stacked = sharding_lib.is_stacked(batch)
    out = {}
    for key, x in batch.items():
        x = np.asarray(x)
        axis = 1 if stacked else 0
        if x.shape[axis] % num_devices:
            raise UserError(f"batch key {key!r} has {x.shape[axis]} rows, not divisible by the "
                            f"{num_devices} local devices; make the batch size a multiple of it")
        x = x.reshape(x.shape[:axis] + (num_devices, x.shape[axis] // num_devices)
                      + x.shape[axis + 1:])
        out[key] = np.moveaxis(x, axis, 0) if stacked else x
    return out


def build_pmap_train_step(model, config):
    """``train_step(state, batch, rng)`` with a replicated state (create_train_state(mesh=...)
    replicates it) and the host batch; returns (replicated state, metrics of device 0)."""
    body = step_lib.make_train_step(model, config, mesh=None, reducer=step_lib.Reducer(AXIS))
    pstep = jax.pmap(body, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=0)

    def train_step(state, batch, rng):
        state, metrics = pstep(state, split_batch(batch, jax.local_device_count()), rng)
        return state, jax.tree.map(lambda m: m[0], metrics)
    return train_step


def build_pmap_eval_step(model, config):
    del config
    papply = jax.pmap(lambda state, batch: model.apply(state.params, batch, rng=None,
                                                       deterministic=True))

    def eval_step(state, batch):
        n = jax.local_device_count()
        out = papply(state, split_batch(batch, n))
        return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), out)
    return eval_step
