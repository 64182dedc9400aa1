"""``python tests/pausing_main.py --pause_at_step=K FLAGS...``: ``python -m mtl_jax.main FLAGS...``
that pauses after step K, so a test can SIGTERM or SIGKILL a run at a known point.

After step K (or the first step past it, when a resume starts there) the run waits for its
checkpoint writes, flushes its metrics, says ``paused at step K`` on stderr, then waits until a
stop signal arrives (the loop's PreemptionGuard); the loop then goes on as after any signal.
The pause is ``loop.train``'s ``after_step`` hook, installed here: mtl_jax itself has no pause.
"""
import functools
import sys
import time

from mtl_jax import cli
from mtl_jax import main as mtl_main
from mtl_jax.training import loop

FLAG = "--pause_at_step="


def pause_after(pause_at: int):
    """An ``after_step(step, loop)`` hook that pauses at every step from ``pause_at`` on (after
    a signal the loop stops at its next step, so it pauses once)."""
    def after_step(step: int, run_loop: loop.Loop) -> None:
        if step < pause_at:
            return
        run_loop.ckpt.wait()
        run_loop.writer.flush()
        print(f"paused at step {step}", file=sys.stderr, flush=True)
        while not run_loop.guard.requested:
            time.sleep(0.02)
    return after_step


def pausing_main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].startswith(FLAG):
        raise SystemExit(f"usage: {sys.argv[0]} {FLAG}STEP MAIN_FLAGS...")
    pause_at = int(sys.argv[1][len(FLAG):])
    del sys.argv[1]  # the rest is mtl_jax.main's command line, as the tests would pass it
    # The runner calls loop.train(run, workdir): this is where the hook goes in.
    loop.train = functools.partial(loop.train, after_step=pause_after(pause_at))
    cli.run(mtl_main.main)


if __name__ == "__main__":
    pausing_main()
