"""Clean stops on SIGTERM / SIGINT: the handler only sets a flag; the loop checks it each step,
writes a checkpoint and returns, so a preempted (or Ctrl-C'd) run resumes where it stopped.

    with PreemptionGuard() as guard:
        for step in ...:
            ...
            if guard.should_stop():
                save(); break
"""
from __future__ import annotations

import signal
import threading

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """Installs flag-setting handlers for SIGTERM/SIGINT; restores the previous ones on exit.

    A second SIGINT while the flag is already set raises KeyboardInterrupt, so a stuck run can
    still be interrupted by pressing Ctrl-C twice.
    """

    def __init__(self, signals=_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None  # the first signal number received
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def should_stop(self) -> bool:
        """True when any process received a stop signal (all processes agree, so all stop)."""
        import jax  # local: keep this module importable without initialising JAX

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        import numpy as np

        flags = multihost_utils.process_allgather(np.array(self.requested, np.int32))
        return bool(np.any(flags))

    def _handle(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.received = signum

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():  # signals: main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
