"""What a tiny two-task run (tests/run_helpers.tiny_config: 4 steps, evaluated at steps 2 and 4)
records and shows: its TensorBoard event file read back with TensorBoard's own reader agrees
with metrics.jsonl, and its progress is whole lines in a log and a live bar on a terminal (stderr
a terminal, stdout not: the bar is drawn on stderr)."""
import io
import math
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from mtl_jax.training import loop, runner
from mtl_jax.training.metrics_writer import read_metrics
from run_helpers import cache_dir_for, persistent_compile_cache, tiny_config

TASKS = ("sent", "ner")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(cache_dir_for(tmp_path_factory)):
        yield


def train_tiny(root):
    """Logs at steps 2 and 4 (log_every=2), with the progress bar on (where there is a terminal).
    num_steps=4 as in the other tiny runs: the same compiled steps (compile cache)."""
    config = tiny_config(root, TASKS)
    config.train.update(dict(log_every=2, progress=True))
    workdir = root / "run"
    loop.train(runner.build_run(config), str(workdir))
    return workdir, read_metrics(str(workdir / "metrics.jsonl"))


def tensorboard_scalars(workdir) -> dict:
    """{(tag, step): value} as TensorBoard reads the run's event files."""
    reader = event_accumulator.EventAccumulator(
        str(workdir / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    return {(tag, e.step): e.value for tag in reader.Tags()["scalars"]
            for e in reader.Scalars(tag)}


def test_tensorboard_has_the_namespaced_scalars_of_metrics_jsonl_and_log_lines(tmp_path,
                                                                                capsys):
    workdir, events = train_tiny(tmp_path)
    scalars = tensorboard_scalars(workdir)
    tags = {tag for tag, _ in scalars}
    for task in TASKS:
        assert {(f"train/loss/{task}", 2), (f"train/loss/{task}", 4)} <= scalars.keys(), tags
    for tag in ("eval/sent/accuracy", "eval/ner/f1"):
        assert {(tag, 2), (tag, 4)} <= scalars.keys(), tags
    # Every finite value of metrics.jsonl, at its step, and nothing else; TensorBoard keeps
    # float32, so each value must be the float32 of the JSON one exactly.
    logged = {(key, e["step"]): value for e in events for key, value in e.items()
              if key != "step" and math.isfinite(value)}
    assert scalars.keys() == logged.keys()
    assert {k: float(np.float32(v)) for k, v in logged.items()} == scalars

    # No terminal under pytest: one whole line per log step, no carriage returns.
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if re.match(r"step \d+/4: loss ", line)]
    losses = {e["step"]: e["train/loss"] for e in events if "train/loss" in e}
    assert [line.split(",")[0] for line in lines] == [
        f"step {step}/4: loss {losses[step]:.4f}" for step in (2, 4)]
    assert all(re.fullmatch(r"step \d/4: loss [\d.]+, [\d.]+ examples/s, [\d.]+ s/step, "
                            r"eta \d+m\d\ds", line) for line in lines), lines


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_run_draws_a_live_bar_on_stderr(tmp_path, capsys, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)  # stdout stays pytest's capture: not a terminal
    _, events = train_tiny(tmp_path)
    shown = terminal.getvalue()
    final_loss = next(e["train/loss"] for e in events if e["step"] == 4 and "train/loss" in e)
    bar = shown.rsplit("\r", 1)[1]  # the last redraw
    assert "4/4" in bar and f"loss={final_loss:.4f}" in bar, repr(shown[-300:])
    assert not re.search(r"^step \d+/4: loss", shown, re.MULTILINE)  # no log lines as well
    # Status lines come through tqdm: the bar is cleared ("\r"), the line written whole, the bar
    # drawn again below it.
    for step in (2, 4):
        start = shown.index(f"step {step} eval: ")
        assert shown[start - 1] == "\r" and "\n" in shown[start:shown.index("\r", start)]
