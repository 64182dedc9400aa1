"""How a run shows its progress: a live tqdm bar on a terminal, whole lines anywhere else.

A bar redraws itself with carriage returns; a log file (CI, nohup, a Slurm job's output) keeps
every redraw, so there the same figures come as one plain line per report instead (the loop
reports every ``train.log_every`` steps). ``progress_display`` makes the choice once, from the
stream the display writes to.
"""
from __future__ import annotations

import math
from typing import TextIO


class Display:
    """Shows nothing: the interface, and what processes other than process 0 get."""

    def update(self, steps: int = 1) -> None:
        """``steps`` more steps are done."""

    def report(self, step: int, *, loss: float, examples_per_s: float,
               steps_per_s: float) -> None:
        """The figures of a log step."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LiveBar(Display):
    """tqdm, redrawn in place; it shows the rate and the ETA itself."""

    def __init__(self, stream: TextIO, total: int, initial: int):
        import tqdm

        self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                              file=stream)

    def update(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def report(self, step, *, loss, examples_per_s, steps_per_s) -> None:
        self._bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{examples_per_s:.1f}", refresh=False)

    def close(self) -> None:
        self._bar.close()


class LogLines(Display):
    """One whole line per report: ``step 50/1000: loss 0.4100, 512.0 examples/s, 0.062
    s/step, eta 0m59s``."""

    def __init__(self, stream: TextIO, total: int):
        self.stream, self.total = stream, total

    def report(self, step, *, loss, examples_per_s, steps_per_s) -> None:
        seconds_per_step = 1.0 / steps_per_s if steps_per_s > 0 else math.inf
        remaining = (self.total - step) * seconds_per_step if step < self.total else 0.0
        self.stream.write(f"step {step}/{self.total}: loss {loss:.4f}, "
                          f"{examples_per_s:.1f} examples/s, {seconds_per_step:.3f} s/step, "
                          f"eta {duration(remaining)}\n")
        self.stream.flush()


def progress_display(stream: TextIO, *, total: int, initial: int = 0, bar: bool = True,
                     shown: bool = True) -> Display:
    """A live bar when ``bar`` and ``stream`` is a terminal, lines otherwise; nothing when not
    ``shown`` (processes other than 0)."""
    if not shown:
        return Display()
    if bar and _is_terminal(stream):
        return LiveBar(stream, total, initial)
    return LogLines(stream, total)


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)  # some stream wrappers have no isatty
    return bool(isatty and isatty())


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``3700`` -> ``1h01m``; ``?`` when unknown (inf/NaN)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"
