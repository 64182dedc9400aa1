"""User-facing errors: one clear line on stderr and a non-zero exit, traceback only with --verbose."""
from __future__ import annotations

import contextlib
import sys
import traceback


INTERRUPTED_EXIT_CODE = 130  # the shell's code for SIGINT


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, unknown name).

    The message must be one line that says what is wrong and names the fix.
    """

    exit_code = 2


@contextlib.contextmanager
def user_errors(verbose: bool = False):
    """Turns UserError (and missing files) into one line on stderr and ``SystemExit(2)``."""
    try:
        yield
    except UserError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        # Ctrl-C before the training loop installs its handler (data loading, compiling), or a
        # second Ctrl-C inside it: checkpoints already written are kept, nothing else was pending.
        if verbose:
            traceback.print_exc()
        print("interrupted: checkpoints already in the workdir are kept; rerun the same command to "
              "resume", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
