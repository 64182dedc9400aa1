"""The driver: each cell not recorded yet trained by ``python -m mtl_jax.main`` in a subprocess
(compare's launcher: SIGTERM reaches the job, which checkpoints), its result recorded in
``DIR/transfer.json`` and its checkpoints deleted, then the report written."""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable, Mapping, Sequence

from mtl_jax.compare.driver import launch_job, subprocess_launcher
from mtl_jax.compare.plan import read_json, with_tasks
from mtl_jax.errors import UserError
from mtl_jax.training.workdir import write_json
from mtl_jax.transfer.plan import (CELL_FACTS, CELL_LOG, CELLS_DIR, RECORD, Cell, TrainSizes,
                                   budget, child_command, formatted, protocol_text,
                                   user_overrides)
from mtl_jax.transfer.report import write_report

Launcher = Callable[[list, str], int]  # (command, log file path) -> exit code


def load_record(workdir: str) -> dict:
    """DIR/transfer.json, or an empty record; a file that is not a record is refused."""
    path = os.path.join(workdir, RECORD)
    record = read_json(path)
    if record is None:
        if os.path.exists(path):
            raise UserError(f"{path} is not valid JSON; restore it (e.g. from the published copy) "
                            f"or delete it to rerun every cell")
        return {"protocol": {}, "cells": {}}
    if not isinstance(record.get("cells"), dict):
        raise UserError(f"{path} has no \"cells\" mapping; it is not a transfer record")
    record.setdefault("protocol", {})
    return record


def save_record(workdir: str, record: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, RECORD), record)  # atomic: the old record or the new one


def update_protocol(record: dict, config, user: Mapping[str, object]) -> None:
    """The protocol as this invocation runs it (each task's metric and evaluated split added)."""
    p = record["protocol"]
    p.update(text=protocol_text(config, user), args=config.transfer.args)
    p["metrics"] = {**p.get("metrics", {}), **dict(config.transfer.metrics)}
    p["evaluated"] = {**p.get("evaluated", {}), **dict(config.transfer.evaluated)}


def run_transfer(config, config_file: str, workdir: str, cells: Sequence[Cell],
                 user: Mapping[str, object] = {},  # noqa: B006 (read only)
                 launch: Launcher = subprocess_launcher,
                 log: Callable[[str], None] = print) -> dict[str, str]:
    """Runs every cell not recorded yet, then writes the report; returns cell name -> status
    ("skipped", "done", "failed (...)", or "stopped (...)" when a signal ended the study).
    A cell's training job exiting 2 (a user error, which every later cell would repeat) ends the
    study too. Cells recorded (or launched) with other settings are refused before anything is
    written or launched."""
    workdir = os.path.abspath(workdir)
    record = load_record(workdir)
    study = _Study(config, os.path.abspath(config_file), workdir, dict(user), record,
                   TrainSizes(config), launch, log)
    for cell in cells:
        study.check_settings(cell)
    update_protocol(record, config, user)
    save_record(workdir, record)
    statuses = {}
    for cell in cells:
        statuses[cell.name] = status = study.run(cell)
        if status.startswith("stopped") or status == "failed (exit 2)":
            break
    path = write_report(workdir)
    log(f"[transfer] wrote {path}")
    return statuses


