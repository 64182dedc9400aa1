"""Sequence packing (``data.packing``): several examples per row, the rows padded to one length.

A packed batch is built FROM the unpacked one (``batching.make_batch``), so its examples, their
order, labels and weights are exactly the unpacked batch's; only the token arrays move:

  per example (as unpacked)   task_id, weight [B]; labels [B] or [B, Le]; attention_mask [B, Le]
  packed rows                 packed_input_ids, packed_token_type_ids, packed_segment_ids
                              (1.. per example in its row, 0 = padding), packed_position_ids
                              (restart at 0 in every segment), packed_task_ids (each token's
                              task, for per-token PEFT routing) [R, Lp]
  the way back                packed_index [B, Le]: position j of example e sits at flat
                              token ``packed_index[e, j]`` of the [R * Lp] rows (0 on padding)

``train.batch_size`` counts examples, as without packing: a step sees the same examples and the
loss is normalised per example exactly as unpacked (the model gathers every example's hidden
states back to [B, Le] before the heads, models/packing.py). R, the number of rows a step's
examples fill, varies from batch to batch; it is rounded up to ``data.packing_row_multiple``
times one of 1, 2, 3, 4, 6, 8, 12, ... (``row_count``), so only a few shapes compile, under a
third of the rows are padding, and rows split evenly over the data-parallel devices. Rows are
filled first-fit-decreasing, a pure function of the batch, so the iterator's resumable state
needs nothing new.
"""
from __future__ import annotations

import numpy as np

from mtl_jax.errors import UserError

TOKEN_KEYS = ("input_ids", "token_type_ids")  # moved into the rows; attention_mask stays
PACKED_KEYS = ("packed_input_ids", "packed_token_type_ids", "packed_segment_ids",
               "packed_position_ids", "packed_task_ids")
INDEX_KEY = "packed_index"


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= ``capacity``: items longest first (ties
    by index), each into the first bin with room. Deterministic; every item in one bin."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > capacity:
        raise UserError(f"an example of {int(lengths.max())} tokens does not fit a packed row of "
                        f"{capacity}; raise data.packing_length (or lower the task's max_length)")
    bins: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(lengths.size), key=lambda i: (-lengths[i], i)):
        n = int(lengths[item])
        slot = next((b for b, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(item)
        room[slot] -= n
    return bins


def row_count(bins: int, multiple: int) -> int:
    """``bins`` rows rounded up to ``multiple`` times the next of 1, 2, 3, 4, 6, 8, 12, 16, ...
    (2^k and 3 * 2^k): under a third of the rows are padding, and a batch of B examples
    compiles at most ~2 log2(B / multiple) row counts (plain multiples of 8 wasted half the
    rows of short GLUE batches: 5 rows' worth of examples took 8)."""
    units = max(1, -(-bins // multiple))
    size = 1
    while size < units:  # 1 -> 2; a power of two p -> 3p/2; 3p/2 -> 2p
        if size == 1:
            size = 2
        elif size & (size - 1) == 0:
            size += size // 2
        else:
            size = size // 3 * 4
    return size * multiple


def pack_batch(batch: dict, row_length: int, row_multiple: int) -> dict:
    """The unpacked ``batch`` ([B, Le] token arrays) as packed rows (module docstring).
    Examples of weight 0 (batch padding) take no row space; their index points at token 0."""
    if batch["input_ids"].ndim != 2:
        raise UserError("data.packing cannot pack multiple-choice batches ([B, C, L]); set "
                        "data.packing=False for runs with a multiple-choice task")
    lengths = batch["attention_mask"].sum(-1).astype(np.int64)
    real = np.flatnonzero(batch["weight"] > 0)
    bins = first_fit_decreasing(lengths[real], row_length)
    rows = row_count(len(bins), row_multiple)
    out = {k: v for k, v in batch.items() if k not in TOKEN_KEYS}
    packed = {k: np.zeros((rows, row_length), np.int32) for k in PACKED_KEYS}
    index = np.zeros(batch["attention_mask"].shape, np.int32)
    for r, members in enumerate(bins):
        offset = 0
        for segment, item in enumerate(members, start=1):
            e, n = int(real[item]), int(lengths[real[item]])
            span = slice(offset, offset + n)
            packed["packed_input_ids"][r, span] = batch["input_ids"][e, :n]
            packed["packed_token_type_ids"][r, span] = batch["token_type_ids"][e, :n]
            packed["packed_segment_ids"][r, span] = segment
            packed["packed_position_ids"][r, span] = np.arange(n)
            packed["packed_task_ids"][r, span] = batch["task_id"][e]
            index[e, :n] = r * row_length + offset + np.arange(n)
            offset += n
    out.update(packed)
    out[INDEX_KEY] = index
    return out

