"""Per-task-type losses (registry ``LOSSES``), and their reduction into per-task means.

A loss maps (head output, batch) -> (sum [B], count [B]): each example's summed loss and how many
labelled units it holds (1 for a sequence label, the number of labelled tokens for token
classification, 0 where the label is ignored). ``task_mean_losses`` divides per task, so token
classification is a mean over tokens (as in BERT's recipe) and every other type a mean over
examples. Labels are sanitised before use: an ignored example never puts a NaN into a loss or a
gradient, whatever value its ignored label field holds.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mtl_jax.registry import Registry

IGNORE_INDEX = -100

LOSSES: Registry[Callable] = Registry("loss (task type)")


def _cross_entropy(logits, labels):
    """Cross-entropy per position with -100 (or any out-of-range label) ignored -> (loss, valid)."""
    num_classes = logits.shape[-1]
    valid = (labels >= 0) & (labels < num_classes)
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0), valid.astype(jnp.float32)


@LOSSES.register("sequence_classification")
def classification_loss(logits, batch):
    return _cross_entropy(logits, batch["label"])


# Multiple choice: the cross-entropy of the softmax over the example's C choice scores [B, C]
# against the right choice's index (``label``); the example counts once, whatever C.
LOSSES.register("multiple_choice", classification_loss)


@LOSSES.register("sequence_regression")
def mse_loss(pred, batch):
    target = batch["target"].astype(jnp.float32)
    valid = jnp.isfinite(target)
    err = pred.astype(jnp.float32) - jnp.where(valid, target, 0.0)
    return jnp.where(valid, err * err, 0.0), valid.astype(jnp.float32)


@LOSSES.register("token_classification")
def token_loss(logits, batch):
    nll, valid = _cross_entropy(logits, batch["tag_ids"])
    return nll.sum(-1), valid.sum(-1)


@LOSSES.register("extractive_qa")
def span_loss(logits, batch):
    """(CE(start) + CE(end)) / 2; an example counts when both positions are inside the sequence.

    The softmax runs over the example's real tokens (``attention_mask``): padding is never an
    answer, and a packed example (data/packing.py) has no padding hidden states to score, so
    this is what makes its loss equal the unpacked one. (Transformers' BERT QA head scores the
    padding too, which moves its loss by the pads' share of the probability mass.)"""
    if "attention_mask" in batch:
        real = batch["attention_mask"][..., None] > 0
        logits = jnp.where(real, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    start_nll, start_ok = _cross_entropy(logits[..., 0], batch["start_positions"])
    end_nll, end_ok = _cross_entropy(logits[..., 1], batch["end_positions"])
    valid = start_ok * end_ok
    return valid * (start_nll + end_nll) / 2.0, valid


def task_loss_sums(outputs, batch, specs):
    """{task: head output} -> (sums [T], denominators [T], counts [T]).

    Task t's mean loss is ``sums[t] / denominators[t]``: the weighted sum of its examples' losses
    (task_id == t, weight > 0) over the weighted number of labelled units they hold (examples, or
    labelled tokens for token classification). counts[t] is the summed weight of task t's
    examples. A data-parallel reduction must sum numerators and denominators over devices before
    dividing: a count-weighted mean of per-device means is not the global mean when the units
    per example differ between devices (token tasks, ignored labels).
    """
    task_id, weight = batch["task_id"], batch["weight"].astype(jnp.float32)
    sums, denominators, counts = [], [], []
    for spec in specs:
        per_example, units = LOSSES.get(spec.type)(outputs[spec.name], batch)
        w = jnp.where(task_id == spec.index, weight, 0.0)
        sums.append((w * per_example).sum())
        denominators.append((w * units).sum())
        counts.append(w.sum())
    return jnp.stack(sums), jnp.stack(denominators), jnp.stack(counts)


def task_mean_losses(outputs, batch, specs):
    """{task: head output} -> (losses [T], counts [T]).

    losses[t] is task t's mean loss over its examples (task_id == t, weight > 0; weighted by
    ``weight``), 0 when the batch holds none. counts[t] is the summed weight of task t's examples.
    """
    sums, denominators, counts = task_loss_sums(outputs, batch, specs)
    return mean_losses(sums, denominators), counts


def mean_losses(sums, denominators):
    return sums / jnp.maximum(denominators, 1e-9)
