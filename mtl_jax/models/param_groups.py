"""Parameter groups: which parameters share an lr, schedule and weight decay, or stay frozen.

``config.optim.groups`` maps a group name to a rule::

    c.optim.groups.encoder = dict(labels="embeddings|encoder", lr=2e-5)
    c.optim.groups.heads = dict(labels="heads/.*|pooler", lr=1e-3, weight_decay=0.0)
    c.optim.groups.frozen = dict(match=r"embeddings/position", frozen=True)

A rule selects parameters by ``match`` (regex searched in the "/"-joined parameter path, e.g.
``encoder/layers_0/attention/query/kernel``) and/or ``labels`` (regex fully matching the label
``model.param_labels`` gives the parameter: embeddings, encoder, pooler, heads/<task>, peft,
prefix); with both, both must hold. Unset fields (``lr<0``, ``schedule=""``, ...) take the
``optim.*`` defaults. Every parameter must match exactly one group. An empty ``optim.groups``
means one group ``all``, or, for a PEFT kind that keeps the checkpoint fixed
(``PeftKind.freezes_checkpoint``), ``frozen`` (labels embeddings|encoder|pooler: the pretrained
checkpoint) plus ``trainable`` (the rest).

This is config and parameter-tree bookkeeping only (no optax), so the model can ask what is frozen
(``frozen_mask``) without importing the training package; ``mtl_jax.training.optim`` builds the
optimizer on the same assignment.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import ml_collections

from mtl_jax.errors import UserError
from mtl_jax.models import summary as summary_lib

GROUP_DEFAULTS = dict(match="", labels="", lr=-1.0, schedule="", warmup_fraction=-1.0,
                      weight_decay=-1.0, frozen=False)


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


# --- groups ------------------------------------------------------------------------------------

def default_groups(config) -> dict:
    """No ``optim.groups``: one group, or, for a PEFT kind that keeps the pretrained checkpoint
    fixed (BERT's pooler too), that frozen group plus everything else trainable."""
    frozen_labels = summary_lib.frozen_labels(config.peft.kind)
    if frozen_labels:
        frozen = "|".join(frozen_labels)
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
    ``frozen=True``); the same group assignment ``optim.build_optimizer`` makes (the negation of
    ``Optimizer.trainable_mask``). Works on arrays and ShapeDtypeStructs."""
    groups = resolve_groups(config)
    frozen = {g.name: g.frozen for g in groups}
    return jax.tree.map(frozen.__getitem__, assign_groups(groups, params, labels))
