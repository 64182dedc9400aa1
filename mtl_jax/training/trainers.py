"""What a train step optimises (``train.algorithm``, a registry): the standard multi-task step,
or first-order meta-learning over sampled tasks (the math: ``meta_learning.py``).

A ``Trainer`` entry gives

  make_step(model, config, reducer, gram_fn) -> train_step(state, batch, rng) -> (state, metrics)
      the pure step body that ``parallel.py``'s strategies jit or pmap (``reducer``/``gram_fn``
      as for ``step.make_train_step``);
  episode(config) -> batching.Episode | None
      the batch layout the step needs; None: data.batch_mode's flat or stacked batches;
  check_config(config) -> None
      a ``UserError`` (one line naming the fix) for settings the trainer cannot run.

Entries:

  standard  ``step.make_train_step``: per-task losses, their weighting, one update.
  reptile   episodes [K, S, b]: g = mean_k (theta - phi_k) after S inner steps per task.
  fomaml    episodes [K, S + 1, b]: g = mean_k grad of the query loss at phi_k.

``num_steps`` counts outer steps for every entry; the outer update is the run's optimizer.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from mtl_jax.data.batching import Episode
from mtl_jax.errors import UserError
from mtl_jax.registry import Registry
from mtl_jax.training import meta_learning
from mtl_jax.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class Trainer:
    make_step: Callable
    episode: Callable[[object], Episode | None] = lambda config: None
    check_config: Callable[[object], None] = lambda config: None


TRAINERS: Registry[Trainer] = Registry("train.algorithm")


def get(config) -> Trainer:
    return TRAINERS.get(config.train.algorithm)


def example_axis(config) -> int:
    """The axis of the run's train batches that counts examples (``sharding.example_axis``):
    episodes 2, stacked 1, flat 0."""
    if get(config).episode(config) is not None:
        return 2
    return 1 if config.data.batch_mode == "stacked" else 0


TRAINERS.register("standard", Trainer(make_step=step_lib.make_train_step))


# --- meta-learning -----------------------------------------------------------------------------

def _check_meta(config) -> None:
    """Meta-learning builds its own one-task episode rows and averages the tasks' outer
    gradients equally, so loss weightings and other batch modes do not apply."""
    algorithm, m = config.train.algorithm, config.meta
    if config.weighting.name != "equal":
        raise UserError(f"train.algorithm={algorithm} averages the sampled tasks' outer "
                        f"gradients equally; set weighting.name=equal")
    if config.data.batch_mode != "homogeneous":
        raise UserError(f"train.algorithm={algorithm} builds its own episode batches (one task "
                        f"per row); set data.batch_mode=homogeneous (the default)")
    for key in ("tasks_per_step", "inner_steps"):
        if not m[key] >= 1:
            raise UserError(f"meta.{key}={m[key]!r} must be at least 1")
    if m.inner_batch_size < 0 or m.inner_lr < 0:
        raise UserError(f"meta.inner_batch_size={m.inner_batch_size} and meta.inner_lr="
                        f"{m.inner_lr} must not be negative (inner_batch_size 0 = "
                        f"train.batch_size)")
    meta_learning.INNER_OPTIMIZERS.get(m.inner_optimizer)


def _meta_trainer(outer_fn, query_steps: int) -> Trainer:
    """A meta-learning entry: ``query_steps`` sub-batches per task after the S inner ones."""
    def make_step(model, config, reducer=step_lib.Reducer(), gram_fn=None):
        del gram_fn  # no gradient surgery
        _check_meta(config)
        return meta_learning.make_meta_step(model, config, outer_fn, reducer)

    def episode(config) -> Episode:
        m = config.meta
        return Episode(int(m.tasks_per_step), int(m.inner_steps) + query_steps,
                       int(m.inner_batch_size or config.train.batch_size))

    return Trainer(make_step=make_step, episode=episode, check_config=_check_meta)


TRAINERS.register("reptile", _meta_trainer(meta_learning.reptile, query_steps=0))
TRAINERS.register("fomaml", _meta_trainer(meta_learning.fomaml, query_steps=1))
