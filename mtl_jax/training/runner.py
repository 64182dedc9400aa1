"""What ``python -m mtl_jax.main`` runs: ``run(mode, config, workdir, task, input_path)``.

Modes (a registry):
  train    trains, evaluating every ``train.eval_every`` steps; resumes from WORKDIR's latest
           checkpoint on its own (on any device count: the state is restored onto this run's
           mesh). The config and every task split are checked before anything is compiled, and
           the workdir is locked for the run. SIGTERM/SIGINT save a checkpoint and exit 75;
           rerun the same command to resume. A fresh start with ``model.init_from`` takes its
           params from another run's checkpoint (checkpoints/init_from.py; a resume ignores it).
  eval     evaluates the ``eval.checkpoint`` (best | latest) checkpoint on every task's
           validation split and prints the results table.
  predict  reads JSONL records in the task's own field names (--input=FILE, or - for stdin)
           and writes one JSON prediction per line to stdout.

Exit codes (mtl_jax.errors): 0 done, 2 a user mistake (one line on stderr), 3 a non-finite loss
with ``train.nan_policy=stop``, 4 a failed checkpoint save, 75 stopped by a signal after saving.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
from typing import Callable

from absl import logging as absl_logging
import jax
import numpy as np

from mtl_jax.checkpoints import init_from as init_from_lib
from mtl_jax.checkpoints.manager import CheckpointManager, config_to_json
from mtl_jax.errors import UserError
from mtl_jax.registry import Registry
from mtl_jax.training import distributed, parallel, validate
from mtl_jax.training import sharding as sharding_lib
from mtl_jax.training import state as state_lib
from mtl_jax.training import weighting as weighting_lib
from mtl_jax.training import workdir as workdir_lib

EVAL_CHECKPOINTS = ("best", "latest")


# --- what every mode builds from the config ----------------------------------------------------

@dataclasses.dataclass
class Run:
    """The data, model, mesh and steps of one run (built once per process)."""

    config: object
    data: object  # mtl_jax.data.pipeline.RunData
    model: object  # MultiTaskModel
    mesh: jax.sharding.Mesh
    tokenizer: object
    pending_params: object = None  # train mode's checked model.init_from params, for init_state

    @functools.cached_property
    def abstract_state(self):
        """The TrainState as ShapeDtypeStructs (no weights read, nothing allocated). Its
        Optimizer is the one every state of this run is built with (the compiled step checks)."""
        return state_lib.abstract_train_state(self.model, self.model.abstract_params(),
                                              self.config, self.config.train.num_steps)

    @functools.cached_property
    def strategy(self):
        """The parallel strategy (``parallel.mode``): placement, compiled steps, checkpoint
        layout; see training/parallel.py."""
        return parallel.build(self.model, self.config, self.mesh, self.abstract_state)

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.model.specs]

    def spec(self, task: str):
        for s in self.model.specs:
            if s.name == task:
                return s
        raise UserError(f"unknown task {task!r}; "
                        f"tasks in this config: {', '.join(self.task_names)}")

    @property
    def row_shards(self) -> int:
        """The devices a packed batch's rows are split over (data x fsdp): the packer rounds
        the row count to a multiple of it."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def batch(self, host_batch: dict):
        return self.strategy.place_batch(host_batch)

    @functools.cached_property
    def config_json(self) -> dict:
        """The config as saved with the run: label names resolved (also those inferred from the
        data), so eval and predict read the classes exactly as training numbered them. Computed
        once: the config and the specs are fixed when the run is built."""
        record = config_to_json(self.config)
        for spec in self.model.specs:
            if spec.label_names:
                record["tasks"][spec.name]["label_names"] = list(spec.label_names)
        return record

    # --- state ---------------------------------------------------------------------------
    def initial_params(self):
        """Fresh parameters: pretrained encoder (unless model.random_init), new heads; with
        ``model.init_from``, another run's checkpoint mapped onto them (mismatches: UserError)."""
        return init_from_lib.initial_params(self.model, self.config,
                                            jax.random.key(self.config.seed), log=log_line)

    def init_state(self):
        """A fresh TrainState from ``initial_params`` (those train mode checked, if any)."""
        params, self.pending_params = self.pending_params, None
        return self.strategy.init_state(self.initial_params() if params is None else params)

    def restore(self, ckpt: CheckpointManager, step: int | None = None):
        """The latest readable checkpoint (or ``step``) onto this run's devices; None if none."""
        shardings = self.strategy.restore_shardings()
        restored = (ckpt.restore_latest(self.abstract_state, shardings=shardings)
                    if step is None else ckpt.restore(step, self.abstract_state, shardings))
        if restored is None:
            return None
        return restored._replace(state=self.strategy.restored(restored.state))

    # --- steps (compiled once, by the strategy) ------------------------------------------
    def train_step(self):
        return self.strategy.train_step

    def eval_step(self):
        return self.strategy.eval_step

    def predict_fn(self, state, task: str):
        """``batch -> np.ndarray`` of ``task``'s head output (for evaluate_task / predict)."""
        step = self.eval_step()
        return lambda batch: np.asarray(step(state, self.batch(batch))[task])


def build_run(config, splits=("train", "validation"), log=None) -> Run:
    from mtl_jax.data.pipeline import build_data
    from mtl_jax.models import multitask
    from mtl_jax.text.tokenizer import tokenizer_for

    tokenizer = tokenizer_for(config)
    data = build_data(config, tokenizer, splits, log=log, require_train="train" in splits)
    model = multitask.build_model(config, data.specs)
    return Run(config, data, model, sharding_lib.make_mesh(config), tokenizer)


