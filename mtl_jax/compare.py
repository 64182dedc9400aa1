"""Single-task vs multi-task vs PEFT on the same tasks and budget, and the report that compares them.

  python -m mtl_jax.compare --config=configs/compare.py[:tiny] --workdir=DIR \
      [--config.KEY=VALUE ...] [--sweep='optim.lr=3e-5,5e-5' ...] [--report_only | --publish=DEST]

Each setup is its own run directory ``DIR/runs/<setup>``, trained by ``python -m mtl_jax.main`` in
a subprocess (isolated, and resumable on its own: the job restarts from its latest checkpoint).
Running the command again resumes the comparison: a setup whose results.json exists is skipped, a
half-done one is relaunched (and resumes); SIGTERM or Ctrl-C stops the driver once the running
job has saved a checkpoint (its time still counted). Then ``DIR/report.md`` and its PNG plots are
written, from each run's results.json / metrics.jsonl only (plus ``DIR/reference/<task>/`` from
bench/hf_reference.py when present). ``--publish=docs/results`` copies the finished runs' small
files (no checkpoints) into ``docs/results/`` and writes ``docs/results.md`` from them: the report
in the repo, reproducible from what it commits, and the seed of a comparison resumed elsewhere.

Setups (``compare.setups``): ``single`` (one single-task run per task), ``hard``, ``soft``,
``prefix``, ``adapters``, ``lora``; each ``--sweep=KEY=V1,V2`` value adds one setup on top of
``compare.sweep_base``. ``--config.*`` overrides given here go to every run.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

from mtl_jax.errors import STOPPED_EXIT_CODE, UserError
from mtl_jax.registry import Registry
from mtl_jax.training.workdir import write_json

RUNS_DIR = "runs"
REFERENCE_DIR = "reference"
RUN_FACTS = "compare.json"  # the driver's record of a run: command, launches, wall time
REPORT = "report.md"
NOTES = "notes.md"  # DIR/notes.md: hand-written text the report starts with
PUBLISHED_FILES = ("results.json", "results.md", "metrics.jsonl", "compare.json")
BAR_PLOT = "metrics_by_setup.png"
CURVE_PLOT = "validation_curves.png"
PROGRESS_PLOT = "validation_curves_by_progress.png"
SINGLE_COMBINED = "single-task (all)"
REFERENCE_ROW = "HF PyTorch single-task (reference)"


# --- setups -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
    """One run of the comparison: its tasks and the config overrides that make it."""

    name: str
    tasks: tuple[str, ...]
    overrides: Mapping[str, object]
    sweep: tuple = ()  # (key, value) of a --sweep setup: applied after the user's overrides


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


def _multi(name: str, **overrides):
    """A multi-task setup on every task; ``peft_lr=True`` sets optim.lr to compare.peft_lr."""
    peft_lr = overrides.pop("peft_lr", False)

    def make(config):
        o = {k.replace("__", "."): v for k, v in overrides.items()}
        if peft_lr:
            o["optim.lr"] = float(config.compare.peft_lr)
        return [Setup(name, _tasks(config), o)]
    SETUP_KINDS.register(name, make)


SETUP_KINDS.register("single", lambda config: [
    Setup(f"single_{t}", (t,), {"sharing.mode": "hard", "peft.kind": "none"}) for t in _tasks(config)])
_multi("hard", sharing__mode="hard", peft__kind="none")
_multi("soft", sharing__mode="soft", peft__kind="none", data__batch_mode="homogeneous")
_multi("prefix", sharing__mode="hard", peft__kind="prefix", peft_lr=True)
_multi("adapters", sharing__mode="hard", peft__kind="adapter", peft_lr=True)
_multi("lora", sharing__mode="hard", peft__kind="lora", peft_lr=True)


def parse_sweep(spec: str, config) -> tuple[str, list]:
    """``"optim.lr=3e-5,5e-5"`` -> ("optim.lr", [3e-05, 5e-05]), typed like the config field."""
    key, eq, values = spec.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not eq or not values.strip():
        raise UserError(f"--sweep={spec!r} needs KEY=V1,V2,..., e.g. --sweep='optim.lr=3e-5,5e-5'")
    current = _lookup(config, key)
    return key, [coerce(current, v.strip(), key) for v in values.split(",") if v.strip()]


def plan(config, sweeps: Sequence[str] = ()) -> list[Setup]:
    """The setups of ``compare.setups`` in order, then one per sweep value."""
    setups = []
    for kind in (k.strip() for k in config.compare.setups.split(",") if k.strip()):
        setups += SETUP_KINDS.get(kind)(config)
    base_kind = config.compare.sweep_base
    for spec in sweeps:
        key, values = parse_sweep(spec, config)
        base = SETUP_KINDS.get(base_kind)(config)
        if len(base) != 1:
            raise UserError(f"compare.sweep_base={base_kind!r} makes {len(base)} runs; use one "
                            f"multi-task setup (hard, soft, prefix, adapters, lora)")
        for value in values:
            name = _safe_name(f"{base[0].name}_{key}={format_value(value)}")
            setups.append(Setup(name, base[0].tasks, base[0].overrides, (key, value)))
    names = [s.name for s in setups]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"setup {duplicated[0]!r} appears twice; list each setup and sweep value once")
    return setups


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


# --- config values on the command line ----------------------------------------------------------

def _lookup(config, dotted: str):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            from mtl_jax import cli

            near = cli.closest_keys(dotted, cli.config_keys(config))
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UserError(f"unknown config key {dotted!r}{hint}") from None
    return node


def coerce(current, text: str, key: str = "value"):
    """``text`` parsed as the type of the config field's ``current`` value."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, (tuple, list)):
            return tuple(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError):
        raise UserError(f"bad value {text!r} for {key}: expected {type(current).__name__} "
                        f"(current {current!r})") from None
    return text


