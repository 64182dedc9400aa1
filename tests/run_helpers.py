"""Tiny end-to-end runs for the loop/resume/predict/error tests: task files of every type in a
folder, a random 2-layer encoder (hidden 32) with the MiniLM tokenizer, one length bucket (one
compiled shape per step), and helpers to run ``python -m mtl_jax.main`` as a subprocess."""
import contextlib
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

_WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "cast", "film"]
_NAMES = ["Alice", "Bob", "Paris", "Rome"]


def _rows(task: str, n: int, offset: int) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = _WORDS[i % 10], _WORDS[(3 * i + 1) % 10]
        if task == "sent":
            rows.append({"sentence": f"the {a} {b} was {a}", "label": int(a in _WORDS[:3])})
        elif task == "sim":
            rows.append({"sentence1": f"a {a} film", "sentence2": f"a {b} plot",
                         "score": float(i % 5)})
        elif task == "ner":
            name, place = _NAMES[i % 2], _NAMES[2 + i % 2]
            rows.append({"tokens": [name, "went", "to", place, a],
                         "tags": ["B-PER", "O", "O", "B-LOC", "O"]})
        elif task == "qa":
            name = _NAMES[i % 4]
            context = f"the {a} {b} was seen by {name} today"
            rows.append({"id": f"q{i}", "question": f"who saw the {a} {b}?", "context": context,
                         "answers": {"text": [name], "answer_start": [context.index(name)]}})
    return rows


TASKS = {
    "sent": dict(type="sequence_classification", text_fields=("sentence",),
                 label_names=("neg", "pos"), metrics=("accuracy",)),
    "sim": dict(type="sequence_regression", text_fields=("sentence1", "sentence2"),
                label_field="score", metrics=("pearson", "spearman")),
    "ner": dict(type="token_classification", text_fields=("tokens",), label_field="tags",
                label_names=("O", "B-PER", "I-PER", "B-LOC", "I-LOC"), metrics=("seqeval",)),
    "qa": dict(type="extractive_qa", text_fields=("question", "context"), label_field="answers",
               metrics=("squad",), doc_stride=8),
}


def write_task_files(root) -> pathlib.Path:
    """``root/data/<task>/{train,validation}.jsonl`` for every task in TASKS (idempotent)."""
    root = pathlib.Path(root)
    for task in TASKS:
        folder = root / "data" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, n, offset in (("train", 32, 0), ("validation", 16, 100)):
            (folder / f"{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in _rows(task, n, offset)))
    return root / "data"


def tiny_config(root, tasks=("sent", "ner"), hidden: int = 32):
    """A 4-step run: log every step, evaluate and checkpoint every 2 steps, mixed batches of 8."""
    from configs.base import get_base_config
    from mtl_jax.tasks.definitions import task_definition

    data = write_task_files(root)
    c = get_base_config()
    for name in tasks:
        fields = dict(TASKS[name])
        c.tasks[name] = task_definition(
            max_length=32,
            data={s: str(data / name / f"{s}.jsonl") for s in ("train", "validation")}, **fields)
    c.model.random_init = True
    c.model.family = "bert"
    c.model.size.update(dict(hidden_size=hidden, num_layers=2, num_heads=4,
                             intermediate_size=2 * hidden))
    c.data.buckets = (32,)
    c.data.batch_mode = "mixed"
    c.data.cache_dir = str(pathlib.Path(root) / "cache")
    c.optim.lr = 1e-3
    c.train.update(dict(num_steps=4, batch_size=8, log_every=1, eval_every=2, checkpoint_every=2,
                        progress=False))
    c.eval.batch_size = 8
    return c


CONFIG_FILE = '''"""Test config: tests/run_helpers.tiny_config in {root}.

arg: comma-separated tasks."""
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from run_helpers import tiny_config


def get_config(arg=None):
    return tiny_config({root!r}, tuple((arg or "sent,ner").split(",")))
'''


def write_config_file(root) -> str:
    root = pathlib.Path(root)
    path = root / "tiny_config.py"
    path.write_text(CONFIG_FILE.format(root=str(root), repo=str(REPO), tests=str(TESTS)))
    return str(path)


def main_env(devices: int = 8, cache_dir=None, **extra) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra)
    return env


def main_command(*args) -> list[str]:
    return [sys.executable, "-m", "mtl_jax.main", *args]


def pausing_command(step: int, *args) -> list[str]:
    """``main_command(*args)`` that waits after ``step`` until a signal (tests/pausing_main.py)."""
    return [sys.executable, str(TESTS / "pausing_main.py"), f"--pause_at_step={step}", *args]


def run_main(*args, devices: int = 8, env=None, stdin=None, timeout=120):
    """``python -m mtl_jax.main ARGS`` -> CompletedProcess (text)."""
    return subprocess.run(main_command(*args), cwd=REPO, env=env or main_env(devices),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def restored_params(workdir, step=None):
    """The params of a workdir's checkpoint (the latest by default) as a {path: ndarray} dict,
    read with orbax directly (independent of the runner)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    directory = pathlib.Path(workdir) / "checkpoints"
    with ocp.CheckpointManager(str(directory.resolve()), item_names=("state",)) as manager:
        step = manager.latest_step() if step is None else step
        tree = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    params = tree.state["params"]
    return step, {jax.tree_util.keystr(p): np.asarray(v)
                  for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@contextlib.contextmanager
def persistent_compile_cache(path):
    """JAX's on-disk compilation cache at ``path`` for this block, in this process.

    The tiny runs of these tests compile the same init/train/eval steps again and again (each run
    builds new jitted functions); the disk cache turns later compiles into loads. JAX decides
    whether the cache is on at its first compile, so switching it on here needs
    ``compilation_cache.reset_cache()`` (private; jax pinned in setup.py). Subprocesses get the
    same directory through ``JAX_COMPILATION_CACHE_DIR`` (see ``main_env``).
    """
    import jax
    from jax._src import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(path), 0.0, 0)):
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


def cache_dir_for(tmp_path_factory) -> pathlib.Path:
    """One compilation cache folder for the whole test session."""
    path = tmp_path_factory.getbasetemp() / "jax_compile_cache"
    path.mkdir(exist_ok=True)
    return path


def one_line_error(fn, *args, **kwargs) -> str:
    """The UserError ``fn(*args, **kwargs)`` raises, checked to be one line."""
    import pytest

    from mtl_jax.errors import UserError

    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message
