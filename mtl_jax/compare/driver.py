"""The driver: each setup not finished yet trained by ``python -m mtl_jax.main`` in a subprocess,
its launches recorded in ``DIR/runs/<setup>/compare.json``, then the report written."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from typing import Callable, Mapping, NamedTuple, Sequence

from mtl_jax import cli
from mtl_jax.compare.plan import (INIT_FROM, RUN_FACTS, RUNS_DIR, child_command,
                                  init_from_override, merged_overrides, plan, protocol_metrics,
                                  read_json, setup_config, trainable_params)
from mtl_jax.compare.report import write_report
from mtl_jax.errors import STOPPED_EXIT_CODE, UserError
from mtl_jax.training.workdir import write_json

Launcher = Callable[[list, str], int]  # (command, log file path) -> exit code


class Stopped(Exception):
    """The driver got SIGTERM or SIGINT while a job ran; the job saved a checkpoint and exited."""

    def __init__(self, signum: int, returncode: int):
        super().__init__(f"signal {signum}")
        self.signum, self.returncode = signum, returncode


def subprocess_launcher(command: list, log_path: str) -> int:
    """Runs one training job, its stdout and stderr appended to ``log_path``.

    SIGTERM to the driver is passed on to the job (which checkpoints and exits); Ctrl-C reaches the
    job from the terminal already. Either way the driver waits for the job, then raises Stopped.
    """
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


def record_launch(facts_path: str, facts: dict, returncode: int, start: float) -> None:
    """One more launch in the run's compare.json: its exit code, its wall time added."""
    facts.update(launches=facts.get("launches", 0) + 1, returncode=returncode,
                 wall_s=facts.get("wall_s", 0.0) + time.time() - start)
    write_json(facts_path, facts)


def _settings(command: Sequence[str]) -> list[str]:
    """What makes a run: its config and overrides (not the interpreter or where DIR lies: a
    fine-tune's source run counts by its name only)."""
    init_from = f"--config.{INIT_FROM}="
    return [init_from + os.path.basename(a[len(init_from):]) if a.startswith(init_from) else a
            for a in command[1:] if not a.startswith("--workdir=")]


def run_comparison(config, config_file: str, workdir: str,
                   user: Mapping[str, object] = {},  # noqa: B006 (read only)
                   sweeps: Sequence[str] = (), launch: Launcher = subprocess_launcher,
                   count_params: Callable | None = trainable_params,
                   log: Callable[[str], None] = print) -> dict[str, str]:
    """Runs every setup not finished yet, then writes the report; returns setup -> status
    ("skipped" = results.json already there, "done", "failed (exit N)", "blocked (...)" = a
    fine-tune whose source run has not finished, or "stopped (...)" when a signal ended the
    comparison; no report then)."""
    workdir = os.path.abspath(workdir)
    config_file = os.path.abspath(config_file)
    setups = plan(config, sweeps)
    only = selected(config, setups)
    statuses = {}
    for setup in setups:
        if only and setup.name not in only:
            statuses[setup.name] = "not selected"
            continue
        run_dir = os.path.join(workdir, RUNS_DIR, setup.name)
        if os.path.exists(os.path.join(run_dir, "results.json")):
            statuses[setup.name] = "skipped"
            log(f"[compare] {setup.name}: results.json exists, skipped")
            continue
        source = setup.init_from
        if source and not os.path.exists(os.path.join(workdir, RUNS_DIR, source, "results.json")):
            statuses[setup.name] = f"blocked ({source} not finished)"
            log(f"[compare] {setup.name}: blocked: it starts from {source}'s final params and "
                f"{source} has not finished (no {RUNS_DIR}/{source}/results.json); fix {source} "
                f"and rerun the same command")
            continue
        statuses[setup.name] = _run_setup(config, config_file, setup, run_dir, user, launch,
                                          count_params, log)
        if statuses[setup.name].startswith("stopped"):
            return statuses
    write_report(workdir, protocol_metrics(config), [s.name for s in setups])
    return statuses


def selected(config, setups) -> list[str]:
    """``compare.only``: the setup names to run this time (empty: all); each must be planned."""
    only = [n.strip() for n in config.compare.get("only", "").split(",") if n.strip()]
    names = [s.name for s in setups]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise UserError(f"compare.only names {unknown[0]!r}, not a setup of this plan; "
                        f"planned: {', '.join(names)}")
    return only


def _run_setup(config, config_file, setup, run_dir, user, launch, count_params, log) -> str:
    """Launches one setup's job (a fresh start or a resume); returns its status."""
    os.makedirs(run_dir, exist_ok=True)
    command = child_command(setup, config_file, config.compare.args, run_dir, user)
    facts_path = os.path.join(run_dir, RUN_FACTS)
    facts = read_json(facts_path) or {}
    if facts.get("command") and _settings(facts["command"]) != _settings(command):
        raise UserError(f"{run_dir} was started with other settings "
                        f"({' '.join(_settings(facts['command']))}); rerun with those, use a new "
                        "--workdir, or delete that run directory")
    if count_params is not None and "trainable_params" not in facts:
        facts["trainable_params"], facts["total_params"] = count_params(
            setup_config(config, setup, user))
    facts.update(setup=setup.name, tasks=list(setup.tasks), command=command,
                 overrides={k: cli.format_value(v) for k, v in {
                     **merged_overrides(setup, user),
                     **init_from_override(setup, RUNS_DIR)}.items()})  # DIR-relative
    write_json(facts_path, facts)
    job = launch_job(setup.name, command, os.path.join(run_dir, "compare.log"), facts_path, facts,
                     launch, log)
    if job.stopped:
        return job.stopped
    done = job.code == 0 and os.path.exists(os.path.join(run_dir, "results.json"))
    status = "done" if done else f"failed (exit {job.code})"
    log(f"[compare] {setup.name}: {status} in {time.time() - job.start:.0f}s")
    return status


class Job(NamedTuple):
    """One finished launch: its exit code, and its status when a signal stopped it."""

    code: int
    stopped: str  # "stopped (signal N)" (the driver's) or "stopped (exit 75)" (the job's); "" else
    start: float  # time.time() at the launch


def launch_job(name: str, command: list, log_path: str, facts_path: str, facts: dict,
               launch: Launcher, log: Callable[[str], None], prefix: str = "[compare]",
               detail: str = "") -> Job:
    """Launches one run's job (a fresh start or a resume; compare's setups, transfer's cells),
    its launch recorded in ``facts`` (also when stopped: its wall time counts); a stop is logged
    with how to resume. Whether the run finished is the caller's to judge."""
    log(f"{prefix} {name}: {'resuming' if facts.get('launches') else 'starting'}{detail} "
        f"(log: {log_path})")
    start = time.time()
    try:
        code = launch(command, log_path)
    except Stopped as stop:  # the launch still counts: its wall time is part of the run's
        record_launch(facts_path, facts, stop.returncode, start)
        log(f"{prefix} {name}: stopped by signal {stop.signum} after "
            f"{time.time() - start:.0f}s; its job saved a checkpoint; rerun the same command "
            "to resume")
        return Job(stop.returncode, f"stopped (signal {stop.signum})", start)
    record_launch(facts_path, facts, code, start)
    if code == STOPPED_EXIT_CODE:  # the job alone was signalled: checkpointed, resumable
        log(f"{prefix} {name}: its job was stopped by a signal after "
            f"{time.time() - start:.0f}s and saved a checkpoint; rerun the same command to "
            "resume")
        return Job(code, f"stopped (exit {code})", start)
    return Job(code, "", start)
