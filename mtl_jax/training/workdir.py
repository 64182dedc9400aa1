"""The run directory: checked writable, locked by the run that trains in it, and its config record.

    WORKDIR/.lock          held (flock) by the training run; names its host, pid and start time
    WORKDIR/config.json    the config as the first sitting wrote it (label names resolved)
    WORKDIR/sittings.jsonl one line per sitting: when, where, from which step, its full config

A resume whose settings differ from config.json is refused, naming the keys, except for the keys
in ``MAY_CHANGE`` (the schedule's length and cadences, evaluation batch size, retention, device
layout and caches): they change how a run proceeds, not what it computes.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import fnmatch
import json
import os
import socket
import tempfile
from typing import Iterable, Mapping

from mtl_jax.errors import UserError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
SITTINGS_FILE = "sittings.jsonl"

# Dotted keys (or key prefixes ending in ".") that may change between sittings of one run.
MAY_CHANGE = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.progress", "train.early_stopping_patience", "eval.batch_size",
    "checkpoint.max_to_keep", "checkpoint.async_save", "checkpoint.save_timeout_s",
    "data.cache_dir", "parallel.", "model.remat", "model.attention_impl",
    # init_from is read by a fresh start only; a resume restores its own checkpoint.
    "model.init_from", "model.init_from_heads", "model.init_from_peft", "model.init_from_encoder",
    # Sections that only the comparison / transfer drivers read (the training job ignores them).
    "compare.", "transfer.",
)


def check_workdir(workdir: str | None, *, must_exist: bool = False) -> str:
    """The workdir, checked (a local path must be writable, or creatable), or a UserError naming
    the fix. Creates nothing."""
    if not workdir:
        raise UserError("--workdir is required; pass --workdir=DIR (checkpoints, metrics and "
                        "results go there)")
    if "://" in workdir:  # gs:// and friends: orbax checks access itself
        return workdir
    if must_exist:
        if not os.path.isdir(os.path.join(workdir, "checkpoints")):
            raise UserError(f"no checkpoints in {workdir}; train first (--mode=train "
                            f"--workdir={workdir}) or point --workdir at a trained run")
        return workdir
    existing = _nearest_existing(workdir)
    problem = None
    if not os.path.isdir(existing):
        problem = os.strerror(errno.ENOTDIR)
    else:
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
                pass
        except OSError as e:
            problem = e.strerror or type(e).__name__
    if problem:
        raise UserError(f"workdir {workdir} is not writable ({problem}); pass a --workdir you "
                        f"can write to")
    return workdir


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


# --- the lock ----------------------------------------------------------------------------------

class WorkdirLock:
    """An exclusive lock on a workdir for one training run (``with WorkdirLock(dir, say):``).

    An OS file lock (flock) does the excluding, so a killed run's lock is free at once; the file
    also holds the holder's host, pid and start time, to name it to a second run. A file left by a
    run that died without unlocking is taken over with a warning. Remote workdirs (gs://) and
    processes other than 0 take no lock.
    """

    def __init__(self, workdir: str, say=None, *, enabled: bool = True):
        self.workdir, self.say = workdir, say or (lambda message: None)
        self.enabled = enabled and "://" not in workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A filesystem without flock (some Lustre/NFS/FUSE mounts): run unlocked.
                self.say(f"warning: cannot lock {self.path} ({e.strerror}); two runs on this "
                         f"workdir would not be stopped")
                f.close()
                return self
            holder = _read_holder(f)
            f.close()
            raise UserError(f"workdir {self.workdir} is in use by another run ({_who(holder)}); "
                            f"wait for it to finish, stop it, or pass another --workdir") from None
        previous = _read_holder(f)
        if previous:
            self.say(f"warning: took over the lock of an earlier run that did not exit cleanly "
                     f"({_who(previous)}, no longer running)")
        f.seek(0)
        f.truncate()
        json.dump(dict(host=socket.gethostname(), pid=os.getpid(), started=_now()), f)
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # an empty file: released cleanly
            self._file.close()  # closing releases the flock
            self._file = None


def _read_holder(f) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except json.JSONDecodeError:
        return {}


def _who(holder: Mapping) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# --- the config record -------------------------------------------------------------------------

def saved_config(workdir: str) -> dict | None:
    """config.json of the workdir's first sitting, or None (also for remote gs:// workdirs,
    whose records these local-file helpers do not write)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if "://" in workdir or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); restore it from "
                        f"sittings.jsonl or the checkpoint, or delete it") from None


def record_sitting(workdir: str, config_json: dict, resumed_from: int | None, argv=None) -> None:
    """config.json on the first sitting (kept as it is later); a line in sittings.jsonl always.
    Local workdirs only (a gs:// run's config is in each checkpoint's config item)."""
    if "://" in workdir:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    if resumed_from is None or not os.path.isfile(path):
        write_json(path, config_json)
    line = dict(started=_now(), host=socket.gethostname(), pid=os.getpid(),
                resumed_from=resumed_from, argv=list(argv or []), config=config_json)
    with open(os.path.join(workdir, SITTINGS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")


def write_json(path: str, record: dict) -> None:
    """``record`` as indented JSON, atomically (a crash leaves the old file or the new one)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# Keys added after runs were already saved without them, with the value that computes what those
# runs computed (fnmatch patterns): a key absent from a saved config.json and set to this value
# now is no change, so upgrading mtl_jax does not strand a half-done run. Add each new key here.
ADDED_KEYS = {
    "train.algorithm": "standard", "meta.*": None, "weighting.meta_*": None,
    "tasks.*.k_shot": 0, "tasks.*.k_shot_seed": 0,
}


def _added_and_default(key: str, value, saved: Mapping) -> bool:
    """``key`` is absent from ``saved`` and ``value`` reproduces the older run (None in
    ADDED_KEYS: any value, the key only acts when another new key is on)."""
    if key in saved:
        return False
    for pattern, old in ADDED_KEYS.items():
        if fnmatch.fnmatchcase(key, pattern):
            return old is None or value == old
    return False


def changed_keys(saved: Mapping, now: Mapping, may_change: Iterable[str] = MAY_CHANGE) -> list:
    """``[(key, saved value, new value)]`` for leaves that differ, outside ``may_change``."""
    a, b = _flatten(saved), _flatten(now)
    allowed = tuple(may_change)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) == b.get(key) or _allowed(key, allowed) or \
                _added_and_default(key, b.get(key), a):
            continue
        if key.endswith(".label_names") and not a.get(key):
            continue  # saved before label names were resolved into config.json: inferred now
        out.append((key, a.get(key, "absent"), b.get(key, "absent")))
    return out


def check_resume_config(workdir: str, now: Mapping) -> None:
    """Refuses to resume with settings that differ from the run's first sitting."""
    saved = saved_config(workdir)
    if saved is None:
        return
    changed = changed_keys(saved, now)
    if not changed:
        return
    shown = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, a, b in changed[:4])
    more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    raise UserError(f"workdir {workdir} was trained with other settings: {shown}{more}; resume "
                    f"with the original settings or pass a new --workdir (what may change "
                    f"between sittings: see docs/reliability.md)")


def _allowed(key: str, allowed: tuple) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
