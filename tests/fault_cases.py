"""Bad inputs and faults, each run through ``python -m mtl_jax.main`` on the tiny test config.

Shared by ``tests/test_faults.py`` (which asserts every case) and by the table of
``docs/reliability.md``, which this file writes when run as a script:

    python tests/fault_cases.py --out docs/reliability.md

A case names its input or fault, the workdir it starts from (``fresh``: none; ``trained``: a copy
of a finished 4-step run), how it is run, the exit code and the last stderr line it must give, and
what must be kept (checksums of the workdir's committed checkpoints and records before and after).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from run_helpers import (REPO, main_command, main_env, pausing_command,  # noqa: E402
                         write_config_file)

RECORDS = ("config.json", "results.json")  # a failed run must leave these as they were


@dataclasses.dataclass
class Case:
    name: str  # the input or fault, as the table shows it
    args: tuple = ()
    code: int = 2
    message: str = ""  # the last stderr line; "..." at the end: a prefix
    workdir: str = "fresh"  # fresh (none yet) | trained (a finished 4-step run)
    prepare: Callable | None = None  # (ctx, workdir) -> None, before the run
    drive: Callable | None = None  # (ctx, workdir, args) -> CompletedProcess; default: run it
    kept: str = ""  # what is kept, for the table; default from the workdir kind
    also: Callable | None = None  # (ctx, workdir, proc) -> None: extra checks


@dataclasses.dataclass
class Context:
    """Paths of one session of cases: a config file, a trained workdir, a compile cache."""

    root: pathlib.Path
    config: str
    trained: pathlib.Path
    cache: pathlib.Path

    def env(self, **extra):
        return main_env(cache_dir=self.cache, **extra)

    def run(self, workdir, *args, timeout=180, **env):
        return subprocess.run(main_command(f"--config={self.config}", f"--workdir={workdir}",
                                           *args), cwd=REPO, env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout)

    def data(self, task: str, split: str) -> pathlib.Path:
        return self.root / "data" / task / f"{split}.jsonl"


def make_context(root: pathlib.Path, cache: pathlib.Path) -> Context:
    root = pathlib.Path(root)
    ctx = Context(root, write_config_file(root), root / "trained", pathlib.Path(cache))
    if not (ctx.trained / "results.json").exists():
        proc = ctx.run(ctx.trained)
        assert proc.returncode == 0, proc.stderr
    return ctx


# --- what a workdir holds ------------------------------------------------------------------------

def committed_checksums(workdir: pathlib.Path) -> dict:
    """sha256 of every file of the committed checkpoints and of the run's records."""
    sums = {}
    checkpoints = workdir / "checkpoints"
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []
    for path in sorted(f for step in steps for f in step.rglob("*") if f.is_file()):
        sums[str(path.relative_to(workdir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    for name in RECORDS:
        if (workdir / name).is_file():
            sums[name] = hashlib.sha256((workdir / name).read_bytes()).hexdigest()
    return sums


# --- drivers for the cases that need more than one plain run ----------------------------------

def start_paused(ctx, workdir, step, *args):
    """A run that waits after ``step`` (its checkpoints on disk) until a signal."""
    proc = subprocess.Popen(pausing_command(step, f"--config={ctx.config}",
                                            f"--workdir={workdir}", *args),
                            cwd=REPO, env=ctx.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.strip() == f"paused at step {step}":
            return proc, seen
    proc.wait()
    raise AssertionError("the run ended before pausing:\n" + "".join(seen))


def finish(proc, seen, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err)


def drive_locked(ctx, workdir, args):
    holder, _ = start_paused(ctx, workdir, 1, "--config.train.num_steps=8")
    try:
        return ctx.run(workdir, *args)
    finally:
        holder.kill()
        holder.wait()


def drive_sigterm(ctx, workdir, args):
    proc, seen = start_paused(ctx, workdir, 3, *args)
    proc.send_signal(signal.SIGTERM)
    return finish(proc, seen)


def drive_sigkill_then_resume(ctx, workdir, args):
    proc, _ = start_paused(ctx, workdir, 3, *args)
    proc.kill()
    proc.wait()
    return ctx.run(workdir, *args)


def drive_save_fails(ctx, workdir, args):
    """The checkpoints folder turns read-only after step 2's checkpoint is committed; the save at
    step 4 fails. (chattr +i: root ignores permission bits.)"""
    proc, seen = start_paused(ctx, workdir, 3, *args)
    checkpoints = workdir / "checkpoints"
    before = committed_checksums(workdir)
    subprocess.run(["chattr", "+i", str(checkpoints)], check=True)
    try:
        proc.send_signal(signal.SIGTERM)  # the stop's save is the one that fails
        started = time.monotonic()
        result = finish(proc, seen, timeout=150)
        result.seconds = time.monotonic() - started
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], check=True)
    result.before = before
    return result


def drive_inferred_labels(ctx, workdir, args):
    """Train on string labels with no label_names (inferred: sorted, neg=0 pos=1), then eval and
    predict on a validation split holding only "pos": the saved names keep pos at index 1."""
    train = bad_file(ctx, "str_train.jsonl", "".join(
        json.dumps({"sentence": f"the {w} film", "label": "pos" if i % 2 else "neg"}) + "\n"
        for i, w in enumerate(["good", "bad"] * 8)))
    valid = bad_file(ctx, "str_valid.jsonl", json.dumps({"sentence": "a good film",
                                                         "label": "pos"}) + "\n")
    files = (f"--config.tasks.sent.data.train={train}",
             f"--config.tasks.sent.data.validation={valid}", "--config.tasks.sent.label_names=()")
    trained = ctx.run(workdir, *files)
    assert trained.returncode == 0, trained.stderr[-2000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["tasks"]["sent"]["label_names"] == ["neg", "pos"]
    evaluated = ctx.run(workdir, *files, "--mode=eval")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    predicted = subprocess.run(
        main_command(f"--config={ctx.config}", f"--workdir={workdir}", *files, "--mode=predict",
                     "--task=sent"), cwd=REPO, env=ctx.env(), input='{"sentence": "good"}\n',
        capture_output=True, text=True, timeout=120)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert set(json.loads(predicted.stdout)["probabilities"]) == {"neg", "pos"}
    return predicted


def immutable_checkpoints(ctx, workdir):
    (workdir / "checkpoints").mkdir(parents=True)
    subprocess.run(["chattr", "+i", str(workdir / "checkpoints")], check=True)


def drive_immutable(ctx, workdir, args):
    started = time.monotonic()
    try:
        result = ctx.run(workdir, *args, timeout=150)
    finally:
        subprocess.run(["chattr", "-i", str(workdir / "checkpoints")], check=True)
    result.seconds = time.monotonic() - started
    return result


# --- preparations ------------------------------------------------------------------------------

def write_bad_bytes(ctx, workdir, split="train"):
    path = ctx.root / "bad" / f"latin1_{split}.jsonl"
    path.parent.mkdir(exist_ok=True)
    good = ctx.data("sent", split).read_bytes().splitlines(keepends=True)
    bad = '{"sentence": "caf\u00e9", "label": 1}\n'.encode("latin1")
    path.write_bytes(b"".join(good[:2]) + bad)
    return path


def bad_file(ctx, name, text):
    path = ctx.root / "bad" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def stale_lock(ctx, workdir):
    workdir.mkdir(parents=True)
    (workdir / ".lock").write_text(json.dumps(dict(host="vm", pid=999999, started="earlier")))


def interrupted_save(ctx, workdir):
    """What a kill during step 4's async save leaves: step 2 committed, 4 half-written."""
    os.rename(workdir / "checkpoints" / "4", workdir / "checkpoints" / "4.orbax-checkpoint-tmp")


def only_interrupted_save(ctx, workdir):
    """A kill right after the first checkpoint step: nothing committed, step 2 half-written."""
    shutil.rmtree(workdir / "checkpoints" / "4")
    os.rename(workdir / "checkpoints" / "2", workdir / "checkpoints" / "2.orbax-checkpoint-tmp")
    for name in ("results.json", "results.md"):
        (workdir / name).unlink()


def corrupt(steps):
    def prepare(ctx, workdir):
        for step in steps:
            for f in (workdir / "checkpoints" / str(step) / "state").rglob("d/*"):
                f.write_bytes(os.urandom(f.stat().st_size))
    return prepare


# --- extra checks ------------------------------------------------------------------------------

def says(*fragments):
    def check(ctx, workdir, proc):
        for fragment in fragments:
            assert fragment.format(workdir=workdir) in proc.stderr, (fragment, proc.stderr)
    return check


HANG_BOUND_S = 90  # below the drivers' 150 s timeout: a hang fails at the timeout


def bounded(seconds):
    """The run ended by itself well before the harness's timeout: a failed save stops it at the
    next step instead of hanging. Generous: on a 2-core machine shared with another job, a
    run that takes 15 s alone took 34 s."""
    def check(ctx, workdir, proc):
        assert proc.seconds < seconds, f"took {proc.seconds:.0f} s"
    return check


def save_failure_kept(ctx, workdir, proc):
    bounded(HANG_BOUND_S)(ctx, workdir, proc)
    assert committed_checksums(workdir) == proc.before  # step 2 as it was committed


def metrics_kept(ctx, workdir, proc):
    kept = list(workdir.glob("metrics.jsonl.discarded-*"))
    assert len(kept) == 1 and kept[0].read_text(), list(workdir.iterdir())


def sittings(n):
    def check(ctx, workdir, proc):
        lines = (workdir / "sittings.jsonl").read_text().splitlines()
        assert len(lines) == n, lines
    return check


# --- the cases -----------------------------------------------------------------------------------

def _set(key, value, code=2, message=None):
    return Case(f"`--config.{key}={value}`", (f"--config.{key}={value}",), code, message or "")


CASES = [
    # The command line itself.
    Case("a mistyped flag (`--workdr`)", ("--workdr=/tmp/x",),
         message="error: unknown flag --workdr; did you mean --workdir?"),
    Case("a mistyped config key", ("--config.train.num_stepz=3",),
         message="error: unknown config key --config.train.num_stepz; did you mean "
                 "--config.train.num_steps, ..."),
    Case("a value of the wrong type", ("--config.train.num_steps=many",),
         message="error: bad value 'many' for --config.train.num_steps: expected int (default "
                 "4)"),
    Case("a hub dataset while the hub is unreachable",
         ("--config.tasks.sent.hub=glue", "--config.tasks.sent.hub_config=sst2",
          "--config.tasks.sent.data.train=train"),
         message="error: tasks.sent: cannot load hub dataset glue/sst2[train] (..."),
    # Counts and ranges: refused before anything is read or written.
    _set("train.batch_size", 0, message="error: train.batch_size=0 must be at least 1 (examples "
         "per step); set --config.train.batch_size to a positive value"),
    _set("train.batch_size", -4, message="error: train.batch_size=-4 must be at least 1..."),
    _set("train.num_steps", -5, message="error: train.num_steps=-5 must be at least 1..."),
    _set("train.num_steps", 0, message="error: train.num_steps=0 must be at least 1..."),
    _set("train.checkpoint_every", 0, message="error: train.checkpoint_every=0 must be at least "
         "1..."),
    _set("train.log_every", 0, message="error: train.log_every=0 must be at least 1..."),
    _set("train.eval_every", 0, message="error: train.eval_every=0 must be at least 1..."),
    _set("eval.batch_size", 0, message="error: eval.batch_size=0 must be at least 1..."),
    _set("checkpoint.max_to_keep", 0, message="error: checkpoint.max_to_keep=0 must be at least "
         "1..."),
    _set("optim.accumulate_steps", 0, message="error: optim.accumulate_steps=0 must be at least "
         "1..."),
    _set("optim.lr", -0.001, message="error: optim.lr=-0.001 must not be negative..."),
    _set("optim.warmup_fraction", 1.5, message="error: optim.warmup_fraction=1.5 must be between "
         "0 and 1"),
    _set("data.buckets", "(64,32)", message="error: data.buckets=(64, 32) must be strictly "
         "increasing..."),
    # Names: every registry or choice, before anything is read.
    _set("weighting.name", "gradsurgery", message="error: weighting.name='gradsurgery' is not a "
         "valid choice; use one of cagrad, dwa, equal, gradnorm, meta, pcgrad, static, "
         "uncertainty"),
    _set("sharing.mode", "medium", message="error: sharing.mode='medium' is not a valid choice; "
         "use one of hard, soft"),
    _set("peft.kind", "bitfit", message="error: peft.kind='bitfit' is not a valid choice..."),
    _set("data.sampler", "random", message="error: data.sampler='random' is not a valid "
         "choice..."),
    _set("data.batch_mode", "interleaved", message="error: data.batch_mode='interleaved' is not "
         "a valid choice..."),
    _set("parallel.mode", "pjit", message="error: parallel.mode='pjit' is not a valid choice; use "
         "one of jit, pmap"),
    _set("parallel.rules", "zero3", message="error: parallel.rules='zero3' is not a valid "
         "choice..."),
    _set("optim.name", "adam", message="error: optim.name='adam' is not a valid choice; use one "
         "of adamw, sgd"),
    _set("optim.schedule", "step", message="error: optim.schedule='step' is not a valid "
         "choice..."),
    _set("heads.pooling", "max", message="error: heads.pooling='max' is not a valid choice..."),
    _set("model.dtype", "float64", message="error: model.dtype='float64' is not a valid "
         "choice..."),
    _set("train.nan_policy", "ignore", message="error: train.nan_policy='ignore' is not a valid "
         "choice; use one of stop, skip"),
    _set("eval.checkpoint", "worst", message="error: eval.checkpoint='worst' is not a valid "
         "choice; use one of best, latest"),
    Case("`data.batch_mode=stacked` with a batch not divisible by the tasks",
         ("--config.data.batch_mode=stacked", "--config.train.batch_size=7"),
         message="error: train.batch_size=7 must be a multiple of the 2 tasks with "
                 "data.batch_mode=stacked (one sub-batch per task)"),
    # Metrics and lengths: checked once the data is read, before compiling.
    Case("unknown metric `tasks.sent.metrics=('bleu',)`",
         ("--config.tasks.sent.metrics=('bleu',)",),
         message="error: tasks.sent.metrics: unknown metric 'bleu'; valid metric names: ..."),
    Case("metric of another task type (`seqeval` on a classification task)",
         ("--config.tasks.sent.metrics=('seqeval',)",),
         message="error: tasks.sent.metrics: 'seqeval' does not apply to a "
                 "sequence_classification task; use one of accuracy, f1, f1_macro, f1_micro, "
                 "matthews_corrcoef"),
    Case("binary `f1` on a 3-class task", ("--config.tasks.sent.label_names=('neg','pos','mid')",
                                           "--config.tasks.sent.metrics=('f1',)"),
         message="error: tasks.sent.metrics: 'f1' is..."),
    Case("`max_length` above the model's position embeddings",
         ("--config.data.buckets=(32,1024)", "--config.tasks.sent.max_length=1000"),
         message="error: tasks.sent.max_length=1000 pads to the bucket of 1024 tokens, more than "
                 "the model's 512 position embeddings; set tasks.sent.max_length and "
                 "data.buckets to at most 512"),
    Case("`max_length` above the largest bucket", ("--config.tasks.sent.max_length=64",),
         message="error: tasks.sent.max_length=64 exceeds the largest data.buckets entry 32..."),
    Case("early-stopping metric the task does not report",
         ("--config.train.early_stopping_metric=sent/f1",),
         message="error: train.early_stopping_metric='sent/f1': task sent reports accuracy; pick "
                 "one of those"),
    Case("early-stopping metric of an unknown task",
         ("--config.train.early_stopping_metric=sst2/accuracy",),
         message="error: train.early_stopping_metric='sst2/accuracy'; use 'mean' or TASK/METRIC "
                 "with a task of this run (ner, sent)"),
    # Data files: named with file and line, eval splits included.
    Case("non-UTF-8 bytes in a train file", message="error: {bad}:3: bytes that are not UTF-8 at "
         "byte offset ..."),
    Case("non-UTF-8 bytes in a validation file", message="error: {bad}:3: bytes that are not "
         "UTF-8 at byte offset ..."),
    Case("a directory given as a data file", message="error: tasks.sent.data.train: {dir!r} is a "
         "directory; name a file in it..."),
    Case("a missing data file", message="error: tasks.sent.data.train: file {missing!r} not "
         "found..."),
    Case("a line that is not JSON", message="error: {bad}:2: not valid JSON..."),
    Case("a label outside the label names", message="error: {bad}:1: label 'meh' is not one of "
         "the label names..."),
    Case("a column missing", message="error: {bad}:1: column 'sentence' not found..."),
    # The workdir.
    Case("workdir under a file", message="error: workdir {blocker}/run is not writable (Not a "
         "directory); pass a --workdir you can write to"),
    Case("a second run on a workdir in use", workdir="fresh", drive=drive_locked,
         message="error: workdir {workdir} is in use by another run (host ..."),
    Case("a stale lock (its pid is dead)", code=0, prepare=stale_lock,
         also=says("warning: took over the lock of an earlier run that did not exit cleanly "
                   "(host vm, pid 999999, started earlier, no longer running)")),
    Case("`train.batch_size=0` on an existing workdir", ("--config.train.batch_size=0",),
         workdir="trained", message="error: train.batch_size=0 must be at least 1 (examples per "
         "step); set --config.train.batch_size to a positive value"),
    Case("resume with a changed setting (`optim.lr`)", ("--config.optim.lr=0.1",),
         workdir="trained", message="error: workdir {workdir} was trained with other settings: "
         "optim.lr (0.001 -> 0.1); resume with the original settings or pass a new --workdir..."),
    Case("a finished workdir run with another metric", ("--config.tasks.sent.metrics=('f1',)",),
         workdir="trained", message="error: workdir {workdir} was trained with other settings: "
         "tasks.sent.metrics ([\"accuracy\"] -> [\"f1\"])..."),
    Case("resume with a longer schedule (`train.num_steps`, may change)",
         ("--config.train.num_steps=6",), code=0, workdir="trained",
         also=lambda ctx, w, p: (says("resumed from {workdir}/checkpoints/4")(ctx, w, p),
                                 sittings(2)(ctx, w, p))),
    # Faults.
    Case("checkpoints folder not writable from the start (chattr +i)", code=4, prepare=
         immutable_checkpoints, drive=drive_immutable, also=bounded(HANG_BOUND_S),
         message="error: checkpoint save at step 2 in {workdir}/checkpoints failed (PermissionError"
                 ": [Errno 1] Operation not permitted: ...", kept="nothing was committed; exits "
         "in seconds"),
    Case("a checkpoint save fails mid-run (chattr +i after step 2)", code=4,
         drive=drive_save_fails, also=save_failure_kept,
         message="error: checkpoint save at step 3 in {workdir}/checkpoints failed (PermissionError"
                 ": ...; the last committed checkpoint is step 2; fix the cause...",
         kept="step 2's checkpoint, byte for byte; exits in seconds"),
    Case("SIGTERM during training", code=75, drive=drive_sigterm,
         message="stopped: signal 15 at step 3, checkpoint saved in {workdir}/checkpoints; run the "
                 "same command again to resume", kept="checkpoint at step 3"),
    Case("SIGKILL during training, then the same command", code=0,
         drive=drive_sigkill_then_resume, also=says("resumed from {workdir}/checkpoints/2"),
         kept="checkpoint at step 2; resumed from it"),
    Case("killed during an async save (step 4 half-written)", code=0, workdir="trained",
         prepare=interrupted_save, also=says("found an interrupted save at step 4, discarded; "
                                             "resumed from {workdir}/checkpoints/2"),
         kept="step 2; the half-written step 4 is discarded, said in one line"),
    Case("killed during the first save (nothing committed)", code=0, workdir="trained",
         prepare=only_interrupted_save,
         also=lambda ctx, w, p: (says("found an interrupted save at step 2, discarded; starting "
                                      "from scratch")(ctx, w, p), metrics_kept(ctx, w, p)),
         kept="the earlier metrics.jsonl, set aside (said in one line)"),
    Case("a corrupt latest checkpoint", ("--config.train.num_steps=6",), code=0,
         workdir="trained", prepare=corrupt([4]),
         also=says("warning: checkpoint {workdir}/checkpoints/4 is unreadable (",
                   "resumed from {workdir}/checkpoints/2"),
         kept="step 2 (resumed from it); step 4 moved aside"),
    Case("the loss turns non-finite (`optim.lr=1e30`)", ("--config.optim.lr=1e30",), code=3,
         message="error: loss is not finite at step ...; stopped, ...; lower optim.lr or set "
                 "train.nan_policy=skip", kept="the last checkpoint before the first bad step"),
    Case("every checkpoint corrupt", workdir="trained", prepare=corrupt([2, 4]),
         message="error: no checkpoint in {workdir}/checkpoints could be read (steps [2, 4]); move "
                 "them aside or use a new --workdir"),
    Case("eval and predict of a run whose label names were inferred from the data (the "
         "validation split holds one class only)", code=0, drive=drive_inferred_labels,
         kept="the classes as training numbered them"),
]



def bind(case: Case, ctx: Context, workdir: pathlib.Path):
    """The case's CLI arguments, expected message and workdir with this session's paths."""
    args, message = tuple(case.args), case.message
    bad = ctx.root / "bad"
    bad.mkdir(exist_ok=True)
    if case.name.startswith("non-UTF-8"):
        split = "validation" if "validation" in case.name else "train"
        path = write_bad_bytes(ctx, workdir, split)
        args += (f"--config.tasks.sent.data.{split}={path}",)
        message = message.replace("{bad}", str(path))
    elif case.name == "a directory given as a data file":
        args += (f"--config.tasks.sent.data.train={bad}",)
        message = message.replace("{dir!r}", repr(str(bad)))
    elif case.name == "a missing data file":
        missing = bad / "nope.jsonl"
        args += (f"--config.tasks.sent.data.train={missing}",)
        message = message.replace("{missing!r}", repr(str(missing)))
    elif case.name in ("a line that is not JSON", "a label outside the label names",
                       "a column missing"):
        text = {"a line that is not JSON": '{"sentence": "ok", "label": 1}\n{"sentence": \n',
                "a label outside the label names": '{"sentence": "ok", "label": "meh"}\n',
                "a column missing": '{"text": "ok", "label": 1}\n'}[case.name]
        path = bad_file(ctx, case.name.replace(" ", "_") + ".jsonl", text)
        args += (f"--config.tasks.sent.data.validation={path}",)
        message = message.replace("{bad}", str(path))
    elif case.name == "workdir under a file":
        blocker = bad / "a_file"
        blocker.write_text("")
        message = message.replace("{blocker}", str(blocker))
        return args, message, blocker / "run"
    return args, message.replace("{workdir}", str(workdir)), workdir


def run_case(case: Case, ctx: Context, workdir: pathlib.Path):
    """Runs one case; returns (process, workdir, checksums before) for the checks."""
    if case.workdir == "trained":
        shutil.copytree(ctx.trained, workdir)
    args, message, workdir = bind(case, ctx, workdir)
    if case.prepare is not None:
        case.prepare(ctx, workdir)
    before = committed_checksums(workdir) if workdir.exists() else None
    drive = case.drive or (lambda c, w, a: c.run(w, *a))
    proc = drive(ctx, workdir, args)
    return proc, workdir, message, before


def last_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def matches(line: str, pattern: str) -> bool:
    """``line == pattern``, where each "..." in the pattern stands for any text."""
    import re

    return re.fullmatch(".*".join(map(re.escape, pattern.split("..."))), line) is not None


def check_case(case: Case, ctx: Context, proc, workdir, message, before) -> None:
    """The assertions of one case (used by the test and, as pass/fail, by the table)."""
    assert proc.returncode == case.code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if case.code != 0:
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        flagged = [line for line in err if line.startswith(("error:", "stopped:"))]
        assert flagged == [err[-1]], err[-10:]
        assert matches(err[-1], message), (err[-1], message)
    if case.workdir == "fresh" and case.code == 2 and case.drive is None and \
            case.prepare is None:
        assert not workdir.exists() or not any(workdir.iterdir()), list(workdir.iterdir())
    if case.workdir == "trained" and case.code != 0:
        assert committed_checksums(workdir) == before
    if case.also is not None:
        case.also(ctx, workdir, proc)


def kept_text(case: Case) -> str:
    if case.kept:
        return case.kept
    if case.workdir == "trained":
        return ("the run's checkpoints and records, byte for byte" if case.code != 0
                else "the run's checkpoints; it resumes")
    return "nothing written (no workdir created)" if case.code == 2 else "—"


# --- the table -------------------------------------------------------------------------------

def table(ctx: Context, out: pathlib.Path) -> dict:
    rows, counts = [], dict(tried=0, one_line=0, lost=0, failed=0)
    for i, case in enumerate(CASES):
        workdir = ctx.root / f"case{i}"
        shutil.rmtree(workdir, ignore_errors=True)
        proc, workdir, message, before = run_case(case, ctx, workdir)
        try:
            check_case(case, ctx, proc, workdir, message, before)
            ok = True
        except AssertionError as e:
            ok = False
            print(f"FAILED {case.name}: {e}", file=sys.stderr)
        counts["tried"] += 1
        counts["failed"] += not ok
        line = last_line(proc).replace(str(ctx.root), "$ROOT")
        one_line = "Traceback" not in proc.stderr and (case.code == 0 or ok)
        counts["one_line"] += one_line
        counts["lost"] += not ok and case.workdir == "trained"
        rows.append(f"| {case.name} | {proc.returncode} | `{line}` | {kept_text(case)} |"
                    if case.code != 0 else
                    f"| {case.name} | {proc.returncode} | {_success_note(proc, ctx)} | "
                    f"{kept_text(case)} |")
        print(f"{'ok ' if ok else 'BAD'} {case.name}", file=sys.stderr, flush=True)
    out.write_text(_page(rows, counts))
    return counts


def _success_note(proc, ctx) -> str:
    notes = [line for line in proc.stderr.splitlines()
             if line.startswith(("warning:", "found an", "resumed from", "starting from"))]
    return "; ".join(f"`{n.replace(str(ctx.root), '$ROOT')}`" for n in notes) or "runs"


def _page(rows, counts) -> str:
    return "\n".join([
        "# Reliability: bad inputs and faults",
        "",
        "Generated by `python tests/fault_cases.py --out docs/reliability.md`, which runs every "
        "case",
        "below through `python -m mtl_jax.main` on the tiny test config (`tests/run_helpers.py`);",
        "`tests/test_faults.py` asserts the same cases. `$ROOT` is the session's temporary folder.",
        "",
        f"**{counts['tried']} cases tried; {counts['one_line']} end with one clear line (or run "
        f"as they should); {counts['lost']} lost anything; {counts['failed']} did not behave as "
        f"specified.**",
        "",
        "## Exit codes",
        "",
        "| code | meaning |",
        "| ---: | --- |",
        "| 0 | finished |",
        "| 2 | a user error: one `error:` line naming the fix, before training starts |",
        "| 3 | a non-finite loss with `train.nan_policy=stop` (the last good checkpoint is kept) |",
        "| 4 | a checkpoint could not be saved (the committed ones are kept) |",
        "| 75 | stopped by SIGTERM/SIGINT after saving a checkpoint: run again to resume "
        "(EX_TEMPFAIL; `launch/` requeues on it) |",
        "| 130 | interrupted before training started, or by a second Ctrl-C |",
        "",
        "## What may change between sittings",
        "",
        "A resumed run compares its settings with the first sitting's `config.json` (kept as it "
        "was written; every sitting is appended to `sittings.jsonl`) and refuses any difference, "
        "naming the keys, except these (they change how the run proceeds, not what it computes):",
        "",
        "`" + "`, `".join(_may_change()) + "` (a trailing `.` is a whole section).",
        "",
        "## The cases",
        "",
        "| input or fault | exit | the message (last stderr line) | what is kept |",
        "| --- | ---: | --- | --- |",
        *rows,
        "",
    ])


def _may_change():
    from mtl_jax.training.workdir import MAY_CHANGE

    return MAY_CHANGE


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "reliability.md"))
    parser.add_argument("--root", default="")
    args = parser.parse_args()
    import tempfile

    root = pathlib.Path(args.root or tempfile.mkdtemp(prefix="mtl_jax_faults_"))
    ctx = make_context(root, root / "xla_cache")
    counts = table(ctx, pathlib.Path(args.out))
    print(json.dumps(counts))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
