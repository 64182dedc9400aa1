"""The transfer study's plan: the command-line lists, its cells (task x starting point x k x seed),
each cell's train size, budget, overrides and command, the protocol text, and the layout of the
study directory that the driver writes and the report reads."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
from typing import Mapping, Sequence

from mtl_jax import cli
from mtl_jax.compare.plan import with_tasks
from mtl_jax.errors import UserError

# --- the study directory -----------------------------------------------------------------------

RECORD = "transfer.json"  # DIR/transfer.json: {"protocol": {...}, "cells": {cell name: result}}
CELLS_DIR = "cells"  # DIR/cells/<task>/<start>/k<k>_s<seed>: one training run directory per cell
CELL_FACTS = "cell.json"  # the driver's record of a cell's launches (command, exit code, wall time)
CELL_LOG = "transfer.log"  # the cell's training job's stdout and stderr
PRETRAINED = "pretrained"  # the starting point without model.init_from
ALL = "all"  # k = the whole train split

# --- the command-line lists --------------------------------------------------------------------


def _items(text: str) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def parse_tasks(text: str, config) -> tuple[str, ...]:
    """``--task=cb,trec`` -> ("cb", "trec"); empty: every task of ``transfer.metrics``."""
    known = list(config.transfer.metrics)
    names = _items(text) or known
    for name in names:
        if name not in known or name not in config.tasks:
            raise UserError(f"--task={text}: unknown task {name!r}; tasks of this config: "
                            f"{', '.join(known)}")
    _refuse_duplicates("--task", names)
    return tuple(names)


def parse_shots(text: str) -> tuple:
    """``--shots=16,64,all`` -> (16, 64, "all"): positive integers (examples per class) or all."""
    shots = []
    for part in _items(text):
        if part != ALL and not (part.isdigit() and int(part) > 0):
            raise UserError(f"--shots={text}: {part!r} is neither a positive integer nor {ALL}; "
                            f"e.g. --shots=16,64,256,all")
        shots.append(part if part == ALL else int(part))
    if not shots:
        raise UserError("--shots is empty; e.g. --shots=16,64,256,all")
    _refuse_duplicates("--shots", shots)
    return tuple(shots)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds=0,1,2`` -> (0, 1, 2)."""
    parts = _items(text)
    bad = [p for p in parts if not p.isdigit()]
    if bad or not parts:
        raise UserError(f"--seeds={text}: {bad[0] if bad else 'nothing'!r} is not a seed; give "
                        f"non-negative integers, e.g. --seeds=0,1,2")
    _refuse_duplicates("--seeds", parts)
    return tuple(int(p) for p in parts)


def _refuse_duplicates(flag: str, values: Sequence) -> None:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise UserError(f"{flag} lists {seen[0]!r} twice; list each value once")


@dataclasses.dataclass(frozen=True)
class Start:
    """A starting point: ``pretrained`` (no path), or a run directory's checkpoint."""

    label: str
    path: str = ""  # the run directory (absolute when local); "" = the pretrained encoder
    which: str = ""  # best | latest | a step
    given: str = ""  # the --from entry as typed (recorded in transfer.json)

    @property
    def init_from(self) -> str:
        """The ``model.init_from`` value (empty for pretrained)."""
        return f"{self.path}:{self.which}" if self.path else ""


_LABEL = re.compile(r"^[A-Za-z0-9._+-]+$")


def parse_start(entry: str) -> Start:
    """``[LABEL=]DIR[:best|latest|STEP]`` -> Start (DIR and its suffix read as model.init_from
    reads them); the label defaults to DIR's basename."""
    from mtl_jax.checkpoints.init_from import parse_spec

    label, eq, rest = entry.partition("=")
    if not eq or "/" in label:  # "=" inside DIR itself
        label, rest = "", entry
    path, which = parse_spec(rest)
    remote = "://" in path
    if not remote:
        path = os.path.abspath(os.path.expanduser(path)) if path else ""
        if not path or not os.path.isdir(path):
            raise UserError(f"--from={entry}: run directory {path or '(none)'!r} not found; give "
                            f"[LABEL=]DIR[:best|latest|STEP] of a finished training run")
        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise UserError(f"--from={entry}: {path} has no checkpoints/ (not a training "
                            f"workdir); point at the run directory of python -m mtl_jax.main")
    label = label or os.path.basename(path.rstrip("/"))
    if not _LABEL.match(label) or label == PRETRAINED:
        raise UserError(f"--from={entry}: label {label!r} is not usable (letters, digits, . _ + - "
                        f"only; not {PRETRAINED!r}); name it with LABEL=DIR")
    return Start(label, path, which, entry)


