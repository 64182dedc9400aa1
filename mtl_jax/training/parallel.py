"""Parallel strategies (``parallel.mode``, a registry): how a run is laid out over devices.

A strategy owns everything that depends on the mode: where the TrainState lives, how a host
batch reaches the devices, how the step bodies are compiled (the train step is
``trainers.get(config).make_step``, ``train.algorithm``; the eval step ``training/step.py``'s),
and what a checkpoint holds. ``build(model, config, mesh, abstract_state)`` returns one; its
methods:

  init_state(params)        the initial TrainState, placed
  restore_shardings()       target shardings for restoring a checkpoint onto this layout
  saved(state) / restored(state)   step layout <-> checkpoint layout
  place_batch(host_batch)   host NumPy batch -> step input (explicit transfers only)
  place_rng(key)            a PRNG key laid out as the step expects it
  train_step / eval_step    compiled once per strategy (jit traces once per batch shape)

Entries:

  jit   global arrays over the ("data", "fsdp", "tensor") mesh. Shardings are computed once
        from the abstract state under ``parallel.rules`` and given to ``jax.jit`` (in/out
        shardings, the state donated); XLA inserts the gradient all-reduce and FSDP gathers.
  pmap  the state replicated on every local device, the batch split over them;
        ``Reducer("batch")`` sums loss numerators, denominators and gradients over devices.

Dropout: under jit the step draws its bits from one key for the whole global batch (folded
with the step number). JAX's partitionable threefry makes each bit a function of its position
in the global array, so jit on 1 device and jit on any mesh draw the same bits. pmap folds the
device index into the key as well: each device draws its own bits for its shard, so with
dropout on pmap and jit train on different (equally valid) masks; with dropout off they agree.
"""
from __future__ import annotations

import functools

import flax
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mtl_jax.errors import UserError
from mtl_jax.registry import Registry
from mtl_jax.training import sharding as sharding_lib
from mtl_jax.training import state as state_lib
from mtl_jax.training import step as step_lib
from mtl_jax.training import trainers as trainers_lib

PARALLEL: Registry[type] = Registry("parallel.mode")


def build(model, config, mesh, abstract_state):
    """The ``config.parallel.mode`` strategy for ``model`` on ``mesh``. ``abstract_state``
    (``state.abstract_train_state``) fixes the TrainState's structure and its Optimizer."""
    return PARALLEL.get(config.parallel.mode)(model, config, mesh, abstract_state)


class _Strategy:
    def __init__(self, model, config, mesh, abstract_state):
        self.model, self.config, self.mesh = model, config, mesh
        self.abstract_state = abstract_state
        self.optimizer = abstract_state.optimizer

    def _new_state(self, params):
        return state_lib.new_train_state(self.model, params, self.config, self.optimizer)

    def saved(self, state):
        return state

    def restored(self, state):
        return state


@PARALLEL.register("jit")
class JitStrategy(_Strategy):
    """One program over the whole mesh; see the module docstring."""

    def __init__(self, model, config, mesh, abstract_state):
        super().__init__(model, config, mesh, abstract_state)
        self.param_specs = sharding_lib.param_specs(model, abstract_state.params, config, mesh)
        self.state_shardings = sharding_lib.state_shardings(abstract_state, self.param_specs,
                                                            mesh)
        self.replicated = NamedSharding(mesh, P())
        self.example_axis = trainers_lib.example_axis(config)  # flat 0, stacked 1, episodes 2

    def init_state(self, params):
        return jax.jit(self._new_state, out_shardings=self.state_shardings)(params)

    def restore_shardings(self):
        return self.state_shardings

    def place_batch(self, host_batch: dict) -> dict:
        axis = sharding_lib.example_axis(host_batch)
        if axis and axis != self.example_axis:  # flat batches (evaluation) fit every run
            # The compiled step's batch sharding follows the run's layout (data.batch_mode,
            # train.algorithm), so a batch of another layout would be laid out wrongly.
            what, fix = _LAYOUTS[axis]
            raise UserError(f"{what} reached a run whose data.batch_mode="
                            f"{self.config.data.batch_mode}, train.algorithm="
                            f"{self.config.train.algorithm}; set {fix}")
        return sharding_lib.shard_batch(host_batch, self.mesh)

    def place_rng(self, key):
        return jax.device_put(key, self.replicated)

    def _batch_sharding(self, axis: int) -> NamedSharding:
        # One sharding for every key (a tree prefix of the batch dict): the example axis over
        # ("data", "fsdp"), the axes before and after it replicated.
        return NamedSharding(self.mesh, sharding_lib.batch_spec(1 + axis, axis))

    @functools.cached_property
    def train_step(self):
        trainable = step_lib.Split.of(self.abstract_state.params,
                                      self.optimizer.trainable_mask())
        gram_fn = sharding_lib.sharded_gram_fn(self.mesh, trainable.take(self.param_specs))
        body = trainers_lib.get(self.config).make_step(self.model, self.config, gram_fn=gram_fn)
        return jax.jit(body, donate_argnums=0,
                       in_shardings=(self.state_shardings,
                                     self._batch_sharding(self.example_axis),
                                     self.replicated),
                       out_shardings=(self.state_shardings, self.replicated))

    @functools.cached_property
    def eval_step(self):
        return jax.jit(step_lib.make_eval_step(self.model),
                       in_shardings=(self.state_shardings, self._batch_sharding(0)))


