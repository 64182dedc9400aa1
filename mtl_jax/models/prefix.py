"""Per-task prefix tuning (Li & Liang, 2021): trainable prefixes turned into per-layer keys/values.

Training form, ``params["prefix"] = {"embedding": [T, P, d], "mlp": {hidden, out}}``:
the [T, P, d] embedding goes through an MLP d -> prefix_hidden (tanh) -> layers * 2 * heads *
head_dim, whose output kernel is [prefix_hidden, layers, 2, heads, head_dim] so every shape is
readable from the parameters alone. The MLP runs once per step on the T * P table (not per
example); each example then gathers its own task's rows by ``task_id``.

Folded form (inference, ``export.fold_prefix``): ``params["prefix"] = {"keys", "values"}`` each
[T, layers, P, heads, head_dim], the MLP output frozen into constants.

Prefix keys attend with an all-ones mask. T5: prefix keys have no position, so the encoder gives
them zero relative-position bias (``attention.pad_bias_for_prefix``): every query sees each prefix
slot with the same bias whatever its own position.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.models.attention import Prefix


def init_prefix_params(rng, *, num_tasks, prefix_length, hidden_size, prefix_hidden, num_layers,
                       num_heads, head_dim):
    k_emb, k_hidden, k_out = jax.random.split(rng, 3)
    lecun = jax.nn.initializers.lecun_normal()
    lecun_out = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2, 3, 4))
    return {
        "embedding": jax.random.normal(k_emb, (num_tasks, prefix_length, hidden_size)),
        "mlp": {
            "hidden": {"kernel": lecun(k_hidden, (hidden_size, prefix_hidden)),
                       "bias": jnp.zeros((prefix_hidden,))},
            "out": {"kernel": lecun_out(k_out, (prefix_hidden, num_layers, 2, num_heads, head_dim)),
                    "bias": jnp.zeros((num_layers, 2, num_heads, head_dim))},
        },
    }


def prefix_table(prefix_params):
    """Prefix params (either form) -> (keys, values), each [T, layers, P, heads, head_dim]."""
    if "keys" in prefix_params:  # folded
        return prefix_params["keys"], prefix_params["values"]
    mlp = prefix_params["mlp"]
    h = jnp.tanh(prefix_params["embedding"] @ mlp["hidden"]["kernel"] + mlp["hidden"]["bias"])
    kv = jnp.einsum("tph,hlknd->tlkpnd", h, mlp["out"]["kernel"])
    kv = kv + mlp["out"]["bias"][None, :, :, None]
    return kv[:, :, 0], kv[:, :, 1]


def gather_prefix(prefix_params, task_ids) -> Prefix:
    """Each example's own task prefix: keys/values [layers, B, P, heads, head_dim], mask [B, P]."""
    keys, values = prefix_table(prefix_params)

    def per_example(x):
        return jnp.swapaxes(x[task_ids], 0, 1)  # [B, layers, ...] -> [layers, B, ...]

    keys, values = per_example(keys), per_example(values)
    mask = jnp.ones(keys.shape[1:3], jnp.int32)
    return Prefix(keys, values, mask)


def packed_prefix(prefix_params, token_tasks) -> Prefix:
    """Packed rows (``token_tasks`` [R, L], each token's task): every task's P slots in every
    row, keys/values [layers, R, T * P, heads, head_dim], each slot tagged with its task
    (``Prefix.key_tasks``) so a query attends to its own task's slots only (attention.packed_mask).
    """
    keys, values = prefix_table(prefix_params)
    tasks, layers, length = keys.shape[:3]
    rows = token_tasks.shape[0]

    def in_every_row(x):  # [T, layers, P, ...] -> [layers, R, T * P, ...]
        x = jnp.swapaxes(x, 0, 1).reshape((layers, tasks * length) + x.shape[3:])
        return jnp.broadcast_to(x[:, None], (layers, rows) + x.shape[1:])

    slot_tasks = jnp.repeat(jnp.arange(tasks, dtype=jnp.int32), length)
    return Prefix(in_every_row(keys), in_every_row(values),
                  jnp.ones((rows, tasks * length), jnp.int32),
                  key_tasks=jnp.broadcast_to(slot_tasks, (rows, tasks * length)),
                  query_tasks=token_tasks.astype(jnp.int32))
