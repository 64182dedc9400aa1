"""Optimizer with parameter groups: per-group lr, schedule, weight decay, or frozen.

``config.optim.groups`` maps a group name to a rule::

    c.optim.groups.encoder = dict(labels="embeddings|encoder", lr=2e-5)
    c.optim.groups.heads = dict(labels="heads/.*|pooler", lr=1e-3, weight_decay=0.0)
    c.optim.groups.frozen = dict(match=r"embeddings/position", frozen=True)

A rule selects parameters by ``match`` (regex searched in the "/"-joined parameter path, e.g.
``encoder/layers_0/attention/query/kernel``) and/or ``labels`` (regex fully matching the label
``model.param_labels`` gives the parameter: embeddings, encoder, pooler, heads/<task>, peft,
prefix); with both, both must hold. Unset fields (``lr<0``, ``schedule=""``, ...) take the
``optim.*`` defaults. Every parameter must match exactly one group. An empty ``optim.groups``
means one group ``all``, or, with PEFT (``peft.kind != none``), ``frozen`` (labels
embeddings|encoder|pooler: the pretrained checkpoint) plus ``trainable`` (the rest).

``frozen_mask(config, params, labels)`` answers "does the optimizer freeze this parameter?" without
building the optimizer (the same assignment as ``Optimizer.trainable_mask``, negated); the
parameter summary and the FLOPs count read it.
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
from mtl_jax.models.summary import FROZEN_BY_PEFT
from mtl_jax.registry import Registry

GROUP_DEFAULTS = dict(match="", labels="", lr=-1.0, schedule="", warmup_fraction=-1.0,
                      weight_decay=-1.0, frozen=False)
SCHEDULES: Registry[Callable[[float, int, int], optax.Schedule]] = Registry("schedule")


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    match: str
    labels: str
    lr: float
    schedule: str
    warmup_fraction: float
    weight_decay: float
    frozen: bool


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


# --- parameter paths ---------------------------------------------------------------------------

def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    return "/".join(_key_name(k) for k in path)


def param_paths(params) -> Any:
    """The params tree with each leaf replaced by its "/"-joined path."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), params)


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


# --- groups ------------------------------------------------------------------------------------

def default_groups(config) -> dict:
    if config.peft.kind != "none":  # the whole pretrained checkpoint stays fixed, BERT's pooler too
        frozen = "|".join(FROZEN_BY_PEFT)
        return dict(frozen=dict(labels=frozen, frozen=True),
                    trainable=dict(labels=rf"(?!(?:{frozen})$).*"))
    return dict(all=dict(match=".*"))


def resolve_groups(config) -> list[Group]:
    """Groups from ``optim.groups`` (or the defaults) with unset fields taken from ``optim``."""
    o = config.optim
    raw = o.get("groups") or {}
    raw = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
    raw = raw or default_groups(config)
    out = []
    for name, rule in raw.items():
        unknown = set(rule) - set(GROUP_DEFAULTS)
        if unknown:
            raise UserError(f"optim.groups.{name} has unknown fields {sorted(unknown)}; "
                            f"valid fields: {', '.join(GROUP_DEFAULTS)}")
        r = {**GROUP_DEFAULTS, **rule}
        if not r["match"] and not r["labels"]:
            raise UserError(f"optim.groups.{name} selects nothing; set its `match` (path regex) "
                            f"or `labels` (label regex)")
        out.append(Group(
            name=name, match=r["match"], labels=r["labels"], frozen=bool(r["frozen"]),
            lr=o.lr if r["lr"] < 0 else float(r["lr"]),
            schedule=r["schedule"] or o.schedule,
            warmup_fraction=o.warmup_fraction if r["warmup_fraction"] < 0 else r["warmup_fraction"],
            weight_decay=o.weight_decay if r["weight_decay"] < 0 else float(r["weight_decay"])))
    return out


def _matches(group: Group, path: str, label: str) -> bool:
    ok = True
    if group.match:
        ok &= re.search(group.match, path) is not None
    if group.labels:
        ok &= re.fullmatch(group.labels, label) is not None
    return ok


def assign_groups(groups: list[Group], params, labels) -> Any:
    """Params-shaped tree of group names; raises one UserError naming every bad path."""
    paths = param_paths(params)
    flat_paths, treedef = jax.tree.flatten(paths)
    flat_labels = treedef.flatten_up_to(labels)
    names, unmatched, multiple = [], [], []
    for path, label in zip(flat_paths, flat_labels):
        hits = [g.name for g in groups if _matches(g, path, label)]
        if not hits:
            unmatched.append(f"{path} [{label}]")
        elif len(hits) > 1:
            multiple.append(f"{path} [{label}] -> {'+'.join(hits)}")
        names.append(hits[0] if hits else "")
    if unmatched or multiple:
        parts = []
        if unmatched:
            parts.append(f"{len(unmatched)} parameter(s) match no group: {', '.join(unmatched)}")
        if multiple:
            parts.append(f"{len(multiple)} match several: {', '.join(multiple)}")
        raise UserError("optim.groups: " + "; ".join(parts) +
                        "; edit the groups' `match`/`labels` regexes so each parameter matches "
                        "exactly one group")
    return jax.tree.unflatten(treedef, names)


def frozen_mask(config, params, labels) -> Any:
    """Params-shaped tree of bools, True where the optimizer freezes the parameter (its group has
    ``frozen=True``); the same group assignment ``build_optimizer`` makes. Works on arrays and
    ShapeDtypeStructs."""
    groups = resolve_groups(config)
    frozen = {g.name: g.frozen for g in groups}
    return jax.tree.map(frozen.__getitem__, assign_groups(groups, params, labels))


def decay_mask(params, no_decay: str) -> Any:
    """True where weight decay applies: not biases / norm scales (regex) and not 0/1-D leaves."""
    paths = param_paths(params)
    return jax.tree.map(lambda p, x: jnp.ndim(x) >= 2 and re.search(no_decay, p) is None,
                        paths, params)


# --- the optimizer -----------------------------------------------------------------------------

def _group_tx(group: Group, schedule, config, mask) -> optax.GradientTransformation:
    o = config.optim
    if o.name == "adamw":
        return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=group.weight_decay, mask=mask)
    if o.name == "sgd":
        return optax.chain(optax.add_decayed_weights(group.weight_decay, mask),
                           optax.sgd(schedule, momentum=o.b1 or None))
    raise UserError(f"unknown optim.name {o.name!r}; valid: adamw, sgd")


def build_optimizer(config, params, labels, total_steps: int) -> Optimizer:
    """Clip (global norm) -> per-group AdamW with its schedule / set_to_zero -> MultiSteps."""
    o = config.optim
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
        transforms[g.name] = _group_tx(g, schedules[g.name], config, mask)
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
