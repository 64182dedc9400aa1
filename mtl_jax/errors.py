"""User-facing errors: one clear line on stderr and a non-zero exit, traceback only with --verbose.

Exit codes of ``python -m mtl_jax.main`` (also in the README):

    0   finished
    2   a user error (bad flag, config value, data file, workdir held by another run, ...)
    3   a non-finite loss with ``train.nan_policy=stop`` (the last good checkpoint is kept)
    4   a checkpoint could not be saved (the last committed checkpoint is kept)
    75  stopped by a signal (SIGTERM / SIGINT) after saving a checkpoint: run again to resume
        (EX_TEMPFAIL; launch/ requeues on it)
    130 interrupted (a second Ctrl-C, or one before training started): nothing was pending
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback


INTERRUPTED_EXIT_CODE = 130  # the shell's code for SIGINT
STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" for schedulers (Slurm requeue, TPU VM loop)


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, unknown name).

    The message must be one line that says what is wrong and names the fix. ``label`` starts the
    printed line; ``hard_exit`` ends the process at once after printing (background threads of
    a failed library call would otherwise keep it alive).
    """

    exit_code = 2
    label = "error"
    hard_exit = False


class RunStopped(UserError):
    """A signal stopped training after a checkpoint was saved; running again resumes."""

    exit_code = STOPPED_EXIT_CODE
    label = "stopped"


@contextlib.contextmanager
def user_errors(verbose: bool = False):
    """Turns UserError into one line on stderr and ``SystemExit(exit_code)``."""
    try:
        yield
    except UserError as e:
        if verbose:
            traceback.print_exc()
        print(f"{e.label}: {e}", file=sys.stderr)
        if e.hard_exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)  # pylint: disable=protected-access
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        # Ctrl-C before the training loop installs its handler (data loading, compiling), or a
        # second Ctrl-C inside it: checkpoints already written are kept, nothing else was pending.
        if verbose:
            traceback.print_exc()
        print("interrupted: checkpoints already in the workdir are kept; rerun the same command to "
              "resume", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