# --- workdir ---------------------------------------------------------------------------------

def use_saved_label_names(config, workdir: str) -> None:
    """eval/predict: the label names training resolved (from config.json of the run), so that a
    split with another label set cannot renumber the classes."""
    saved = workdir_lib.saved_config(workdir) or {}
    for name, task in config.tasks.items():
        names = ((saved.get("tasks") or {}).get(name) or {}).get("label_names") or []
        given = tuple(task.get("label_names") or ())
        if not names:
            continue
        if given and given != tuple(names):
            raise UserError(f"tasks.{name}.label_names={given} differ from those the run in "
                            f"{workdir} was trained with ({tuple(names)}); drop the override or "
                            f"use the trained names")
        with config.unlocked():
            task["label_names"] = tuple(names)


def log_line(message: str) -> None:
    """Progress notes go to stderr: stdout carries the results table (and predict's JSONL)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


# --- modes ---------------------------------------------------------------------------------

MODES: Registry[Callable] = Registry("mode")


@MODES.register("train")
def train_mode(config, workdir, task=None, input_path="-"):
    del task, input_path
    from mtl_jax.training import loop

    validate.check_config(config)  # before anything is read or written
    workdir_lib.check_workdir(workdir)
    created = ("://" not in workdir and not os.path.exists(workdir)
               and jax.process_index() == 0)  # on a shared filesystem: only one remover
    with workdir_lib.WorkdirLock(workdir, log_line, enabled=jax.process_index() == 0):
        try:
            heldout = weighting_lib.heldout_of(config)  # a held-out split to load, if any
            splits = ("train", "validation") + (heldout.extra_split if heldout else ())
            run = build_run(config, splits, log=log_line)  # reads and tokenizes every split
            validate.check_run(run)
            if config.model.init_from and not _has_checkpoint(workdir):  # a resume ignores it
                run.pending_params = run.initial_params()  # checked before anything compiles
        except UserError:
            if created:  # a run that fails validation leaves nothing behind
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        return loop.train(run, workdir)


def _has_checkpoint(workdir: str) -> bool:
    ckpt = CheckpointManager(workdir, read_only=True)
    try:
        return bool(ckpt.all_steps())
    finally:
        ckpt.close()


def restore_for_eval(run: Run, workdir: str):
    """The ``eval.checkpoint`` (best | latest) checkpoint; (state, step)."""
    which = run.config.eval.checkpoint
    if which not in EVAL_CHECKPOINTS:
        raise UserError(f"eval.checkpoint={which!r}; use one of {', '.join(EVAL_CHECKPOINTS)}")
    ckpt = CheckpointManager.from_config(workdir, run.config, read_only=True)
    try:
        step = ckpt.best_step() if which == "best" else None
        restored = run.restore(ckpt, step)
    finally:
        ckpt.close()
    if restored is None:
        raise UserError(f"no checkpoint in {workdir}/checkpoints; train first with --mode=train")
    return restored.state, restored.step


@MODES.register("eval")
def eval_mode(config, workdir, task=None, input_path="-"):
    del input_path
    from mtl_jax.training import evaluate_loop

    workdir_lib.check_workdir(workdir, must_exist=True)
    use_saved_label_names(config, workdir)
    run = build_run(config, splits=("validation",), log=log_line)
    validate.check_run(run)
    tasks = [run.spec(task).name] if task else run.data.eval_tasks()
    state, step = restore_for_eval(run, workdir)
    print_summary(run, state)
    metrics, reports = evaluate_loop.evaluate(run, state, tasks)
    evaluate_loop.write_eval_results(workdir, step, run.config.eval.checkpoint, metrics, reports)
    if jax.process_index() == 0:
        print(evaluate_loop.results_table(metrics, final_step=step), flush=True)
    return metrics


@MODES.register("predict")
def predict_mode(config, workdir, task=None, input_path="-"):
    from mtl_jax.training import predict

    if not task:
        raise UserError("--mode=predict needs --task=NAME (the task whose head to use)")
    workdir_lib.check_workdir(workdir, must_exist=True)
    use_saved_label_names(config, workdir)
    run = build_run(config, splits=(), log=log_line)  # label names only, no data read
    spec = run.spec(task)
    records = predict.read_inputs(input_path)  # before the restore: a bad input fails fast
    state, step = restore_for_eval(run, workdir)
    log_line(f"predict: task {spec.name}, checkpoint step {step}, {len(records)} inputs")
    log_line(run.model.summary(_host_params(run, state)))
    for line in predict.predict(run, state, spec.name, records):
        sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _host_params(run: Run, state):
    return run.strategy.saved(state).params


def print_summary(run: Run, state) -> None:
    if jax.process_index() == 0:
        print(run.model.summary(_host_params(run, state)), flush=True)


def run(mode: str, config, workdir: str | None, task: str | None = None,
        input_path: str = "-", verbose: bool = False):
    """Runs ``mode`` (train | eval | predict); see the module docstring."""
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    if not verbose:
        quiet_library_logs()
    distributed.maybe_initialize_distributed()
    return MODES.get(mode)(config, workdir, task=task, input_path=input_path)


def _not_from_library(record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return not ("/orbax/" in path or record.name.startswith("asyncio"))


def quiet_library_logs() -> None:
    """orbax (through absl) and asyncio log a traceback for every failure that mtl_jax reports
    itself in one line; their records show only with --verbose. (One filter object: adding it
    again, as every in-process run does, is a no-op.)"""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_not_from_library)
