"""The comparison's plan: its setups, the protocol metrics, and each setup's config and command.

Also the layout of the comparison directory that the driver writes and the report reads.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from mtl_jax import cli
from mtl_jax.errors import UserError
from mtl_jax.models.multitask import build_model
from mtl_jax.models.summary import trainable_mask
from mtl_jax.registry import Registry
from mtl_jax.tasks.definitions import task_definitions
from mtl_jax.tasks.spec import TaskSpec
from mtl_jax.tasks.types import TASK_TYPES

# --- the comparison directory -------------------------------------------------------------------

RUNS_DIR = "runs"  # DIR/runs/<setup>: one training run directory per setup
RUN_FACTS = "compare.json"  # the driver's record of a run: command, launches, wall time
SINGLE_PREFIX = "single_"  # the runs of the "single" setups: single_<task>
SINGLE_COMBINED = "single-task (all)"  # the report's row of every single-task run together
FINE_TUNE = "_ft"  # setup kind <X>_ft: X's final params fine-tuned on each task, runs <X>_ft_<task>
INIT_FROM = "model.init_from"
_FINE_TUNE_RUN = re.compile(rf"^(?P<source>.+?){FINE_TUNE}_(?P<task>.+)$")


def fine_tune_source(run_name: str) -> str | None:
    """The setup X whose fine-tune run ``run_name`` (``<X>_ft_<task>``) is; None for others."""
    match = _FINE_TUNE_RUN.match(run_name)
    return match.group("source") if match else None


def fine_tune_row(source: str) -> str:
    """The report's row of every fine-tune run of ``source`` together."""
    return f"{source} → fine-tune"


def read_json(path: str) -> dict | None:
    """The JSON file at ``path``; None when it is missing or half-written."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# --- setups -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
    """One run of the comparison: its tasks and the config overrides that make it."""

    name: str
    tasks: tuple[str, ...]
    overrides: Mapping[str, object]
    sweep: tuple = ()  # (key, value) of a --sweep setup: applied after the user's overrides
    init_from: str = ""  # the setup whose final params this run starts from (runs/<it>:latest)


# compare.setups entry -> fn(config) -> [Setup]
SETUP_KINDS: Registry[Callable] = Registry("comparison setup")


def _tasks(config) -> tuple[str, ...]:
    """The config's tasks in protocol order (``compare.metrics`` order; ConfigDict sorts keys)."""
    return tuple(protocol_metrics(config))


def protocol_metrics(config) -> dict[str, str]:
    """task -> reported metric, in the order of the config arg's ``tasks=`` list."""
    metrics = dict(config.compare.metrics)
    listed = next((p[len("tasks="):].split("+") for p in config.compare.args.split(",")
                   if p.startswith("tasks=")), [])
    order = [t for t in listed if t in metrics] + sorted(t for t in metrics if t not in listed)
    return {t: metrics[t] for t in order}


def mean_metric(values: Mapping[str, float], tasks: Sequence[str]) -> float | None:
    """The unweighted mean over ``tasks``; None unless every task has a value (no partial means)."""
    if not tasks or any(t not in values for t in tasks):
        return None
    return sum(values[t] for t in tasks) / len(tasks)


def _multi(name: str, **overrides):
    """A multi-task setup on every task, and its fine-tune kind ``<name>_ft``;
    ``peft_lr=True`` sets optim.lr to compare.peft_lr."""
    peft_lr = overrides.pop("peft_lr", False)

    def make(config):
        o = {k.replace("__", "."): v for k, v in overrides.items()}
        if peft_lr:
            o["optim.lr"] = float(config.compare.peft_lr)
        return [Setup(name, _tasks(config), o)]
    SETUP_KINDS.register(name, make)
    register_fine_tune(name)


def register_fine_tune(source: str) -> None:
    """Setup kind ``<source>_ft``: per task, exactly that task's single-task run (overrides,
    budget, lr) started from the final params of the multi-task setup ``source``."""
    def make(config):
        origin = SETUP_KINDS.get(source)(config)
        if len(origin) != 1:
            raise UserError(f"{source}{FINE_TUNE}: {source} makes {len(origin)} runs; fine-tune "
                            f"from a multi-task setup")
        return [dataclasses.replace(s, name=f"{origin[0].name}{FINE_TUNE}_{s.tasks[0]}",
                                    init_from=origin[0].name)
                for s in SETUP_KINDS.get("single")(config)]
    SETUP_KINDS.register(f"{source}{FINE_TUNE}", make)