def format_value(value) -> str:
    """A config value as ``--config.KEY=`` text that absl parses back to the same value."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def merged_overrides(setup: Setup, user: Mapping[str, object]) -> dict:
    """The setup's own overrides, then the user's --config.* overrides, then a sweep's value
    (a sweep key wins over the user's override of the same key: the sweep is the point of the run).
    """
    return {**setup.overrides, **user, **dict([setup.sweep] if setup.sweep else [])}


def with_tasks(args: str, tasks: Sequence[str]) -> str:
    """The config ``:arg`` string with its ``tasks=`` part replaced by ``tasks``."""
    parts = [p for p in args.split(",") if p and not p.startswith("tasks=")]
    return ",".join(parts + ["tasks=" + "+".join(tasks)])


def child_command(setup: Setup, config_file: str, args: str, run_dir: str,
                  user: Mapping[str, object]) -> list[str]:
    """``python -m mtl_jax.main`` for one setup (its tasks through the config's ``tasks=`` arg)."""
    overrides = merged_overrides(setup, user)
    return [sys.executable, "-m", "mtl_jax.main", f"--config={config_file}:{with_tasks(args, setup.tasks)}",
            f"--workdir={run_dir}",
            *[f"--config.{k}={format_value(v)}" for k, v in sorted(overrides.items())]]


def setup_config(config, setup: Setup, user: Mapping[str, object] = {}):  # noqa: B006 (read only)
    """The config a setup's run trains with (its tasks only, every override applied)."""
    c = copy.deepcopy(config)
    with c.unlocked():
        for name in [t for t in c.tasks.keys() if t not in setup.tasks]:
            del c.tasks[name]
        for key, value in merged_overrides(setup, user).items():
            parent, _, leaf = key.rpartition(".")
            node = _lookup(c, parent) if parent else c
            node[leaf] = value
    return c


def trainable_params(config) -> tuple[int, int]:
    """(trainable, total) parameters of the model ``config`` builds; shapes only, no weights read."""
    import jax
    import numpy as np

    from mtl_jax.models.multitask import build_model
    from mtl_jax.models.summary import trainable_mask
    from mtl_jax.tasks.definitions import task_definitions
    from mtl_jax.tasks.spec import TaskSpec
    from mtl_jax.tasks.types import TASK_TYPES

    specs = [TaskSpec(name, d.type, TASK_TYPES.get(d.type).num_labels(tuple(d.label_names)), i,
                      tuple(d.label_names))
             for i, (name, d) in enumerate(task_definitions(config).items())]
    model = build_model(config, specs)
    params = model.abstract_params()
    sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
    mask = jax.tree.leaves(trainable_mask(params, config.peft.kind))
    return sum(s for s, m in zip(sizes, mask) if m), sum(sizes)


# --- running the setups -------------------------------------------------------------------------

Launcher = Callable[[list, str], int]  # (command, log file path) -> exit code


class Stopped(Exception):
    """The driver got SIGTERM or SIGINT while a job ran; the job has saved a checkpoint and exited."""

    def __init__(self, signum: int, returncode: int):
        super().__init__(f"signal {signum}")
        self.signum, self.returncode = signum, returncode


def subprocess_launcher(command: list, log_path: str) -> int:
    """Runs one training job, its stdout and stderr appended to ``log_path``.

    SIGTERM to the driver is passed on to the job (which checkpoints and exits); Ctrl-C reaches the
    job from the terminal already. Either way the driver waits for the job, then raises Stopped.
    """
    import shlex
    import signal

    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        received = []

        def on_signal(signum, frame):
            received.append(signum)
            if signum == signal.SIGTERM:
                job.send_signal(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = job.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if received:
        raise Stopped(received[0], code)
    return code


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _record_launch(facts_path: str, facts: dict, returncode: int, start: float) -> None:
    facts.update(launches=facts.get("launches", 0) + 1, returncode=returncode,
                 wall_s=facts.get("wall_s", 0.0) + time.time() - start)
    write_json(facts_path, facts)


def _settings(command: Sequence[str]) -> list[str]:
    """What makes a run: its config and overrides (not the interpreter or where DIR lies)."""
    return [a for a in command[1:] if not a.startswith("--workdir=")]


def run_comparison(config, config_file: str, workdir: str, user: Mapping[str, object] = {},  # noqa: B006
                   sweeps: Sequence[str] = (), launch: Launcher = subprocess_launcher,
                   count_params: Callable | None = trainable_params,
                   log: Callable[[str], None] = print) -> dict[str, str]:
    """Runs every setup not finished yet, then writes the report; returns setup -> status
    ("skipped" = results.json already there, "done", or "failed (exit N)")."""
    workdir = os.path.abspath(workdir)
    config_file = os.path.abspath(config_file)
    setups = plan(config, sweeps)
    statuses = {}
    for setup in setups:
        run_dir = os.path.join(workdir, RUNS_DIR, setup.name)
        if os.path.exists(os.path.join(run_dir, "results.json")):
            statuses[setup.name] = "skipped"
            log(f"[compare] {setup.name}: results.json exists, skipped")
            continue
        os.makedirs(run_dir, exist_ok=True)
        command = child_command(setup, config_file, config.compare.args, run_dir, user)
        facts_path = os.path.join(run_dir, RUN_FACTS)
        facts = _read_json(facts_path) or {}
        if facts.get("command") and _settings(facts["command"]) != _settings(command):
            raise UserError(f"{run_dir} was started with other settings ({' '.join(_settings(facts['command']))}); "
                            f"rerun with those, use a new --workdir, or delete that run directory")
        if count_params is not None and "trainable_params" not in facts:
            facts["trainable_params"], facts["total_params"] = count_params(setup_config(config, setup, user))
        facts.update(setup=setup.name, tasks=list(setup.tasks), command=command,
                     overrides={k: format_value(v) for k, v in merged_overrides(setup, user).items()})
        write_json(facts_path, facts)
        log(f"[compare] {setup.name}: {'resuming' if facts.get('launches') else 'starting'} "
            f"(log: {os.path.join(run_dir, 'compare.log')})")
        start = time.time()
        try:
            code = launch(command, os.path.join(run_dir, "compare.log"))
        except Stopped as stop:  # the launch still counts: its wall time is part of the run's
            _record_launch(facts_path, facts, stop.returncode, start)
            statuses[setup.name] = f"stopped (signal {stop.signum})"
            log(f"[compare] {setup.name}: stopped by signal {stop.signum} after "
                f"{time.time() - start:.0f}s; its job saved a checkpoint; rerun the same command "
                "to resume")
            return statuses
        _record_launch(facts_path, facts, code, start)
        if code == STOPPED_EXIT_CODE:  # the job alone was signalled: checkpointed, resumable
            statuses[setup.name] = f"stopped (exit {code})"
            log(f"[compare] {setup.name}: its job was stopped by a signal after "
                f"{time.time() - start:.0f}s and saved a checkpoint; rerun the same command to "
                "resume")
            return statuses
        done = code == 0 and os.path.exists(os.path.join(run_dir, "results.json"))
        statuses[setup.name] = "done" if done else f"failed (exit {code})"
        log(f"[compare] {setup.name}: {statuses[setup.name]} in {time.time() - start:.0f}s")
    write_report(workdir, protocol_metrics(config), [s.name for s in setups])
    return statuses


# --- the report ---------------------------------------------------------------------------------

@dataclasses.dataclass
class RunSummary:
    """What the report shows of one run (or of several single-task runs combined)."""

    name: str
    final: dict  # task -> the task's primary metric at the end of training
    best: dict  # task -> the primary metric at the best evaluation
    trainable_params: float | None = None
    wall_s: float | None = None
    examples_s: float | None = None
    curves: dict = dataclasses.field(default_factory=dict)  # task -> [(step, value)]
    # task -> [(step / final step, value)]: every setup sees the same epochs of each task's data by
    # its last step, so this axis lines runs of different lengths up at equal data seen.
    progress: dict = dataclasses.field(default_factory=dict)
    overrides: dict = dataclasses.field(default_factory=dict)


def _median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def load_run(run_dir: str, name: str, metrics: Mapping[str, str]) -> RunSummary | None:
    """A run directory's summary (None until its results.json exists).

    Figures come from results.json (final/best metrics, and ``trainable_params`` /
    ``examples_per_s`` / ``wall_s`` when the job wrote them), else from the driver's compare.json
    (trainable parameters counted from the config, wall time of the launches) and metrics.jsonl
    (median of ``train/examples_per_s``: robust to the first interval, which includes compiling).
    """
    from mtl_jax.training.metrics_writer import read_metrics

    results = _read_json(os.path.join(run_dir, "results.json"))
    if results is None:
        return None
    facts = _read_json(os.path.join(run_dir, RUN_FACTS)) or {}
    events = read_metrics(os.path.join(run_dir, "metrics.jsonl"))

    def pick(source: dict) -> dict:
        return {t: float(source[t][m]) for t, m in metrics.items() if m in source.get(t, {})}

    curves = {}
    for task, metric in metrics.items():
        by_step = {int(e["step"]): float(e[f"eval/{task}/{metric}"]) for e in events
                   if f"eval/{task}/{metric}" in e}
        if by_step:
            curves[task] = sorted(by_step.items())
    final_step = results.get("final_step")
    progress = ({t: [(step / final_step, v) for step, v in points] for t, points in curves.items()}
                if final_step else {})
    examples_s = results.get("examples_per_s")
    if examples_s is None:
        examples_s = _median([e.get("train/examples_per_s") for e in events])
    return RunSummary(
        name=name, final=pick(results.get("final", {})), best=pick(results.get("best", {})),
        trainable_params=results.get("trainable_params", facts.get("trainable_params")),
        wall_s=facts.get("wall_s", results.get("wall_s")), examples_s=examples_s, curves=curves,
        progress=progress, overrides=facts.get("overrides", {}))


def combine(name: str, runs: Sequence[RunSummary]) -> RunSummary:
    """Several single-task runs as one row: each task from its own run; parameters and wall time
    summed (one model per task); examples/s the wall-time-weighted mean."""
    out = RunSummary(name, {}, {})
    for r in runs:
        out.final.update(r.final)
        out.best.update(r.best)
        out.curves.update(r.curves)
        out.progress.update(r.progress)
    if runs and all(r.trainable_params is not None for r in runs):
        out.trainable_params = sum(r.trainable_params for r in runs)
    if runs and all(r.wall_s is not None for r in runs):
        out.wall_s = sum(r.wall_s for r in runs)
        if all(r.examples_s is not None for r in runs) and out.wall_s > 0:
            out.examples_s = sum(r.examples_s * r.wall_s for r in runs) / out.wall_s
    return out


def mean_metric(values: Mapping[str, float], tasks: Sequence[str]) -> float | None:
    """The unweighted mean over ``tasks``; None unless every task has a value (no partial means)."""
    if not tasks or any(t not in values for t in tasks):
        return None
    return sum(values[t] for t in tasks) / len(tasks)


def collect_rows(workdir: str, metrics: Mapping[str, str], order: Sequence[str] = ()) -> list[RunSummary]:
    """Every finished run under DIR/runs (``order`` first, then the rest by name), the combined
    single-task row after the last single-task run, and the reference row last."""
    runs_dir = os.path.join(workdir, RUNS_DIR)
    found = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
    names = [n for n in order if n in found] + [n for n in found if n not in order]
    rows, singles = [], []
    for name in names:
        run = load_run(os.path.join(runs_dir, name), name, metrics)
        if run is None:
            continue
        rows.append(run)
        if name.startswith("single_"):
            singles.append(run)
    if len(singles) > 1:
        at = rows.index(singles[-1]) + 1
        rows.insert(at, combine(SINGLE_COMBINED, singles))
    reference = [load_run(os.path.join(workdir, REFERENCE_DIR, t), t, {t: m})
                 for t, m in metrics.items()]
    reference = [r for r in reference if r is not None]
    if reference:
        rows.append(combine(REFERENCE_ROW, reference))
    return rows


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _params(n) -> str:
    return "-" if n is None else f"{n / 1e6:.3g}M"


def _minutes(s) -> str:
    return "-" if s is None else f"{s / 60:.1f} min"


def _rate(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def table(rows: Sequence[RunSummary], metrics: Mapping[str, str], which: str = "final") -> str:
    """The markdown table: one row per setup, one column per task metric (x100), the mean,
    trainable parameters, wall time and examples/s."""
    tasks = list(metrics)
    head = ["setup", *[f"{t} {m}" for t, m in metrics.items()], "mean", "trainable params",
            "wall time", "examples/s"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in rows:
        values = getattr(r, which)
        cells = [r.name, *[_pct(values.get(t)) for t in tasks], _pct(mean_metric(values, tasks)),
                 _params(r.trainable_params), _minutes(r.wall_s), _rate(r.examples_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(workdir: str, metrics: Mapping[str, str], order: Sequence[str] = (),
                 report_path: str | None = None) -> str:
    """The report (default DIR/report.md) and its two PNGs in DIR, from the run directories;
    ``DIR/notes.md`` (hand-written: protocol, commands, what it shows), when present, comes first.
    Returns the report's path."""
    os.makedirs(workdir, exist_ok=True)
    report_path = report_path or os.path.join(workdir, REPORT)
    rows = collect_rows(workdir, metrics, order)
    plot_bars(rows, metrics, os.path.join(workdir, BAR_PLOT))
    plot_curves(rows, metrics, os.path.join(workdir, CURVE_PLOT))
    plot_curves(rows, metrics, os.path.join(workdir, PROGRESS_PLOT), by_progress=True)
    link = lambda name: os.path.relpath(os.path.join(workdir, name),  # noqa: E731
                                        os.path.dirname(os.path.abspath(report_path)))
    notes = _read_text(os.path.join(workdir, NOTES))
    metric_names = ", ".join(f"{t} {m}" for t, m in metrics.items())
    lines = [
        "# Single-task vs multi-task vs PEFT", "",
        *([notes.strip(), ""] if notes else []),
        "## At the end of training", "",
        f"Validation metrics x100 at the end of training ({metric_names}); mean = unweighted mean "
        "over the tasks (only for rows with every task). Trainable parameters: every parameter for "
        "full fine-tuning (soft sharing: one encoder per task), heads + prefix/adapter/LoRA "
        "parameters for PEFT (the frozen encoder excluded). Wall time: the training "
        "job's launches end to end (data loading, compiling, evaluation included); examples/s: "
        "median of the job's logged training throughput. "
        f"`{SINGLE_COMBINED}` takes each task from its own single-task run (parameters and time "
        "summed).", "",
        table(rows, metrics, "final"), "",
        "## At the best evaluation (by the run's early-stopping metric)", "",
        table(rows, metrics, "best"), "",
        f"![metric by setup]({link(BAR_PLOT)})", "", f"![validation curves]({link(CURVE_PLOT)})", "",
        "The same curves against the share of each run's training steps: every setup has seen the "
        "same epochs of each task's data at the same point of this axis (multi-task runs: in "
        "expectation under proportional sampling).", "",
        f"![validation curves by progress]({link(PROGRESS_PLOT)})", "",
        "## Setups (config overrides of each run)", "",
    ]
    for r in rows:
        if r.overrides:
            lines.append(f"- `{r.name}`: " + " ".join(f"`{k}={v}`" for k, v in sorted(r.overrides.items())))
    with open(report_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return report_path


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def publish(workdir: str, dest: str, metrics: Mapping[str, str], order: Sequence[str] = ()) -> str:
    """Copies what the report reads of every finished run (results, metrics.jsonl, the driver's
    record; no checkpoints) from DIR to DEST/runs/<setup> and DEST/reference/<task>, then writes
    ``DEST.md`` (the report, its plots in DEST) from those copies. The copies are enough to resume
    a comparison elsewhere: ``cp -r DEST/runs DIR2/`` and the finished setups are skipped."""
    copied = 0
    for kind in (RUNS_DIR, REFERENCE_DIR):
        src_root = os.path.join(workdir, kind)
        for name in sorted(os.listdir(src_root)) if os.path.isdir(src_root) else []:
            src = os.path.join(src_root, name)
            if not os.path.exists(os.path.join(src, "results.json")):
                continue  # unfinished: its figures are not final
            os.makedirs(os.path.join(dest, kind, name), exist_ok=True)
            for file in PUBLISHED_FILES:
                if os.path.exists(os.path.join(src, file)):
                    shutil.copyfile(os.path.join(src, file), os.path.join(dest, kind, name, file))
            copied += 1
    if not copied and not os.path.isdir(os.path.join(dest, RUNS_DIR)):
        raise UserError(f"{workdir} has no finished run (no runs/<setup>/results.json); run the "
                        f"comparison first, then --publish")
    return write_report(dest, metrics, order, report_path=dest.rstrip("/") + ".md")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(rows: Sequence[RunSummary], metrics: Mapping[str, str], path: str) -> None:
    """One panel per task metric (and the mean): a bar per setup."""
    plt = _pyplot()
    panels = [(f"{t} {m}", lambda r, t=t: r.final.get(t)) for t, m in metrics.items()]
    panels.append(("mean", lambda r: mean_metric(r.final, list(metrics))))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4), squeeze=False)
    colors = {r.name: f"C{i % 10}" for i, r in enumerate(rows)}  # the curve plots' colours
    if SINGLE_COMBINED in colors:  # its bars already show each single-task run's task
        rows = [r for r in rows if not r.name.startswith("single_")]
    names = [r.name for r in rows]
    for ax, (title, value) in zip(axes[0], panels):
        heights = [100 * v if (v := value(r)) is not None else 0.0 for r in rows]
        ax.bar(range(len(rows)), heights, color=[colors[n] for n in names])
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("validation metric x100")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_series(rows: Sequence[RunSummary], task: str, by_progress: bool = False) -> list[tuple]:
    """(label, colour, points) of each line in ``task``'s panel. A panel holds one single-task
    run: it is drawn as the combined row (its label and colour), which has no line of its own."""
    colors = {r.name: f"C{i % 10}" for i, r in enumerate(rows)}  # the bar plot's colours
    series = []
    for r in rows:
        points = (r.progress if by_progress else r.curves).get(task)
        if r.name == SINGLE_COMBINED or not points:
            continue
        single = r.name.startswith("single_") and SINGLE_COMBINED in colors
        label = SINGLE_COMBINED if single else r.name
        series.append((label, colors[label], points))
    return series


def plot_curves(rows: Sequence[RunSummary], metrics: Mapping[str, str], path: str,
                by_progress: bool = False) -> None:
    """One panel per task: the validation metric over training steps (or over the share of the
    run's steps, ``by_progress``), a line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
    for ax, (task, metric) in zip(axes[0], metrics.items()):
        for label, color, points in curve_series(rows, task, by_progress):
            steps, values = zip(*points)
            ax.plot(steps, [100 * v for v in values], marker="o", ms=3, label=label, color=color)
        ax.set_title(f"{task} {metric}", fontsize=9)
        ax.set_xlabel("share of the run's training steps" if by_progress else "step")
    axes[0][0].set_ylabel("validation metric x100")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=7)
    fig.tight_layout(rect=(0, 0.12 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line -------------------------------------------------------------------------------

def main(argv):
    del argv
    from absl import flags
    from ml_collections.config_flags import config_flags

    from mtl_jax.errors import user_errors

    with user_errors(verbose=flags.FLAGS.verbose):
        config_flag = flags.FLAGS["config"]
        config = config_flag.value
        if "compare" not in config:
            raise UserError("the config has no compare section; use --config=configs/compare.py[:tiny]")
        if not flags.FLAGS.workdir:
            raise UserError("--workdir is not set; pass --workdir=DIR (the comparison's runs and report)")
        order = [s.name for s in plan(config, flags.FLAGS.sweep)]
        if flags.FLAGS.publish:
            path = publish(flags.FLAGS.workdir, flags.FLAGS.publish, protocol_metrics(config), order)
            print(f"[compare] wrote {path}")
            return
        if flags.FLAGS.report_only:
            path = write_report(flags.FLAGS.workdir, protocol_metrics(config), order)
            print(f"[compare] wrote {path}")
            return
        # compare.* steers this driver only; the training jobs get every other override.
        user = {k: v for k, v in config_flags.get_override_values(config_flag).items()
                if not k.startswith("compare.")}
        config_file = config_flags.get_config_filename(config_flag)  # "path.py:arg" -> "path.py"
        config_file = config_file.split(".py:", 1)[0] + ".py" if ".py:" in config_file else config_file
        statuses = run_comparison(config, config_file, flags.FLAGS.workdir, user, flags.FLAGS.sweep)
        if any(s.startswith("stopped") for s in statuses.values()):
            return  # like a training job stopped by a signal: exit 0, the log line says how to resume
        print(f"[compare] wrote {os.path.join(os.path.abspath(flags.FLAGS.workdir), REPORT)}")
        failed = [n for n, s in statuses.items() if s.startswith("failed")]
        if failed:
            raise UserError(f"setup(s) {', '.join(failed)} failed (see DIR/runs/<setup>/compare.log); "
                            f"fix the cause and rerun the same command to resume")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/compare.py[:tiny,tasks=a+b,epochs=N]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Comparison directory (runs/<setup>, report.md, plots).")
    flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2: one more setup per value (on compare.sweep_base).")
    flags.DEFINE_bool("report_only", False, "Only (re)write report.md and the plots from DIR.")
    flags.DEFINE_string("publish", None, "DEST: copy the finished runs' results (no checkpoints) from "
                        "DIR to DEST/ and write the report as DEST.md, e.g. --publish=docs/results.")
    flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from mtl_jax import cli

    _define_flags()
    cli.run(main)