@dataclasses.dataclass
class _Study:
    """One invocation of the driver: what every cell's run is made from."""

    config: object
    config_file: str
    workdir: str
    user: dict
    record: dict
    sizes: TrainSizes
    launch: Launcher
    log: Callable[[str], None]

    def run(self, cell: Cell) -> str:
        """Skips a recorded cell, else trains it (a fresh start or a resume) and records it."""
        cell_dir = self._dir(cell)
        if cell.name in self.record["cells"]:
            _remove_checkpoints(cell_dir)  # a driver killed between recording and deleting
            self.log(f"[transfer] {cell.name}: recorded in {RECORD}, skipped")
            return "skipped"
        os.makedirs(cell_dir, exist_ok=True)
        n_train = self.sizes(cell)
        steps = budget(self.config, n_train)
        facts_path = os.path.join(cell_dir, CELL_FACTS)
        facts = read_json(facts_path) or {}
        facts.update(cell=cell.name, n_train=n_train, steps=steps, settings=self.settings(cell),
                     command=child_command(self.config_file, self.config.transfer.args, cell,
                                           cell_dir, steps, self.user))
        write_json(facts_path, facts)
        results = _finished_results(cell_dir, steps)
        if results is None:  # not run yet, or half-done: (re)launch; the run resumes itself
            status = self._launch(cell, cell_dir, facts_path, facts)
            if status:
                return status
            results = _finished_results(cell_dir, steps)
        return self._record(cell, cell_dir, results, facts)

    def _dir(self, cell: Cell) -> str:
        return os.path.join(self.workdir, CELLS_DIR, cell.name)

    def settings(self, cell: Cell, steps: bool = True) -> dict:
        """What must match for a recorded (or half-done) cell to stand for this invocation's:
        the cell's config and the user's overrides, its starting point and (unless ``steps`` is
        False: no data read) its budget."""
        out = {"config_arg": with_tasks(self.config.transfer.args, (cell.task,)),
               "overrides": formatted(user_overrides(cell.task, self.user)),
               "init_from": cell.start.init_from}
        if steps:
            out["steps"] = budget(self.config, self.sizes(cell))
        return out

    def check_settings(self, cell: Cell) -> None:
        """A recorded cell, or an unrecorded one whose run would be resumed or recorded (its
        cell.json), made with other settings than this invocation's is one error line. Only the
        settings the record has are compared (older records lack init_from and steps: made with
        the same defaults)."""
        entry = self.record["cells"].get(cell.name)
        facts = None if entry or not _has_state(self._dir(cell)) else read_json(
            os.path.join(self._dir(cell), CELL_FACTS))
        then = (entry or facts or {}).get("settings") or {}
        if not then:
            return
        now = self.settings(cell, steps="steps" in then)
        differ = [f"{key}={then[key]!r} (now {now[key]!r})" for key in now
                  if key in then and then[key] != now[key]]
        if not differ:
            return
        if entry:
            raise UserError(f"{RECORD} has {cell.name} run with {', '.join(differ)}; rerun with "
                            f"those settings or use another --workdir")
        raise UserError(f"{CELLS_DIR}/{cell.name} was started with {', '.join(differ)}; rerun "
                        f"with those settings, use another --workdir, or delete "
                        f"{self._dir(cell)}")

    def _launch(self, cell: Cell, cell_dir: str, facts_path: str, facts: dict) -> str | None:
        """Runs the cell's job; None when it finished, else the cell's status."""
        log_path = os.path.join(cell_dir, CELL_LOG)
        job = launch_job(cell.name, facts["command"], log_path, facts_path, facts, self.launch,
                         self.log, prefix="[transfer]",
                         detail=f", {facts['n_train']} train examples, {facts['steps']} steps")
        if job.stopped:
            return job.stopped
        if job.code != 0 or _finished_results(cell_dir, facts["steps"]) is None:
            self.log(f"[transfer] {cell.name}: failed (exit {job.code}); see {log_path}")
            return f"failed (exit {job.code})"
        return None

    def _record(self, cell: Cell, cell_dir: str, results: dict, facts: dict) -> str:
        """The cell's entry in transfer.json (written atomically), then its checkpoints deleted."""
        metric = self.config.transfer.metrics[cell.task]
        value = results.get("final", {}).get(cell.task, {}).get(metric)
        if value is None:
            self.log(f"[transfer] {cell.name}: failed: results.json has no {cell.task} {metric}")
            return "failed (no metric)"
        self.record["cells"][cell.name] = {
            "task": cell.task, "start": cell.start.label, "from": cell.start.given, "k": cell.k,
            "seed": cell.seed, "n_train": facts["n_train"], "steps": facts["steps"],
            "metric": metric, "value": float(value),
            "wall_s": round(float(facts.get("wall_s", 0.0)), 1), "settings": self.settings(cell)}
        save_record(self.workdir, self.record)
        _remove_checkpoints(cell_dir)  # ~270 MB each for MiniLM; results and logs stay
        self.log(f"[transfer] {cell.name}: {metric}={value:.4f} ({facts['n_train']} examples, "
                 f"{facts['steps']} steps)")
        return "done"


def _remove_checkpoints(cell_dir: str) -> None:
    shutil.rmtree(os.path.join(cell_dir, "checkpoints"), ignore_errors=True)


def _has_state(cell_dir: str) -> bool:
    """Whether a launch of the cell would resume (a checkpoint) or record (results) a run."""
    return any(os.path.exists(os.path.join(cell_dir, name))
               for name in ("checkpoints", "results.json"))


def _finished_results(cell_dir: str, steps: int) -> dict | None:
    """The cell's results.json when its run finished the cell's budget, else None."""
    results = read_json(os.path.join(cell_dir, "results.json"))
    return results if results and results.get("final_step") == steps else None
