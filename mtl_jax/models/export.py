"""Inference exports: fold the prefix MLP into fixed prefixes; merge one task's LoRA into the
encoder."""
from __future__ import annotations

import jax

from mtl_jax.errors import UserError
from mtl_jax.models import peft_layers
from mtl_jax.models import prefix as prefix_lib


def fold_prefix(params):
    """Params with ``prefix`` = {"keys", "values"} ([T, layers, P, heads, head_dim] each).

    The model accepts the folded form as it is (``MultiTaskModel.apply`` gives the same outputs);
    the embedding and MLP are dropped, so inference skips the reparameterisation.
    """
    if "prefix" not in params:
        raise UserError("these params have no prefix to fold; train with peft.kind=prefix")
    keys, values = jax.jit(prefix_lib.prefix_table)(params["prefix"])
    return {**params, "prefix": {"keys": keys, "values": values}}


def merge_lora(params, model, task: str):
    """A plain encoder for ``task``: its LoRA folded into the base kernels, every LoRA dropped.

    Returns (params, encoder_config): {"encoder": merged, "heads": {task: its head}} and the
    ``lora_rank=0`` EncoderConfig they belong to (build it with ``build_encoder``).
    """
    names = [s.name for s in model.specs]
    if task not in names:
        raise UserError(f"unknown task {task!r}; this model's tasks: {', '.join(names)}")
    if not model.encoder_config.use_lora:
        raise UserError("these params have no LoRA to merge; train with peft.kind=lora")
    index = names.index(task)
    encoder = peft_layers.merge_lora(params["encoder"], model.encoder_config, index)
    return ({"encoder": encoder, "heads": {task: params["heads"][task]}},
            model.encoder_config.replace(lora_rank=0))
