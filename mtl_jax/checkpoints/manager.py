"""Training checkpoints: a thin wrapper over orbax ``CheckpointManager``.

Each checkpoint (``WORKDIR/checkpoints/<step>/``) holds four items:

  state     the TrainState pytree (params, optimizer and weighting state, step, RNG), sharded,
            written asynchronously by every process for its own shards
  data      the train iterator state (JSON), so a resumed run sees the same batches
  loop      loop bookkeeping (JSON: early stopping state, ...)
  config    the resolved config (JSON), for the record and for eval/predict runs

Retention keeps the ``max_to_keep`` latest checkpoints plus (``keep_best``) the best one by the
metric passed to ``save``. ``restore_latest`` restores onto the *current* device layout, given
by an abstract state whose leaves carry target shardings, so a checkpoint written on 8 devices
restores on 1 or on another mesh. A latest checkpoint that cannot be read is moved aside with a
one-line warning and the previous one is restored.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from mtl_jax.errors import UserError

log = logging.getLogger(__name__)
# orbax warns on every save without a metric when best tracking is on; most saves have none.
logging.getLogger("absl").addFilter(lambda r: "did not provide metrics" not in r.getMessage())

_METRIC_KEY = "score"


class Restored(NamedTuple):
    step: int
    state: Any  # the TrainState pytree, laid out like the abstract state given to restore
    data_state: dict  # train iterator state
    loop_state: dict  # loop bookkeeping (early stopping, ...)
    config: dict  # the config the checkpoint was written with


class CheckpointManager:
    """Saves and restores training checkpoints under ``WORKDIR/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 2, keep_best: bool = True,
                 best_mode: str = "max", async_save: bool = True):
        if best_mode not in ("max", "min"):
            raise UserError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if max_to_keep < 1:
            raise UserError(f"checkpoint.max_to_keep must be >= 1, got {max_to_keep}; "
                            "set --config.checkpoint.max_to_keep=1 or more")
        self.workdir = workdir
        self.directory = _absolute(os.path.join(workdir, "checkpoints"))
        policies = [ocp_policies.LatestN(n=max_to_keep)]
        if keep_best:
            policies.append(ocp_policies.BestN(
                get_metric_fn=_score, reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
            best_fn=_score if keep_best else None,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
            create=True)
        handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                        loop=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler())
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                              options=options)

    @classmethod
    def from_config(cls, workdir: str, config) -> "CheckpointManager":
        return cls(workdir, max_to_keep=config.checkpoint.max_to_keep,
                   keep_best=config.checkpoint.keep_best,
                   best_mode=config.train.early_stopping_mode,
                   async_save=config.checkpoint.async_save)

    # --- queries ---------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best metric (the latest step when keep_best is off)."""
        return self._manager.best_step()

    # --- save --------------------------------------------------------------------------------
    def save(self, step: int, state, *, data_state: Mapping | None = None,
             loop_state: Mapping | None = None, config=None,
             metric: float | None = None) -> bool:
        """Starts saving ``state`` at ``step`` (async: returns once arrays are on the host).

        ``metric`` is the value used to keep the best checkpoint (pass it at evaluation steps);
        saving a step that already exists is a no-op returning False.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        metrics = None if metric is None else {_METRIC_KEY: float(metric)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_state or {})),
            loop=ocp.args.JsonSave(dict(loop_state or {})),
            config=ocp.args.JsonSave(config_to_json(config)))
        return bool(self._manager.save(step, args=args, metrics=metrics, force=True))

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- restore -----------------------------------------------------------------------------
    def restore_latest(self, abstract_state, shardings=None) -> Restored | None:
        """Restores the newest readable checkpoint onto the current devices; None if none.

        ``abstract_state``: the TrainState as ``jax.ShapeDtypeStruct`` leaves (e.g. from
        ``jax.eval_shape``) or arrays, whose ``.sharding`` gives the target layout.
        ``shardings``: optional pytree of target shardings (overrides the leaves'), or a
        ``jax.sharding.Mesh`` to replicate every leaf over it. Unreadable newer checkpoints
        are moved aside (``<step>.corrupt-<time>``) with a one-line warning each, once an
        older one has restored; if none can be read that is a UserError (nothing is moved).
        """
        self.wait()
        unreadable = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, abstract_state, shardings)
            except UserError:
                raise
            except Exception as e:  # pylint: disable=broad-except  # any unreadable file
                log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                            self._step_dir(step), type(e).__name__, _first_line(e))
                unreadable.append(step)
                continue
            for bad in unreadable:  # only once an older one restored: never lose the last good
                self._quarantine(bad)
            return restored
        if unreadable:
            raise UserError(f"no checkpoint in {self.directory} could be read (steps "
                            f"{sorted(unreadable)}); move them aside or use a new --workdir")
        return None

    def restore(self, step: int, abstract_state, shardings=None) -> Restored:
        """Restores checkpoint ``step``; see ``restore_latest`` for the arguments."""
        target = abstract_target(abstract_state, shardings)
        self._check_shapes(step, target)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            loop=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        return Restored(step=int(step), state=restored.state, data_state=restored.data or {},
                        loop_state=restored.loop or {}, config=restored.config or {})

    def _check_shapes(self, step: int, target) -> None:
        metadata = self._manager.item_metadata(step)["state"]
        if metadata is None:
            raise FileNotFoundError(f"no state metadata in {self._step_dir(step)}")
        saved = _leaf_shapes(metadata.tree)
        now = _leaf_shapes(target)
        mismatch = sorted((not path.startswith("params/"), path)  # params first: the clearest
                          for path in saved.keys() | now.keys()
                          if saved.get(path, "absent") != now.get(path, "absent"))
        if not mismatch:
            return
        path = mismatch[0][1]
        shapes = f"{path}: saved {_fmt(saved.get(path))} vs now {_fmt(now.get(path))}"
        if path.startswith("params/"):
            raise UserError(f"checkpoint in {self.workdir} holds a model of a different shape "
                            f"(param {shapes}); use a new --workdir")
        raise UserError(f"checkpoint in {self.workdir} holds a different training state "
                        f"({shapes}; another optimizer or weighting?); use a new --workdir")

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _quarantine(self, step: int) -> None:
        """Renames an unreadable step dir so orbax ignores it and later saves can reuse its step."""
        if jax.process_index() == 0:
            os.rename(self._step_dir(step), f"{self._step_dir(step)}.corrupt-{int(time.time())}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mtl_jax_quarantine_{step}")
        self._manager.reload()


def abstract_target(abstract_state, shardings=None):
    """``ShapeDtypeStruct`` leaves with the target sharding of each leaf.

    Leaves without a sharding (and no ``shardings`` given) go to the first local device.
    """
    if isinstance(shardings, jax.sharding.Mesh):
        replicated = jax.sharding.NamedSharding(shardings, jax.sharding.PartitionSpec())
        shardings = jax.tree.map(lambda _: replicated, abstract_state)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def to_struct(leaf, sharding=None):
        sharding = sharding or getattr(leaf, "sharding", None) or default
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    if shardings is None:
        return jax.tree.map(to_struct, abstract_state)
    return jax.tree.map(to_struct, abstract_state, shardings)


def config_to_json(config) -> dict:
    """A ConfigDict (or mapping) as a JSON-safe dict (tuples become lists)."""
    if config is None:
        return {}
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def _score(metrics: Mapping) -> float:
    return metrics[_METRIC_KEY]


def _leaf_shapes(tree) -> dict[str, tuple]:
    """Path -> shape of every array leaf (PRNG keys as their raw key data, as orbax stores them)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype))
        shapes["/".join(_key_name(k) for k in path)] = tuple(getattr(leaf, "shape", np.shape(leaf)))
    return shapes


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _fmt(shape) -> str:
    return "absent" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""
