"""The loop's steady-state steps move nothing between host and device implicitly.

From step 2 on, every step that neither logs, evaluates nor checkpoints (those read the device on
purpose) runs under ``jax.transfer_guard("disallow")``, from the end of the step before it to its
own end: the stop check, the next host batch and its placement (``run.batch``), the jitted step,
the metrics window and the loop's host counting. Host values reach the device only through an
explicit ``jax.device_put``.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.training import loop, runner
from mtl_jax.training.metrics_window import FINITE
from run_helpers import cache_dir_for, persistent_compile_cache, tiny_config

# Steps 1-6: logs at 3 and 6 (the last step also evaluates and checkpoints); 2, 4, 5 are quiet,
# and 4 starts a new metrics window.
SCHEDULE = dict(num_steps=6, log_every=3, eval_every=100, checkpoint_every=100)
QUIET = [2, 4, 5]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    with persistent_compile_cache(cache_dir_for(tmp_path_factory)):
        yield


class GuardQuietSteps:
    """An ``after_step`` hook: ``jax.transfer_guard("disallow")`` from the end of step k to the
    end of step k + 1 whenever step k + 1 is quiet (from step 2 on, no log, evaluation or
    checkpoint); ``guarded`` lists the steps that ran guarded to their end."""

    def __init__(self, train):
        self.train = train
        self.guarded: list[int] = []
        self._guard = contextlib.ExitStack()
        self._until: int | None = None

    def is_quiet(self, step: int) -> bool:
        t = self.train
        every = (t.log_every, t.eval_every, t.checkpoint_every)
        return 2 <= step < t.num_steps and all(step % n for n in every)

    def __call__(self, step, run_loop) -> None:
        del run_loop
        if self._until == step:
            self.close()
            self.guarded.append(step)
        if self.is_quiet(step + 1):
            self._guard.enter_context(jax.transfer_guard("disallow"))
            self._until = step + 1

    def close(self) -> None:  # also when the run fails with the guard on
        self._guard.close()
        self._until = None


def evaluate(state, step):
    del state
    return {"sent": {"accuracy": 0.5}}, {"sent": f"report at step {step}"}


def build(root, mode: str):
    config = tiny_config(root)
    config.train.update(SCHEDULE)
    config.parallel.mode = mode
    return runner.build_run(config)


@pytest.fixture(scope="module")
def jit_run(tmp_path_factory):
    return build(tmp_path_factory.mktemp("jit"), "jit")


def train_guarded(run, workdir, step_fn=None) -> GuardQuietSteps:
    guard = GuardQuietSteps(run.config.train)
    with contextlib.closing(guard):
        loop.train(run, str(workdir), evaluate_fn=evaluate, step_fn=step_fn, after_step=guard)
    return guard


def test_quiet_steps_make_no_implicit_transfer_on_the_jit_path(jit_run, tmp_path):
    assert jax.device_count() == 8  # batch split over 8 devices, the state's mesh
    guard = train_guarded(jit_run, tmp_path / "run")
    assert guard.guarded == QUIET


def test_the_guard_catches_an_implicit_transfer_in_a_quiet_step(jit_run, tmp_path):
    """The check above is not vacuous: a NumPy rng handed to the step at step 4 is refused."""
    calls, host = [], {}

    def host_rng_at_step_4(train_step):
        def step(state, batch, rng):
            calls.append(1)
            if len(calls) == 1:  # unguarded: read it here
                host["rng"] = np.asarray(rng)
            return train_step(state, batch, host["rng"] if len(calls) == 4 else rng)
        return step

    with pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed host-to-device transfer"):
        train_guarded(jit_run, tmp_path / "run", step_fn=host_rng_at_step_4)
    assert len(calls) == 4


def test_the_loop_dispatches_at_most_two_steps_ahead_of_the_devices(tmp_path):
    """Steps made slow (a chain of matmuls carried from step to step behind each step's finite
    flag; the loop reads the device only at the last step here): when step n + 1 is dispatched,
    steps up to n - 1 have finished, so a stop signal's checkpoint waits for two steps at most,
    not for the steps up to the next log. The wait is no transfer (the quiet steps run under the
    guard)."""
    config = tiny_config(tmp_path)
    config.train.update(num_steps=8, log_every=8, eval_every=100, checkpoint_every=100)
    run = runner.build_run(config)

    @jax.jit
    def slow_and_finite(flag, m):
        m = jax.lax.fori_loop(0, 1500, lambda i, m: jnp.tanh(m @ m), m)
        return flag & jnp.isfinite(m[0, 0]), m

    flags, unfinished, chain = [], [], []

    def slow_steps(train_step):
        def step(state, batch, rng):
            done = flags[:-loop.STEPS_IN_FLIGHT] if len(flags) > loop.STEPS_IN_FLIGHT else []
            unfinished.append(sum(not flag.is_ready() for flag in done))
            state, metrics = train_step(state, batch, rng)
            if not chain:  # step 1 is never guarded: the chain's start may come from the host
                chain.append(jax.device_put(jnp.full((128, 128), 0.01), metrics[FINITE].sharding))
            flag, chain[0] = slow_and_finite(metrics[FINITE], chain[0])
            flags.append(flag)
            return state, {**metrics, FINITE: flag}
        return step

    assert train_guarded(run, tmp_path / "run", step_fn=slow_steps).guarded == list(range(2, 8))
    assert unfinished == [0] * 8
