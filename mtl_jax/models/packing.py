"""The model's side of sequence packing (batch layout: data/packing.py).

The encoder runs on the packed rows [R, Lp]: positions restart in every segment (BERT's
absolute positions; T5's relative bias depends on key - query only, the same inside a segment
wherever it sits in the row), a block-diagonal mask keeps every query inside its own segment,
and each token carries its example's task id, so per-task PEFT is routed per token
(peft_layers; prefixes: every task's prefix is in every row, each query sees its own task's,
prefix.packed_prefix). ``example_hidden`` then gathers each example's hidden states back to
[B, Le], so pooling, heads, losses and their per-example normalisation are the unpacked code.
Without the packed keys both functions are the identity.
"""
from __future__ import annotations

import jax

from mtl_jax.data.packing import INDEX_KEY


def is_packed(batch) -> bool:
    """The layout is a property of the batch's keys (static under jit)."""
    return INDEX_KEY in batch


def encoder_inputs(batch, with_task_ids: bool) -> dict:
    """The encoder's keyword arguments for ``batch``: its [B, L] arrays, or the packed rows with
    their segment ids, restarted positions and per-token task ids."""
    if not is_packed(batch):
        task_ids = batch["task_id"].astype("int32") if with_task_ids else None
        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"), task_ids=task_ids)
    segments = batch["packed_segment_ids"]
    return dict(input_ids=batch["packed_input_ids"], attention_mask=(segments > 0).astype("int32"),
                token_type_ids=batch["packed_token_type_ids"],
                task_ids=batch["packed_task_ids"] if with_task_ids else None,
                segment_ids=segments, position_ids=batch["packed_position_ids"])


def example_hidden(hidden: jax.Array, batch) -> jax.Array:
    """Encoder output -> [B, Le, H] per example (packed: a gather from the [R * Lp] tokens)."""
    if not is_packed(batch):
        return hidden
    flat = hidden.reshape((-1, hidden.shape[-1]))
    return flat[batch[INDEX_KEY]]


def rows(batch) -> int:
    """The number of sequences the encoder runs on (packed rows, or examples)."""
    key = "packed_input_ids" if is_packed(batch) else "input_ids"
    return batch[key].shape[0]
