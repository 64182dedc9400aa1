"""Starting a run from another mtl_jax run's checkpoint: ``model.init_from=DIR[:best|latest|STEP]``.

DIR is an mtl_jax training workdir; the suffix picks its checkpoint: ``latest`` (the default when
omitted), ``best`` (by the source run's early-stopping metric; an error where it kept no scored
checkpoint) or a step number. Only a fresh start reads it (``runner.Run.init_state``); a resume
restores its own checkpoint and ignores it.

Reading: the ``config`` item of ``DIR/checkpoints/<step>/`` (the source run's resolved config:
sharing mode, PEFT kind, tasks and their label names) and the ``params`` of its ``state`` item,
restored onto the host as NumPy from the checkpoint's own metadata: no abstract state of the
source run is needed and its optimizer state is not read.

Mapping onto this run's fresh parameters (``model.init_params(key, pretrained=False)``):

  encoder  every encoder leaf that is not a PEFT leaf comes from the source's one-encoder view
           (its sharing strategy's ``one_encoder``: hard as is; soft's [T_src, ...] stack
           averaged over tasks, or one source task's row, ``model.init_from_encoder``) and
           must be there with the same shape; this run's sharing strategy then stores it as it
           stores a pretrained encoder (soft: copied to every task's row).
  PEFT     (``model.init_from_peft``) per-task leaves (adapters and LoRA inside the encoder, with
           their task axis where ``peft_layers.TASK_AXIS`` names it; top-level ones such as the
           prefix embeddings where the PEFT kind's ``per_task_leaves`` names them) take the
           source's rows of the tasks of the same name; leaves shared by the tasks (the prefix
           MLP) are taken as they are. PEFT leaves the source lacks keep their init (a new LoRA
           on a multi-task-tuned encoder); the source's PEFT leaves this run lacks are ignored.
  heads    (``model.init_from_heads``) the head of a task of the same name, type, label names and
           parameter shapes; any other head (a new task, another label set) starts fresh.

Any mismatch in what must match is one ``UserError`` line naming the parameter path and both
shapes; a missing workdir, checkpoint, step or best checkpoint is one line naming the fix. The
``log`` callback gets one line saying what was loaded.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mtl_jax.checkpoints.manager import CheckpointManager, _describe
from mtl_jax.errors import UserError
from mtl_jax.models import sharing as sharing_lib
from mtl_jax.models import summary as summary_lib
from mtl_jax.models.param_groups import path_str
from mtl_jax.models.peft_layers import TASK_AXIS

WHICH = ("best", "latest")  # besides a step number
DEFAULT_WHICH = "latest"

_CORE = ("encoder", "heads")  # every other top-level key is a PEFT kind's
Flat = dict  # "encoder/layers/layer_0/attention/query/kernel" -> array


class Source(NamedTuple):
    """The checkpoint a run starts from."""

    spec: str  # model.init_from as given (for messages)
    directory: str
    step: int
    config: dict  # the source run's resolved config
    params: Any  # its params tree, NumPy leaves

    @property
    def tasks(self) -> list[str]:
        """Task names by their index in the source run: TaskSpec indices follow the order in
        which a ConfigDict lists ``config.tasks`` (sorted keys; tasks/definitions.py)."""
        return list(ml_collections.ConfigDict(self.config.get("tasks") or {}).keys())

    def task(self, name: str) -> dict:
        return (self.config.get("tasks") or {}).get(name) or {}


# --- reading the source ---------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str]:
    """``"DIR[:best|latest|STEP]"`` -> (DIR, which). A suffix that is none of those belongs to DIR
    (``gs://bucket/run`` has a colon of its own)."""
    directory, sep, which = spec.rpartition(":")
    if sep and (which in WHICH or which.isdigit()):
        return directory, which
    return spec, DEFAULT_WHICH


def read_source(spec: str, where: str | None = None) -> Source:
    """The checkpoint ``spec`` names: its step, config and params (host NumPy). ``where`` starts
    every error line (default ``model.init_from=SPEC``; the export names its own flags)."""
    directory, which = parse_spec(spec)
    where = where or f"model.init_from={spec}"
    if "://" not in directory and not os.path.isdir(directory):
        raise UserError(f"{where}: no directory {directory}; give an mtl_jax training workdir as "
                        f"DIR[:best|latest|STEP]")
    steps, latest = _steps(directory)
    if not steps:
        raise UserError(f"{where}: {directory} has no checkpoint (no checkpoints/<step>/); train "
                        f"that run first or point at another training workdir")
    config = _read_item(where, directory, latest, "config", ocp.JsonCheckpointHandler())
    step = _pick_step(where, directory, which, steps, latest, config or {})
    if step != latest:
        config = _read_item(where, directory, step, "config", ocp.JsonCheckpointHandler())
    params = _read_item(where, directory, step, "state", ocp.PyTreeCheckpointHandler(),
                        _params_args)
    return Source(spec, directory, step, config or {}, params)


def _steps(directory: str) -> tuple[list[int], int | None]:
    manager = CheckpointManager(directory, read_only=True)
    try:
        return manager.all_steps(), manager.latest_step()
    finally:
        manager.close()


def _pick_step(where, directory, which, steps, latest, config) -> int:
    if which == "latest":
        return latest
    if which == "best":
        return _best_step(where, directory, steps, config)
    if int(which) not in steps:
        raise UserError(f"{where}: {directory} has no checkpoint at step {which} (it has steps "
                        f"{', '.join(map(str, steps))}); use one of those, :latest or :best")
    return int(which)


def _best_step(where, directory, steps, config) -> int:
    """The source's best checkpoint by its own metric direction; never silently the latest."""
    best = None
    if (config.get("checkpoint") or {}).get("keep_best", True):  # else orbax answers the latest
        manager = CheckpointManager(
            directory, read_only=True,
            best_mode=(config.get("train") or {}).get("early_stopping_mode", "max"))
        try:
            best = manager.best_step()  # None: no checkpoint was saved with a metric
        finally:
            manager.close()
    if best is None:
        raise UserError(f"{where}: {directory} has no best checkpoint (checkpoint.keep_best was "
                        f"off there or no checkpoint was scored); use :latest or a step "
                        f"({', '.join(map(str, steps))})")
    return best


def _params_args(handler, path):
    """Restore args for the ``params`` subtree only, every leaf as a host NumPy array."""
    tree = handler.metadata(path).tree
    if "params" not in tree:
        raise FileNotFoundError(f"no params in {path}")
    item = {"params": tree["params"]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    return ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)


def _read_item(where: str, directory: str, step: int, name: str, handler, make_args=None):
    """Item ``name`` of checkpoint ``step`` (the state's params only, as NumPy)."""
    root = directory if "://" in directory else os.path.abspath(directory)
    path = epath.Path(root) / "checkpoints" / str(step) / name
    try:
        args = make_args(handler, path) if make_args else None
        restored = handler.restore(path, args=args) if args else handler.restore(path)
    except Exception as e:  # pylint: disable=broad-except  # any unreadable file
        raise UserError(f"{where}: {path} could not be read ({_describe(e)}); pick another "
                        f"checkpoint (DIR:STEP) or run") from e
    finally:
        handler.close()
    return restored["params"] if make_args else restored


# --- mapping onto this run's parameters -----------------------------------------------------------

def _flat(tree) -> Flat:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_peft(encoder_path: str) -> bool:
    return summary_lib.label_for(["encoder", *encoder_path.split("/")]) == "peft"


def _shape(x) -> tuple:
    return tuple(np.shape(x))


class _Mapper:
    """Builds this run's initial params from ``source`` (see the module docstring)."""

    ENCODER_FIX = ("initialise from a run of the same encoder (model.name_or_path, model.size, "
                   "model.scan_layers)")
    PEFT_FIX = "use the source run's PEFT settings (peft.*) or set model.init_from_peft=False"

    def __init__(self, model, config, source: Source):
        self.model, self.source, self.m = model, source, config.model
        self.where = f"model.init_from={source.spec}"
        there = {name: i for i, name in enumerate(source.tasks)}
        # (index here, index there) of every task in both runs: the per-task PEFT rows moved
        self.pairs = [(s.index, there[s.name]) for s in model.specs if s.name in there]
        self.shared = [s.name for s in model.specs if s.name in there]
        self.loaded_peft = self.kept_peft = 0
        self.notes: list[str] = []

    def _mismatch(self, path: str, there, here, fix: str) -> UserError:
        found = "is absent there" if there is None else f"has shape {there} there"
        return UserError(f"{self.where}: {path} {found} and {here} here; {fix}")

    # --- encoder ---------------------------------------------------------------------------
    def encoder(self, fresh_encoder, task_axes: Mapping[str, int | None], rng):
        """(stored encoder, description): the source's one-encoder view mapped onto this run's
        one-encoder tree, then stored by this run's sharing strategy."""
        model, source = self.model, self.source
        mode = (source.config.get("sharing") or {}).get("mode", "hard")
        source_one, described = sharing_lib.STRATEGIES.get(mode).one_encoder(
            source.params["encoder"], self.m.init_from_encoder, source.tasks)
        # This run's fresh stack (if any) has identical rows, copies of one encoder: take row 0.
        names = [s.name for s in model.specs]
        fresh_one, _ = model.sharing_strategy.one_encoder(fresh_encoder, names[0], names)
        there, used = _flat(source_one), set()

        def leaf(path, fresh):
            name = path_str(path)
            used.add(name)
            full = f"encoder/{name}"
            if _is_peft(name):
                return self._peft_leaf(full, fresh, there.get(name), task_axes.get(full))
            if name not in there or _shape(there[name]) != _shape(fresh):
                raise self._mismatch(full, _shape(there[name]) if name in there else None,
                                     _shape(fresh), self.ENCODER_FIX)
            return np.asarray(there[name], dtype=fresh.dtype)

        one = jax.tree_util.tree_map_with_path(leaf, fresh_one)
        ignored = sorted(set(there) - used)
        if ignored:
            what = "PEFT " if all(_is_peft(n) for n in ignored) else ""
            self.notes.append(f"ignored {len(ignored)} {what}leaves of the source encoder absent "
                              f"here (e.g. encoder/{ignored[0]})")
        if model.sharing != mode:
            described += f" -> {model.sharing}"
        return model.sharing_strategy.init_encoder(rng, one, model.num_tasks), described

    # --- PEFT ------------------------------------------------------------------------------
    def _peft_leaf(self, path: str, fresh, there, task_axis: int | None):
        if there is None:
            self.kept_peft += 1
            return fresh
        if not self.m.init_from_peft:
            return fresh
        self.loaded_peft += 1
        if task_axis is None:  # shared by every task
            if _shape(there) != _shape(fresh):
                raise self._mismatch(path, _shape(there), _shape(fresh), self.PEFT_FIX)
            return np.asarray(there, dtype=fresh.dtype)
        return self._rows(path, np.asarray(fresh), np.asarray(there), task_axis)

    def _rows(self, path: str, fresh, there, axis: int):
        """Each shared task's row (along ``axis``) from its source row; new tasks keep init."""
        row_here = fresh.shape[:axis] + fresh.shape[axis + 1:]
        row_there = there.shape[:axis] + there.shape[axis + 1:]
        if row_here != row_there or there.shape[axis] != len(self.source.tasks):
            raise self._mismatch(path, _shape(there), _shape(fresh), self.PEFT_FIX)
        out = np.array(fresh, copy=True)
        rows_out, rows_there = np.moveaxis(out, axis, 0), np.moveaxis(there, axis, 0)  # views
        for here_i, there_i in self.pairs:
            rows_out[here_i] = rows_there[there_i]
        return out

    def extras(self, fresh) -> dict:
        """The top-level PEFT parameters (prefix) beside "encoder" and "heads"."""
        there = _flat({k: v for k, v in self.source.params.items() if k not in _CORE})
        task_axes = dict(self.model.peft_method.per_task_leaves)  # path -> its task axis

        def leaf(path, x):
            name = path_str(path)
            return self._peft_leaf(name, x, there.get(name), task_axes.get(name))

        return jax.tree_util.tree_map_with_path(
            leaf, {k: v for k, v in fresh.items() if k not in _CORE})

    # --- heads -----------------------------------------------------------------------------
    def heads(self, fresh_heads) -> tuple[dict, list[str], list[str]]:
        """(heads, loaded task names, ["task (why it starts fresh)"])."""
        there_all = self.source.params.get("heads") or {}
        out, loaded, fresh = {}, [], []
        for spec in self.model.specs:
            why = self._head_mismatch(spec, fresh_heads[spec.name], there_all.get(spec.name))
            if why:
                out[spec.name] = fresh_heads[spec.name]
                fresh.append(f"{spec.name} ({why})")
                continue
            out[spec.name] = jax.tree.map(lambda h, s: np.asarray(s, dtype=h.dtype),
                                          fresh_heads[spec.name], there_all[spec.name])
            loaded.append(spec.name)
        return out, loaded, fresh

    def _head_mismatch(self, spec, fresh, there) -> str | None:
        if not self.m.init_from_heads:
            return "model.init_from_heads=False"
        if spec.name not in self.source.tasks or there is None:
            return "new task"
        task = self.source.task(spec.name)
        if task.get("type", spec.type) != spec.type:
            return f"a {task['type']} task there"
        if tuple(task.get("label_names") or ()) != tuple(spec.label_names or ()):
            return "different label sets"
        shapes_there = {p: _shape(x) for p, x in _flat(there).items()}
        if shapes_there != {p: _shape(x) for p, x in _flat(fresh).items()}:
            return "different head shapes"
        return None

    # --- all -------------------------------------------------------------------------------
    def build(self, fresh, rng) -> tuple[dict, str]:
        specs = jax.tree_util.tree_flatten_with_path(
            self.model.logical_specs(fresh),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
        task_axes = {path_str(p): list(s).index(TASK_AXIS) if TASK_AXIS in s else None
                     for p, s in specs}
        enc_rng = jax.random.fold_in(jax.random.split(rng, 3)[0], 1)  # as init_params' strategy
        encoder, described = self.encoder(fresh["encoder"], task_axes, enc_rng)
        heads, loaded, new = self.heads(fresh["heads"])
        params = {"encoder": encoder, "heads": heads, **self.extras(fresh)}
        parts = [f"encoder ({described})", "heads " + (", ".join(loaded) or "none")]
        if new:
            parts.append("fresh heads: " + ", ".join(new))
        parts += self._peft_parts(fresh) + self.notes
        return params, (f"init_from {self.source.directory} step {self.source.step}: "
                        + "; ".join(parts))

    def _peft_parts(self, fresh) -> list[str]:
        labels = jax.tree.leaves(self.model.param_labels(fresh))
        if not any(label in ("peft", "prefix") for label in labels):
            return []
        if not self.m.init_from_peft:
            return ["fresh PEFT (model.init_from_peft=False)"]
        parts = []
        if self.loaded_peft:
            parts.append("PEFT of " + (", ".join(self.shared) or "no task"))
            new = [s.name for s in self.model.specs if s.name not in self.shared]
            if new:
                parts.append("fresh PEFT: " + ", ".join(new))
        if self.kept_peft:
            parts.append(f"kept the init of {self.kept_peft} PEFT leaves absent there")
        return parts


def load(model, config, source: Source, rng) -> tuple[dict, str]:
    """(params, log line): this run's fresh params (random init from ``rng``) with ``source``'s
    mapped onto them; a UserError for any mismatch in what must match."""
    fresh = model.init_params(rng, pretrained=False)  # the pretrained weights would be overwritten
    return _Mapper(model, config, source).build(fresh, rng)


def initial_params(model, config, rng, log: Callable[[str], None] = print):
    """A fresh run's parameters: ``model.init_params(rng)``, or with ``model.init_from`` set the
    source checkpoint's mapped onto them (one ``log`` line says what was loaded)."""
    if not config.model.init_from:
        return model.init_params(rng)
    params, line = load(model, config, read_source(config.model.init_from), rng)
    log(line)
    return params

