"""`python -m mtl_jax.main` argument errors: one line naming the fix, exit code 2, no traceback
(unless --verbose). Each case fails during flag parsing, before any training code is imported."""
import subprocess
import sys

import pytest

from conftest import REPO

BASE = "--config=configs/base.py"


def run_main(*args):
    proc = subprocess.run([sys.executable, "-m", "mtl_jax.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def assert_one_line_error(args, expected):
    """``expected``: the whole line, or its start when it ends with "..." (suggestion lists
    grow as other sections add keys)."""
    code, err = run_main(*args)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    if expected.endswith("..."):
        assert lines[0].startswith(f"error: {expected[:-3]}"), err
    else:
        assert lines[0] == f"error: {expected}", err


@pytest.mark.parametrize("args, expected", [
    ([BASE, "--config.optim.lrr=1"],
     "unknown config key --config.optim.lrr; did you mean --config.optim.lr..."),
    ([BASE, "--config.trian.num_steps=5"],
     "unknown config key --config.trian.num_steps; did you mean --config.train.num_steps..."),
    ([BASE, "--modee=eval"], "unknown flag --modee; did you mean --mode?"),
    ([BASE, "--bogus=1"], "unknown flag --bogus; see --help"),
    ([BASE, "--config.train.num_steps=abc"],
     "bad value 'abc' for --config.train.num_steps: expected int (default 1000)"),
    ([BASE, "--config.optim.lr=fast"],
     "bad value 'fast' for --config.optim.lr: expected float (default 5e-05)"),
    ([BASE, "--config.train.progress=maybe"],
     "bad value 'maybe' for --config.train.progress: expected bool (default True)"),
    (["--config=configs/nope.py", "--config.optim.lr=1"],
     "config file configs/nope.py not found; pass --config=PATH of an existing config .py file "
     "(e.g. --config=configs/base.py)"),
    ([BASE, "--mode=fit"],
     "flag --mode=fit: value should be one of <train|eval|predict>"),
])
def test_bad_arguments_are_one_line(args, expected):
    assert_one_line_error(args, expected)


def test_broken_config_file_is_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    assert_one_line_error(
        [f"--config={broken}"],
        f"config file {broken} failed to load (SyntaxError: invalid syntax (broken.py, line 1)); "
        "fix it or run with --verbose for the traceback")


def test_missing_config_flag():
    code, err = run_main("--workdir=/tmp/x")
    assert code != 0 and "Traceback" not in err
    assert "--config" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, exception", [
    ([BASE, "--config.optim.lrr=1", "--verbose"], "AttributeError"),
    (["--config=configs/nope.py", "--verbose"], "UserError: config file configs/nope.py not found"),
])
def test_verbose_shows_the_traceback(args, exception):
    code, err = run_main(*args)
    assert code != 0
    assert "Traceback (most recent call last)" in err
    assert exception in err
