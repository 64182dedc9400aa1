"""The progress display (mtl_jax/training/progress.py): a live bar redrawn with carriage returns
on a terminal, whole lines in a log (a pipe, a file). Unit tests on ``progress_display`` with a
stream that says it is a terminal and one that does not, then the same on a real pseudo-terminal
and a real pipe in a subprocess. Expected lines are worked out by hand in the comments."""
import fcntl
import io
import os
import re
import struct
import subprocess
import sys
import termios

import pytest

from mtl_jax.training.progress import LiveBar, LogLines, duration, progress_display
from run_helpers import REPO


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def drive(display):
    """10 steps, reported at steps 5 and 10 (a log interval of 5), at 40 examples/s, 2 steps/s."""
    with display:
        for step in range(1, 11):
            display.update(1)
            if step % 5 == 0:
                display.report(step, loss=1.0 / (step // 5), examples_per_s=40.0,
                               steps_per_s=2.0)


# Step 5 of 10 at 2 steps/s: 0.5 s/step, 5 steps left -> 2.5 s -> "0m02s"; step 10: none left.
EXPECTED_LINES = ["step 5/10: loss 1.0000, 40.0 examples/s, 0.500 s/step, eta 0m02s",
                  "step 10/10: loss 0.5000, 40.0 examples/s, 0.500 s/step, eta 0m00s"]


def test_a_terminal_gets_one_live_bar_redrawn_in_place():
    stream = FakeTerminal()
    display = progress_display(stream, total=10)
    assert isinstance(display, LiveBar)
    drive(display)
    out = stream.getvalue()
    assert out.count("\r") >= 2  # drawn, then redrawn over itself
    assert out.count("\n") == 1 and out.endswith("\n")  # one line in all: the bar, left at the end
    final = out.rsplit("\r", 1)[1]
    assert "10/10" in final and "loss=0.5000" in final and "ex_s=40.0" in final
    assert "step 5/10" not in out


def test_a_resumed_run_s_bar_starts_at_its_step():
    stream = FakeTerminal()
    with progress_display(stream, total=10, initial=6):
        pass
    assert "6/10" in stream.getvalue()


def test_a_log_gets_one_whole_line_per_report_and_no_carriage_returns():
    stream = io.StringIO()
    display = progress_display(stream, total=10)
    assert isinstance(display, LogLines)
    drive(display)
    assert "\r" not in stream.getvalue()
    assert stream.getvalue() == "".join(line + "\n" for line in EXPECTED_LINES)


def test_progress_off_gives_lines_even_on_a_terminal():
    stream = FakeTerminal()
    drive(progress_display(stream, total=10, bar=False))
    assert stream.getvalue().splitlines() == EXPECTED_LINES


def test_a_stream_without_isatty_counts_as_a_log():
    class Bare:  # e.g. a logging adapter: write and flush only
        def __init__(self):
            self.text = ""

        def write(self, text):
            self.text += text

        def flush(self):
            pass

    stream = Bare()
    drive(progress_display(stream, total=10))
    assert stream.text.splitlines() == EXPECTED_LINES


def test_processes_other_than_0_show_nothing():
    stream = FakeTerminal()
    drive(progress_display(stream, total=10, shown=False))
    assert stream.getvalue() == ""


def test_an_unknown_rate_gives_an_unknown_eta():
    stream = io.StringIO()
    progress_display(stream, total=10).report(1, loss=2.0, examples_per_s=0.0, steps_per_s=0.0)
    assert stream.getvalue() == "step 1/10: loss 2.0000, 0.0 examples/s, inf s/step, eta ?\n"


@pytest.mark.parametrize("seconds, shown", [(0, "0m00s"), (75.9, "1m15s"), (3599, "59m59s"),
                                            (3700, "1h01m"), (90000, "25h00m"),
                                            (float("nan"), "?")])
def test_duration(seconds, shown):
    assert duration(seconds) == shown


# --- a real terminal and a real pipe -----------------------------------------------------------

CHILD = """
import sys
from mtl_jax.training.progress import progress_display

display = progress_display(sys.stderr, total=10)
with display:
    for step in range(1, 11):
        display.update(1)
        if step % 5 == 0:
            display.report(step, loss=1.0 / (step // 5), examples_per_s=40.0, steps_per_s=2.0)
print(type(display).__name__, file=sys.stderr)
"""


def child_stderr(stderr) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TERM="xterm")
    return subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)


def read_terminal(master: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end of the terminal
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode()


def test_on_a_pseudo_terminal_the_bar_is_live_and_on_a_pipe_it_is_lines():
    master, slave = os.openpty()
    # 24 x 80, as a terminal window has (a bare pty is 0 x 0, where tqdm draws an empty bar)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        proc = child_stderr(slave)
        os.close(slave)
        terminal = read_terminal(master)
        assert proc.wait(timeout=60) == 0, terminal
    finally:
        os.close(master)
    # The terminal turns "\n" into "\r\n"; the bar's redraws are the "\r" that no "\n" follows.
    assert re.search(r"\r(?!\n)", terminal), repr(terminal)
    assert "10/10" in terminal and "loss=0.5000" in terminal and "step 5/10" not in terminal
    assert terminal.splitlines()[-1] == "LiveBar"

    piped = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == "".join(line + "\n" for line in [*EXPECTED_LINES, "LogLines"])