SETUP_KINDS.register("single", lambda config: [
    Setup(f"{SINGLE_PREFIX}{t}", (t,), {"sharing.mode": "hard", "peft.kind": "none"})
    for t in _tasks(config)])
_multi("hard", sharing__mode="hard", peft__kind="none")
_multi("soft", sharing__mode="soft", peft__kind="none", data__batch_mode="homogeneous")
_multi("prefix", sharing__mode="hard", peft__kind="prefix", peft_lr=True)
_multi("adapters", sharing__mode="hard", peft__kind="adapter", peft_lr=True)
_multi("lora", sharing__mode="hard", peft__kind="lora", peft_lr=True)




def _meta_weights(config):
    """Hard sharing with meta-learned task weights (``compare.meta_weights`` settings)."""
    o = {"sharing.mode": "hard", "peft.kind": "none", "weighting.name": "meta"}
    o.update({f"weighting.{k}": v for k, v in config.compare.meta_weights.items()})
    return [Setup("meta_weights", _tasks(config), o)]


SETUP_KINDS.register("meta_weights", _meta_weights)
register_fine_tune("meta_weights")


def _meta_trainer(name: str, algorithm: str, query_batches: int, **outer):
    """A meta-learning setup (``train.algorithm``) on every task, and its ``<name>_ft``.

    Its budget is the multi-task run's examples: an outer step reads tasks_per_step x
    (inner_steps + query_batches) x inner_batch_size rows (``compare.meta``), so it takes
    ceil(num_steps x batch_size / rows) outer steps, evaluated as often as the others.
    """
    def make(config):
        m = config.compare.meta
        rows = m.tasks_per_step * (m.inner_steps + query_batches) * m.inner_batch_size
        steps = max(1, math.ceil(config.train.num_steps * config.train.batch_size / rows))
        evals = max(1, config.train.num_steps // config.train.eval_every)
        o = {"sharing.mode": "hard", "peft.kind": "none", "train.algorithm": algorithm,
             "train.num_steps": steps, "train.eval_every": max(1, steps // evals),
             "train.checkpoint_every": max(1, steps // evals)}
        o.update({f"meta.{k}": v for k, v in m.items()})
        o.update({k.replace("__", "."): v for k, v in outer.items()})
        return [Setup(name, _tasks(config), o)]
    SETUP_KINDS.register(name, make)
    register_fine_tune(name)


# Reptile's own outer rule: theta += eps (mean phi - theta), eps annealed linearly from 1 to 0
# (Nichol et al. 2018); FOMAML's outer step is the protocol's AdamW on the mean query gradient.
_meta_trainer("reptile", "reptile", 0, optim__name="sgd", optim__lr=1.0, optim__b1=0.0,
              optim__weight_decay=0.0, optim__clip_norm=0.0, optim__warmup_fraction=0.0)
_meta_trainer("fomaml", "fomaml", 1)


def parse_sweep(spec: str, config) -> tuple[str, list]:
    """``"optim.lr=3e-5,5e-5"`` -> ("optim.lr", [3e-05, 5e-05]), typed like the config field."""
    key, eq, values = spec.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not eq or not values.strip():
        raise UserError(f"--sweep={spec!r} needs KEY=V1,V2,..., e.g. --sweep='optim.lr=3e-5,5e-5'")
    current = cli.config_value(config, key)
    return key, [cli.parse_value(current, v.strip(), key) for v in values.split(",") if v.strip()]


def plan(config, sweeps: Sequence[str] = ()) -> list[Setup]:
    """The setups of ``compare.setups`` in order, then one per sweep value."""
    setups = []
    for kind in (k.strip() for k in config.compare.setups.split(",") if k.strip()):
        setups += SETUP_KINDS.get(kind)(config)
    for spec in sweeps:
        setups += _sweep_setups(config, spec)
    names = [s.name for s in setups]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"setup {duplicated[0]!r} appears twice; list each setup and sweep value "
                        "once")
    for i, s in enumerate(setups):  # the driver runs the plan in order: the source first
        if s.init_from and s.init_from not in names[:i]:
            raise UserError(f"setup {s.name} fine-tunes from {s.init_from}, which compare.setups "
                            f"does not list before it; list {s.init_from} first, e.g. "
                            f"compare.setups={s.init_from},{s.init_from}{FINE_TUNE}")
    return setups


def _sweep_setups(config, spec: str) -> list[Setup]:
    """One setup per value of a ``--sweep=KEY=V1,V2`` on top of ``compare.sweep_base``."""
    key, values = parse_sweep(spec, config)
    base_kind = config.compare.sweep_base
    base = SETUP_KINDS.get(base_kind)(config)
    if len(base) != 1:
        raise UserError(f"compare.sweep_base={base_kind!r} makes {len(base)} runs; use one "
                        f"multi-task setup (hard, soft, prefix, adapters, lora)")
    return [Setup(_safe_name(f"{base[0].name}_{key}={cli.format_value(value)}"), base[0].tasks,
                  base[0].overrides, (key, value))
            for value in values]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


# --- a setup's run ------------------------------------------------------------------------------

def merged_overrides(setup: Setup, user: Mapping[str, object]) -> dict:
    """The setup's own overrides, then the user's --config.* overrides, then a sweep's value
    (a sweep key wins over the user's override of the same key: the sweep is the point of the run).
    """
    return {**setup.overrides, **user, **dict([setup.sweep] if setup.sweep else [])}


def with_tasks(args: str, tasks: Sequence[str]) -> str:
    """The config ``:arg`` string with its ``tasks=`` part replaced by ``tasks``."""
    parts = [p for p in args.split(",") if p and not p.startswith("tasks=")]
    return ",".join(parts + ["tasks=" + "+".join(tasks)])


def init_from_override(setup: Setup, runs_dir: str) -> dict:
    """``model.init_from`` of a fine-tune setup: its source's run in ``runs_dir`` (latest
    checkpoint, the end of its training); {} for other setups."""
    if not setup.init_from:
        return {}
    return {INIT_FROM: f"{os.path.join(runs_dir, setup.init_from)}:latest"}


def child_command(setup: Setup, config_file: str, args: str, run_dir: str,
                  user: Mapping[str, object]) -> list[str]:
    """``python -m mtl_jax.main`` for one setup (its tasks through the config's ``tasks=`` arg;
    a fine-tune's source run lies beside ``run_dir``)."""
    overrides = {**merged_overrides(setup, user),
                 **init_from_override(setup, os.path.dirname(run_dir))}
    return [sys.executable, "-m", "mtl_jax.main",
            f"--config={config_file}:{with_tasks(args, setup.tasks)}", f"--workdir={run_dir}",
            *[f"--config.{k}={cli.format_value(v)}" for k, v in sorted(overrides.items())]]


def setup_config(config, setup: Setup, user: Mapping[str, object] = {}):  # noqa: B006 (read only)
    """The config a setup's run trains with (its tasks only, every override applied)."""
    c = copy.deepcopy(config)
    with c.unlocked():
        for name in [t for t in c.tasks.keys() if t not in setup.tasks]:
            del c.tasks[name]
        for key, value in merged_overrides(setup, user).items():
            parent, _, leaf = key.rpartition(".")
            node = cli.config_value(c, parent) if parent else c
            node[leaf] = value
    return c


def trainable_params(config) -> tuple[int, int]:
    """(trainable, total) parameters of the model ``config`` builds (shapes only, no weights)."""
    specs = [TaskSpec(name, d.type, TASK_TYPES.get(d.type).num_labels(tuple(d.label_names)), i,
                      tuple(d.label_names))
             for i, (name, d) in enumerate(task_definitions(config).items())]
    model = build_model(config, specs)
    params = model.abstract_params()
    sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
    mask = jax.tree.leaves(trainable_mask(params, config.peft.kind))
    return sum(s for s, m in zip(sizes, mask) if m), sum(sizes)
