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

Saves are asynchronous, and a failed one is noticed early: ``poll()`` (called by the loop at every
step boundary, no waiting) raises ``CheckpointSaveError`` once the background save has failed;
every wait on a background save is bounded by ``save_timeout_s``. The committed checkpoints are
never touched by a failed save. A save that a killed run left half-written (orbax's
``<step>.orbax-checkpoint-tmp*`` folder) is listed in ``interrupted_saves`` before orbax deletes it.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from mtl_jax.errors import UserError
from mtl_jax.models.param_groups import path_str

# orbax warns on every save without a metric when best tracking is on; most saves have none.
logging.getLogger("absl").addFilter(lambda r: "did not provide metrics" not in r.getMessage())

_METRIC_KEY = "score"
_TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
DEFAULT_SAVE_TIMEOUT_S = 600.0
# TensorStore errors end in a repr of a bound pybind11 method: nothing a user can act on.
_INTERNAL_REPR = re.compile(r"(See full TensorStore details:)?\s*<bound method.*$")


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; the committed ones are kept.

    Exits at once (``hard_exit``): orbax's background threads of the failed save wait minutes for
    signals that never come and would keep the process alive.
    """

    exit_code = 4
    hard_exit = True


class UnreadableCheckpoints(UserError):
    """Every checkpoint failed to read. Exits at once: TensorStore still completes the abandoned
    reads in its threads and prints a traceback for each (their asyncio loop is closed)."""

    hard_exit = True


# The traceback TensorStore prints (not through logging) for each read a failed restore abandoned.
_ABANDONED_READ_NOISE = re.compile(
    r"^(Traceback \(most recent call last\):|RuntimeError: Event loop is closed|\s+File \".*"
    r"asyncio/base_events\.py\", line \d+, in (call_soon_threadsafe|_check_closed)|\s+self\."
    r"_check_closed\(\)|\s+raise RuntimeError\('Event loop is closed'\))$")


@contextlib.contextmanager
def _absorb_abandoned_read_noise(grace_s: float = 0.3):
    """Holds stderr during a restore; on failure waits ``grace_s`` for the abandoned reads'
    callbacks, then passes on every line except their closed-loop tracebacks."""
    held, real = io.StringIO(), sys.stderr
    sys.stderr = held
    try:
        yield
    except BaseException:
        time.sleep(grace_s)
        raise
    finally:
        sys.stderr = real
        kept = [line for line in held.getvalue().splitlines()
                if not _ABANDONED_READ_NOISE.match(line)]
        if kept:
            print("\n".join(kept), file=real, flush=True)


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (process 0)."""
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Restored(NamedTuple):
    step: int
    state: Any  # the TrainState pytree, laid out like the abstract state given to restore
    data_state: dict  # train iterator state
    loop_state: dict  # loop bookkeeping (early stopping, ...)
    config: dict  # the config the checkpoint was written with


