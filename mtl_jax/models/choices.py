"""The choice axis of a run with a multiple-choice task (see tasks/types.py ``MultipleChoice``).

Such a run's token arrays are [B, C, L]: every row (example) has C sequence slots; a row of a
multiple-choice task holds one (context, choice) pair per slot, any other row only slot 0. The
encoder sees the [B * C, L] flattening, each slot with its row's ``task_id`` (so PEFT gathers
the row's task rows for every choice); the heads get slot 0 as the usual [B, ...] Features and
every slot's pooled vector as ``Features.choices`` [B, C, H]. Without a choice axis ([B, L])
both functions are the identity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.models.heads import Features

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
ROW_KEYS = ("task_id", "weight")  # per row: repeated for each of its slots


def num_choices(batch) -> int:
    """C of a [B, C, L] batch, 0 for [B, L]."""
    mask = batch["attention_mask"]  # packed batches (models/packing.py) have no input_ids
    return mask.shape[1] if mask.ndim == 3 else 0


def encoder_batch(batch) -> dict:
    """What the encoder (and the sharing/PEFT functions) read, one sequence per row: the batch
    itself, or [B, C, L] -> [B * C, L] with each row's task_id and weight repeated C times."""
    choices = num_choices(batch)
    if not choices:
        return batch
    flat = {k: batch[k].reshape((-1, batch[k].shape[-1])) for k in TOKEN_KEYS if k in batch}
    flat.update({k: jnp.repeat(batch[k], choices, axis=0) for k in ROW_KEYS if k in batch})
    return flat


def head_features(hidden: jax.Array, pooled: jax.Array, batch) -> Features:
    """Encoder outputs of ``encoder_batch(batch)`` -> the heads' Features on ``batch``'s rows."""
    choices = num_choices(batch)
    if not choices:
        return Features(hidden, batch["attention_mask"], pooled)
    rows = batch["attention_mask"].shape[0]
    hidden = hidden.reshape((rows, choices) + hidden.shape[1:])
    per_slot = pooled.reshape((rows, choices) + pooled.shape[1:])
    return Features(hidden[:, 0], batch["attention_mask"][:, 0], per_slot[:, 0], per_slot)
