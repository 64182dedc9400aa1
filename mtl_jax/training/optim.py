"""The optimizer: global-norm clipping, then per parameter group its lr schedule, weight decay and
update rule (``optim.name``), or frozen; gradient accumulation on top.

Which parameters form which group (``config.optim.groups``, or the defaults: one group ``all``,
or ``frozen`` + ``trainable`` with PEFT) is ``mtl_jax.models.param_groups``; its ``frozen_mask``
answers "does the optimizer freeze this parameter?" without building the optimizer.

Two registries hold every named choice here: ``SCHEDULES`` (``optim.schedule`` and a group's
``schedule``) and ``OPTIMIZERS`` (``optim.name``); a new schedule or update rule is one entry.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mtl_jax.errors import UserError
from mtl_jax.models.param_groups import Group, assign_groups, param_paths, resolve_groups
from mtl_jax.registry import Registry

# (peak lr, total updates, warmup updates) -> schedule(update count) -> lr
SCHEDULES: Registry[Callable[[float, int, int], optax.Schedule]] = Registry("schedule")

# optim.name -> (group, its schedule, the config's optim section, decay mask) -> the group's
# transformation. The decay mask (``decay_mask``) says where ``group.weight_decay`` applies.
GroupTx = Callable[[Group, optax.Schedule, ml_collections.ConfigDict, Any],
                   optax.GradientTransformation]
OPTIMIZERS: Registry[GroupTx] = Registry("optimizer")


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: a static TrainState field
class Optimizer:
    """The optax transformation plus what the step needs to log and mask."""

    tx: optax.GradientTransformation
    group_of: Any  # params-shaped tree of group names
    schedules: dict  # trainable group name -> schedule(update_count) -> lr
    main_group: str  # the group whose lr is logged as train/lr
    accumulate_steps: int

    def learning_rates(self, step) -> dict:
        """{group: lr} at train-step ``step`` (optimizer updates = step // accumulate_steps)."""
        count = step // self.accumulate_steps
        return {name: sched(count) for name, sched in self.schedules.items()}

    def trainable_mask(self) -> Any:
        return jax.tree.map(lambda g: g in self.schedules, self.group_of)


# --- schedules ---------------------------------------------------------------------------------

def _warmup(lr: float, warmup: int, after: optax.Schedule) -> optax.Schedule:
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


@SCHEDULES.register("constant")
def _constant(lr, total, warmup):  # warmup then constant ("constant_with_warmup")
    return _warmup(lr, warmup, optax.constant_schedule(lr))


@SCHEDULES.register("linear")
def _linear(lr, total, warmup):
    return _warmup(lr, warmup, optax.linear_schedule(lr, 0.0, max(total - warmup, 1)))


@SCHEDULES.register("cosine")
def _cosine(lr, total, warmup):
    return _warmup(lr, warmup, optax.cosine_decay_schedule(lr, max(total - warmup, 1)))


def make_schedule(group: Group, total_updates: int) -> optax.Schedule:
    warmup = int(group.warmup_fraction * total_updates)
    return SCHEDULES.get(group.schedule)(group.lr, total_updates, warmup)


# --- update rules ------------------------------------------------------------------------------

@OPTIMIZERS.register("adamw")
def _adamw(group: Group, schedule, o, decay) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=group.weight_decay, mask=decay)


@OPTIMIZERS.register("sgd")
def _sgd(group: Group, schedule, o, decay) -> optax.GradientTransformation:
    # optim.b1 doubles as the momentum; 0 means plain SGD (optax wants None, not 0, for that).
    return optax.chain(optax.add_decayed_weights(group.weight_decay, decay),
                       optax.sgd(schedule, momentum=o.b1 or None))


def decay_mask(params, no_decay: str) -> Any:
    """True where weight decay applies: not biases / norm scales (regex) and not 0/1-D leaves."""
    paths = param_paths(params)
    return jax.tree.map(lambda p, x: jnp.ndim(x) >= 2 and re.search(no_decay, p) is None,
                        paths, params)


# --- the optimizer -----------------------------------------------------------------------------

def build_optimizer(config, params, labels, total_steps: int) -> Optimizer:
    """Clip (global norm) -> per-group ``optim.name`` rule with its schedule, or set_to_zero for
    a frozen group -> MultiSteps."""
    o = config.optim
    group_tx = OPTIMIZERS.get(o.name)
    groups = resolve_groups(config)
    group_of = assign_groups(groups, params, labels)
    k = max(int(o.accumulate_steps), 1)
    total_updates = max(total_steps // k, 1)
    mask = decay_mask(params, o.no_decay)
    transforms, schedules = {}, {}
    for g in groups:
        if g.frozen:
            transforms[g.name] = optax.set_to_zero()
            continue
        schedules[g.name] = make_schedule(g, total_updates)
        transforms[g.name] = group_tx(g, schedules[g.name], o, mask)
    if not schedules:
        raise UserError("optim.groups: every group is frozen; unfreeze at least one group")
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    tx = optax.chain(*parts, optax.multi_transform(transforms, group_of))
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k)
    used = set(jax.tree.leaves(group_of))
    main = next(name for name in schedules if name in used) if used & set(schedules) else (
        next(iter(schedules)))
    return Optimizer(tx=tx, group_of=group_of, schedules=schedules, main_group=main,
                     accumulate_steps=k)
