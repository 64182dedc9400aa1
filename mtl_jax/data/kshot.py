"""k-shot training subsets (``tasks.<name>.k_shot = k``, ``tasks.<name>.k_shot_seed = s``).

Classification examples (those with a ``label``): exactly k of each class, or every example of a
class that has fewer (a note says so). Other types (regression, token classification, extractive
QA): k examples. Each pick is the first k of a permutation drawn from
``np.random.default_rng([s, crc32(class name)])`` over the class's examples in file order, so a
class's subset depends only on (k, s) and its own examples: adding, removing or reordering
examples of another class does not change it, nor does the order of the label names. For a fixed
seed the subsets are nested in k (the 16-shot subset lies inside the 64-shot one). The subset
keeps file order.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np


def _pick(members: Sequence[int], k: int, seed: int, salt: str) -> list[int]:
    """The first ``k`` of a seeded permutation of ``members``."""
    members = np.asarray(members, dtype=np.int64)
    order = np.random.default_rng([seed, zlib.crc32(salt.encode())]).permutation(len(members))
    return members[order[:k]].tolist()


def k_shot(examples: list[dict], k: int, seed: int,
           label_names: Sequence[str] = ()) -> tuple[list[dict], list[str]]:
    """(the k-shot subset of ``examples`` in file order, notes for the log)."""
    if examples and "label" in examples[0]:
        keep, notes = _per_class(examples, k, seed, label_names)
    else:
        keep = _pick(range(len(examples)), k, seed, "")
        notes = ([f"k_shot={k}: only {len(examples)} examples, all taken"]
                 if len(examples) < k else [])
    keep.sort()
    summary = f"k_shot={k} (seed {seed}): {len(keep)} of {len(examples)} examples"
    return [examples[i] for i in keep], [summary, *notes]


def _per_class(examples, k, seed, label_names) -> tuple[list[int], list[str]]:
    by_class: dict[int, list[int]] = {}
    for i, example in enumerate(examples):
        by_class.setdefault(int(example["label"]), []).append(i)
    keep, notes = [], []
    for label in range(max(len(label_names), max(by_class) + 1)):
        name = label_names[label] if label < len(label_names) else str(label)
        members = by_class.get(label, [])
        keep += _pick(members, k, seed, name)
        if len(members) < k:
            notes.append(f"k_shot={k}: class {name} has only {len(members)} examples, all taken")
    return keep, notes