def parse_starts(entries: Sequence[str]) -> list[Start]:
    """``pretrained`` first, then each ``--from`` entry."""
    starts = [Start(PRETRAINED)] + [parse_start(e) for e in entries if e.strip()]
    _refuse_duplicates("--from (labels)", [s.label for s in starts])
    return starts


# --- cells -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    task: str
    start: Start
    k: int | str  # examples per class, or ALL
    seed: int

    @property
    def name(self) -> str:
        """``task/start/k<k>_s<seed>``: its key in transfer.json and its folder under cells/."""
        return f"{self.task}/{self.start.label}/k{self.k}_s{self.seed}"


def plan_cells(tasks: Sequence[str], starts: Sequence[Start], shots: Sequence, seeds: Sequence[int],
               all_seeds: bool = False) -> list[Cell]:
    """Every cell, by task, start, k (``all`` last) and seed; ``all`` runs with the first seed
    only unless ``all_seeds`` (the whole train split varies only in order and initialisation)."""
    ordered = sorted((k for k in shots if k != ALL)) + [k for k in shots if k == ALL]
    return [Cell(task, start, k, seed)
            for task in tasks for start in starts for k in ordered
            for seed in (seeds if k != ALL or all_seeds else seeds[:1])]


def check_starts(config, starts: Sequence[Start], task: str) -> None:
    """Reads every ``--from`` source and maps it, dry, onto the fresh params of a model built from
    the config of a cell of ``task`` (as ``model.init_from`` maps it at the cell's start): an
    incompatible source (another encoder size or vocabulary, other PEFT) is its one init_from
    error line now, before any cell runs. Nothing is trained, compiled or initialised: the fresh
    params are zeros of the model's ``pretrained=False`` parameter shapes (the mapping checks
    paths and shapes only)."""
    sources = [s for s in starts if s.path]
    if not sources:
        return
    if "init_from" not in config.model:
        raise UserError("--from needs the config key model.init_from, which this config does not "
                        "have; drop --from (the pretrained cells run without it)")
    import jax

    from mtl_jax.checkpoints import init_from
    from mtl_jax.models.multitask import build_model

    cell = task_config(config, task)
    model = _ShapesOnly(build_model(cell, [_task_spec(cell, task)]))
    rng = jax.random.key(cell.seed)
    for start in sources:
        source = init_from.read_source(start.init_from)
        init_from.load(model, cell, source, rng)  # raises on any mismatch; the result is dropped
        del source  # the source's params (MiniLM: ~90 MB) before the next one is read


class _ShapesOnly:
    """A model whose ``init_params`` gives zeros of its parameter shapes (``abstract_params``:
    traced, not compiled or run; a MiniLM random init is a compile of seconds)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def init_params(self, rng, pretrained: bool | None = None):
        del rng, pretrained
        import jax
        import numpy as np

        return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), self._model.abstract_params())


def task_config(config, task: str):
    """The config a cell of ``task`` trains with, as far as its model goes: that task only."""
    c = copy.deepcopy(config)
    with c.unlocked():
        for name in [t for t in c.tasks.keys() if t != task]:
            del c.tasks[name]
    return c


def _task_spec(config, task: str):
    """The TaskSpec the cell's run builds (its only task: index 0; label names as the pipeline
    resolves them, from the train split when the definition names none)."""
    from mtl_jax.data import readers
    from mtl_jax.data.pipeline import resolve_label_names
    from mtl_jax.tasks.definitions import task_definitions
    from mtl_jax.tasks.spec import TaskSpec
    from mtl_jax.tasks.types import TASK_TYPES

    definition = task_definitions(config)[task]
    task_type = TASK_TYPES.get(definition.type)
    rows = ({} if definition.label_names or not task_type.uses_label_names
            else {"train": readers.read_split(task, "train", definition)})
    names = resolve_label_names(task, definition, task_type, rows)
    return TaskSpec(task, definition.type, task_type.num_labels(names), 0, names)


class TrainSizes:
    """``sizes(cell)`` -> the number of train examples the cell's run trains on: the task's train
    examples as the data pipeline keeps them (``train_examples``) under the cell's k-shot keys."""

    def __init__(self, config):
        self.config = config
        self._sizes: dict[tuple, int] = {}

    def __call__(self, cell: Cell) -> int:
        from mtl_jax.data.pipeline import train_examples

        key = (cell.task, cell.k, cell.seed)
        if key not in self._sizes:
            c = copy.deepcopy(self.config)
            with c.unlocked():
                for name, value in subset_overrides(cell).items():
                    c.tasks[cell.task][name.rpartition(".")[2]] = value
            self._sizes[key] = len(train_examples(c, cell.task))
        return self._sizes[key]