class CheckpointManager:
    """Saves and restores training checkpoints under ``WORKDIR/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 2, keep_best: bool = True,
                 best_mode: str = "max", async_save: bool = True,
                 save_timeout_s: float = DEFAULT_SAVE_TIMEOUT_S, read_only: bool = False):
        if best_mode not in ("max", "min"):
            raise UserError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if max_to_keep < 1:
            raise UserError(f"checkpoint.max_to_keep must be >= 1, got {max_to_keep}; "
                            "set --config.checkpoint.max_to_keep=1 or more")
        self.workdir = workdir
        self.directory = _absolute(os.path.join(workdir, "checkpoints"))
        self.save_timeout_s = float(save_timeout_s)
        self.interrupted_saves = _interrupted_saves(self.directory)  # before orbax cleans them
        self._pending: int | None = None  # the step of the async save in flight
        self._failed: CheckpointSaveError | None = None
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
            # Half-written saves of a killed run; a reader (eval/predict) leaves them alone, since
            # they may be the in-flight save of a training run in the same workdir.
            cleanup_tmp_directories=not read_only,
            create=not read_only)
        handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                        loop=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler())
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                              options=options)

    @classmethod
    def from_config(cls, workdir: str, config, read_only: bool = False) -> "CheckpointManager":
        return cls(workdir, read_only=read_only, max_to_keep=config.checkpoint.max_to_keep,
                   keep_best=config.checkpoint.keep_best,
                   best_mode=config.train.early_stopping_mode,
                   async_save=config.checkpoint.async_save,
                   save_timeout_s=config.checkpoint.save_timeout_s)

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
        saving a step that already exists is a no-op returning False. Raises
        ``CheckpointSaveError`` if this save, or the previous one, failed.
        """
        step = int(step)
        self.wait()  # bounded; raises if the previous save failed
        if step in self._manager.all_steps():
            return False
        metrics = None if metric is None else {_METRIC_KEY: float(metric)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_state or {})),
            loop=ocp.args.JsonSave(dict(loop_state or {})),
            config=ocp.args.JsonSave(config_to_json(config)))
        try:
            started = bool(self._manager.save(step, args=args, metrics=metrics, force=True))
        except Exception as e:  # pylint: disable=broad-except  # OSError, orbax's own errors
            raise self._fail(step, e) from e
        self._pending = step if started else None
        return started

    def poll(self) -> None:
        """Raises ``CheckpointSaveError`` if the async save in flight has failed (no waiting)."""
        if self._failed is not None:
            raise self._failed
        thread = self._save_thread()
        if self._pending is None or thread is None or thread.is_alive():
            return
        error = getattr(thread, "exception", None)
        if error is not None:
            raise self._fail(self._pending, error)

    def wait(self, timeout_s: float | None = None) -> None:
        """Blocks until pending async saves are on disk, at most ``timeout_s`` (default
        ``save_timeout_s``); a failed or overdue save raises ``CheckpointSaveError``."""
        self.poll()
        if self._pending is None:
            return
        timeout_s = self.save_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        thread = self._save_thread()
        while thread is not None and thread.is_alive():
            if time.monotonic() > deadline:
                raise self._fail(self._pending, TimeoutError(
                    f"not finished after {timeout_s:.0f} s (checkpoint.save_timeout_s)"))
            threading.Thread.join(thread, 0.05)  # orbax's own join re-raises the save's error
        self.poll()
        try:
            self._manager.wait_until_finished()  # the thread is done: returns at once
        except Exception as e:  # pylint: disable=broad-except
            raise self._fail(self._pending, e) from e
        self._pending = None

    def close(self) -> None:
        """Waits (bounded) for the last save and closes; after a failed save only marks closed,
        since orbax's close would wait on the failed save's threads."""
        if self._failed is None:
            self.wait()
            self._manager.close()

    def _save_thread(self) -> threading.Thread | None:
        """orbax's finalize thread of the last async save (private API; orbax is pinned)."""
        holder = getattr(self._manager, "_finalize_thread", None)
        return holder.get() if holder is not None else None

    def _fail(self, step: int, error: BaseException) -> CheckpointSaveError:
        committed = [s for s in self._committed_steps() if s != step]
        kept = (f"the last committed checkpoint is step {committed[-1]}" if committed
                else "no checkpoint was committed yet")
        self._failed = CheckpointSaveError(
            f"checkpoint save at step {step} in {self.directory} failed ({_describe(error)}); "
            f"{kept}; fix the cause (disk space, permissions, another run writing there) and "
            f"run the same command again to resume")
        self._pending = None
        return self._failed

    def _committed_steps(self) -> list[int]:
        if "://" in self.directory or not os.path.isdir(self.directory):
            return self.all_steps()
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

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
                with _absorb_abandoned_read_noise():
                    restored = self.restore(step, abstract_state, shardings)
            except UserError:
                raise
            except Exception as e:  # pylint: disable=broad-except  # any unreadable file
                warn(f"checkpoint {self._step_dir(step)} is unreadable ({_describe(e)}); "
                     f"trying the previous one")
                unreadable.append(step)
                continue
            for bad in unreadable:  # only once an older one restored: never lose the last good
                self._quarantine(bad)
            return restored
        if unreadable:
            raise UnreadableCheckpoints(
                f"no checkpoint in {self.directory} could be read (steps {sorted(unreadable)}); "
                f"move them aside or use a new --workdir")
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
        shapes[path_str(path)] = tuple(getattr(leaf, "shape", np.shape(leaf)))
    return shapes


def _fmt(shape) -> str:
    return "absent" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _describe(e: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line messages. Some library errors carry a
    repr of an internal object as their message (``<bound method ...>``): the type alone then."""
    text = _INTERNAL_REPR.sub("", _first_line(e)).strip().rstrip(".:")
    if not text:
        cause = e.__cause__ or e.__context__
        return _describe(cause) if cause is not None else type(e).__name__
    return f"{type(e).__name__}: {text}"


def _interrupted_saves(directory: str) -> list[int]:
    """Steps whose save a killed run left unfinished (orbax deletes these folders on start)."""
    if "://" in directory or not os.path.isdir(directory):
        return []
    return sorted({int(m.group(1)) for n in os.listdir(directory) if (m := _TMP_STEP.match(n))})