@PARALLEL.register("pmap")
class PmapStrategy(_Strategy):
    """A replicated state and the batch split over the local devices; see the module docstring."""

    AXIS = "batch"

    def __init__(self, model, config, mesh, abstract_state):
        super().__init__(model, config, mesh, abstract_state)
        self.devices = jax.local_devices()
        self.local_mesh = jax.sharding.Mesh(np.asarray(self.devices), (self.AXIS,))

    def init_state(self, params):
        return flax.jax_utils.replicate(self._new_state(params), self.devices)

    def restore_shardings(self):
        one = jax.sharding.SingleDeviceSharding(self.devices[0])
        return jax.tree.map(lambda _: one, self.abstract_state)

    def saved(self, state):
        return flax.jax_utils.unreplicate(state)

    def restored(self, state):
        return flax.jax_utils.replicate(state, self.devices)

    def place_batch(self, host_batch: dict) -> dict:
        split = split_batch(host_batch, len(self.devices))
        per_device = NamedSharding(self.local_mesh, P(self.AXIS))
        return {k: jax.device_put(v, per_device) for k, v in split.items()}

    def place_rng(self, key):
        return jax.device_put(key, NamedSharding(self.local_mesh, P()))

    @functools.cached_property
    def train_step(self):
        body = trainers_lib.get(self.config).make_step(self.model, self.config,
                                                       reducer=step_lib.Reducer(self.AXIS))
        # No ``devices=``: pmap's default mesh spans every process's devices, so the psum is
        # global on several hosts too (a per-process device list would make it host-local).
        pstep = jax.pmap(body, axis_name=self.AXIS, in_axes=(0, 0, None), donate_argnums=0)

        def train_step(state, batch, rng):
            state, metrics = pstep(state, batch, rng)
            # Device 0's copy (all are equal); a static slice, so no index crosses to a device.
            return state, jax.tree.map(lambda m: jax.lax.index_in_dim(m, 0, keepdims=False),
                                       metrics)
        return train_step

    @functools.cached_property
    def eval_step(self):
        papply = jax.pmap(step_lib.make_eval_step(self.model))

        def eval_step(state, batch):
            out = papply(state, batch)
            return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), out)
        return eval_step


# example axis -> (what such a batch is, the setting that lays a run out for it)
_LAYOUTS = {1: ("a stacked batch ([T, B//T, ...])", "data.batch_mode=stacked"),
            2: ("a meta-learning episode batch ([K, S', b, ...])",
                "train.algorithm=reptile or fomaml")}


def split_batch(batch: dict, num_devices: int) -> dict:
    """[B, ...] -> [D, B/D, ...] on the host; the example axis is ``sharding.example_axis``
    (stacked [T, b, ...] -> [D, T, b/D, ...], episodes [K, S', b, ...] -> [D, K, S', b/D, ...])."""
    axis = sharding_lib.example_axis(batch)
    out = {}
    for key, x in batch.items():
        x = np.asarray(x)
        if x.shape[axis] % num_devices:
            raise UserError(f"batch key {key!r} has {x.shape[axis]} rows, not divisible by the "
                            f"{num_devices} local devices; make the batch size a multiple of it")
        x = x.reshape(x.shape[:axis] + (num_devices, x.shape[axis] // num_devices)
                      + x.shape[axis + 1:])
        out[key] = np.moveaxis(x, axis, 0) if axis else x
    return out