def budget(config, n_train: int) -> int:
    """Training steps: ``max(transfer.min_steps, ceil(transfer.epochs * n_train / batch))``."""
    t = config.transfer
    return max(int(t.min_steps), math.ceil(t.epochs * n_train / config.train.batch_size))


def cell_overrides(cell: Cell, steps: int) -> dict:
    """What makes the cell's run: its seed (the init, the batch order and the subset), its k,
    its budget (one evaluation and one checkpoint, at the end) and its starting point."""
    overrides = {"seed": cell.seed, "data.shuffle_seed": cell.seed, **subset_overrides(cell),
                 "train.num_steps": steps, "train.eval_every": steps,
                 "train.checkpoint_every": steps}
    if cell.start.path:
        overrides["model.init_from"] = cell.start.init_from
    return overrides


def subset_overrides(cell: Cell) -> dict:
    """The keys that pick the cell's train subset (TrainSizes counts it with the same keys)."""
    t = cell.task
    return {f"tasks.{t}.k_shot": 0 if cell.k == ALL else cell.k,
            f"tasks.{t}.k_shot_seed": cell.seed}


def user_overrides(task: str, user: Mapping[str, object]) -> dict:
    """The user's --config.* overrides that reach a cell of ``task``: not the driver's own
    (``transfer.*``), not those of another task (its run defines only ``task``)."""
    return {k: v for k, v in user.items()
            if not k.startswith("transfer.")
            and not (k.startswith("tasks.") and not k.startswith(f"tasks.{task}."))}


def formatted(overrides: Mapping[str, object]) -> dict[str, str]:
    return {k: cli.format_value(v) for k, v in sorted(overrides.items())}


def child_command(config_file: str, args: str, cell: Cell, run_dir: str, steps: int,
                  user: Mapping[str, object] = {}) -> list[str]:  # noqa: B006 (read only)
    """``python -m mtl_jax.main`` for one cell: its task through the config's ``tasks=`` arg; the
    cell's own overrides win over the user's."""
    overrides = {**user_overrides(cell.task, user), **cell_overrides(cell, steps)}
    return [sys.executable, "-m", "mtl_jax.main",
            f"--config={config_file}:{with_tasks(args, (cell.task,))}", f"--workdir={run_dir}",
            *[f"--config.{k}={v}" for k, v in formatted(overrides).items()]]


# --- the protocol, as the report states it -----------------------------------------------------

def _model_text(config) -> str:
    if config.model.random_init:
        s = config.model.size
        return (f"a random {s.num_layers}-layer hidden-{s.hidden_size} {config.model.family} "
                f"encoder (model.random_init)")
    return f"`{config.model.name_or_path}`"


def protocol_text(config, user: Mapping[str, object] = {}) -> str:  # noqa: B006 (read only)
    """The protocol paragraph of the report, from the config the cells ran with."""
    o, t, tr = config.optim, config.train, config.transfer
    lengths = sorted({int(d.max_length) for d in config.tasks.values()})
    text = (
        f"Each cell fine-tunes {_model_text(config)} on one task, starting from the plain encoder "
        f"(`{PRETRAINED}`) or from another run's checkpoint (`model.init_from`, "
        f"{'with' if config.model.get('init_from_heads') else 'a new head: not'} its heads). "
        f"Max length {'/'.join(map(str, lengths))}, buckets {tuple(config.data.buckets)}, batch "
        f"{t.batch_size}, {o.name} (lr {o.lr:g}, weight decay {o.weight_decay:g}), "
        f"{100 * o.warmup_fraction:.0f}% warm-up then {o.schedule} decay, "
        f"heads.pooling={config.heads.pooling}. Train data: k examples per class "
        f"(`tasks.<task>.k_shot`; token classification: k sentences) drawn by the cell's seed, "
        f"or the whole train split (`{ALL}`). Budget: max({tr.min_steps}, "
        f"ceil({tr.epochs} x n_train / {t.batch_size})) steps. One evaluation, at the end, on the "
        f"whole evaluated split. The seed sets `seed`, `data.shuffle_seed` and the subset "
        f"(`k_shot_seed`).")
    if user:
        text += " Overrides: " + " ".join(f"`--config.{k}={v}`" for k, v in formatted(user).items())
    return text
