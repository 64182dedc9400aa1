"""Checks before the first step: a user error costs seconds, never a run.

``check_config(config)`` runs before anything is read or written (names against their registries or
choices, counts that must be positive, ranges, a train split for every task); ``check_run(run)``
runs once the data is read and tokenized and the model built, before compiling (lengths against the
buckets and the model's position embeddings, each task's metrics against its type and label count,
the early-stopping metric against the tasks' metrics). Each failure is one ``UserError`` line naming
the key.
"""
from __future__ import annotations

from typing import Callable, Iterable

from mtl_jax.errors import UserError
from mtl_jax.models.layers import FAMILY_TRAITS
from mtl_jax.training import trainers as trainers_lib
from mtl_jax.training import weighting as weighting_lib

# --- the config alone --------------------------------------------------------------------------


def _choices() -> dict[str, Callable[[], Iterable[str]]]:
    """Config key -> its valid names (registries where the key has one). The lookups are
    lambdas, evaluated only for the keys a config sets to a bad value."""
    from mtl_jax.data import batching, samplers
    from mtl_jax.models import encoder_config, heads, peft_layers, sharing, soft_sharing
    from mtl_jax.training import meta_learning, optim, parallel, sharding, step, trainers, weighting

    return {
        "model.family": lambda: ("auto", "bert", "t5", "t5_v1_1"),
        "model.dtype": lambda: encoder_config.DTYPES,
        "model.attention_impl": lambda: encoder_config.ATTENTION_IMPLS,
        "data.batch_mode": lambda: batching.BATCH_MODES,
        "data.sampler": samplers.SAMPLERS.names,
        "data.empty_text": lambda: ("skip", "error"),
        "sharing.mode": sharing.STRATEGIES.names,
        "sharing.soft_penalty": soft_sharing.PENALTIES.names,
        "peft.kind": peft_layers.PEFT_KINDS.names,
        "peft.adapter_kind": lambda: ("houlsby", "pfeiffer"),
        "heads.pooling": heads.POOLINGS.names,
        "optim.name": optim.OPTIMIZERS.names,
        "optim.schedule": optim.SCHEDULES.names,
        "weighting.name": weighting.WEIGHTINGS.names,
        "weighting.task_grad_impl": step.TASK_GRAD_IMPLS.names,
        "parallel.mode": parallel.PARALLEL.names,
        "parallel.rules": sharding.RULES.names,
        "train.nan_policy": lambda: step.NAN_POLICIES,
        "train.algorithm": trainers.TRAINERS.names,
        "meta.inner_optimizer": meta_learning.INNER_OPTIMIZERS.names,
        "train.early_stopping_mode": lambda: ("max", "min"),
        "eval.checkpoint": lambda: ("best", "latest"),
    }


# Counts where 0 (or less) has no meaning: key -> what it counts.
POSITIVE = {
    "train.num_steps": "training steps",
    "train.batch_size": "examples per step",
    "train.log_every": "steps between log lines",
    "train.eval_every": "steps between evaluations",
    "train.checkpoint_every": "steps between checkpoints",
    "eval.batch_size": "examples per evaluation batch",
    "checkpoint.max_to_keep": "checkpoints kept",
    "checkpoint.save_timeout_s": "seconds a save may take",
    "optim.accumulate_steps": "micro-batches per update",
    "weighting.cagrad_steps": "CAGrad dual steps",
    "weighting.meta_every": "steps between meta-weight updates",
    "peft.prefix_length": "prefix positions",
    "data.packing_row_multiple": "the multiple packed rows are rounded up to",
    "peft.prefix_hidden": "prefix MLP width",
    "peft.adapter_size": "adapter width",
    "peft.lora_rank": "LoRA rank",
    "data.temperature": "sampling temperature",
}
NON_NEGATIVE = ("optim.lr", "optim.clip_norm", "optim.weight_decay", "data.size_cap",
                "eval.max_examples", "train.early_stopping_patience", "sharing.soft_lambda",
                "train.early_stopping_min_delta", "weighting.meta_lr", "weighting.meta_virtual_lr",
                "weighting.meta_batch_size", "data.packing_length")
FRACTIONS = ("optim.warmup_fraction", "heads.dropout", "peft.lora_dropout")  # in [0, 1]


def check_config(config) -> None:
    """Every check that needs only the config (no files, no model)."""
    from mtl_jax.data import batching
    from mtl_jax.tasks.definitions import check_trainable

    for key, names in _choices().items():
        value = _get(config, key)
        valid = list(names())
        if value not in valid:
            raise UserError(f"{key}={value!r} is not a valid choice; use one of "
                            f"{', '.join(map(str, valid))}")
    for key, what in POSITIVE.items():
        value = _get(config, key)
        if not value > 0:
            raise UserError(f"{key}={value!r} must be at least 1 ({what}); set "
                            f"--config.{key} to a positive value")
    for key in NON_NEGATIVE:
        value = _get(config, key)
        if value < 0:
            raise UserError(f"{key}={value!r} must not be negative; set --config.{key}=0 or more")
    for key in FRACTIONS:
        value = _get(config, key)
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{key}={value!r} must be between 0 and 1")
    batching.check_buckets(config.data.buckets)
    _check_batch_layout(config)
    for name, task in config.tasks.items():
        check_trainable(name, task)
    trainers_lib.get(config).check_config(config)
    heldout = weighting_lib.heldout_of(config)
    if heldout is not None:
        heldout.check(config.tasks)


def _check_batch_layout(config) -> None:
    batch, tasks = config.train.batch_size, len(config.tasks)
    if config.data.batch_mode == "stacked" and tasks and batch % tasks:
        raise UserError(f"train.batch_size={batch} must be a multiple of the {tasks} tasks with "
                        f"data.batch_mode=stacked (one sub-batch per task)")
    if config.data.packing:
        _check_packing(config)


def _check_packing(config) -> None:
    from mtl_jax.data.iterator import PACKABLE_MODES
    from mtl_jax.tasks.types import TASK_TYPES

    if config.data.batch_mode not in PACKABLE_MODES:
        raise UserError(f"data.packing packs {' and '.join(PACKABLE_MODES)} batches, not "
                        f"data.batch_mode={config.data.batch_mode}; set data.packing=False or "
                        f"data.batch_mode=mixed")
    if config.parallel.mode != "jit":
        raise UserError(f"data.packing runs with parallel.mode=jit (a packed example's tokens may "
                        f"sit on another device's rows), not {config.parallel.mode}; set "
                        f"parallel.mode=jit")
    for name, task in config.tasks.items():
        if TASK_TYPES.get(task.type).has_choices:
            raise UserError(f"data.packing cannot pack the choices of multiple-choice task "
                            f"{name} ([B, C, L] batches); set data.packing=False")


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


# --- the config with its data and model --------------------------------------------------------

def check_run(run) -> None:
    """Checks that need the tasks' data and the model: before compiling anything."""
    from mtl_jax.tasks.definitions import task_definitions

    definitions = task_definitions(run.config)
    for spec in run.model.specs:
        _check_length(spec.name, definitions[spec.name].max_length, run)
        _check_metrics(spec, definitions[spec.name].metrics)
    _check_selection_metric(run, definitions)
    _check_published(run.config.eval.published)


def _check_published(folder: str) -> None:
    from mtl_jax.tasks.definitions import resolve_path

    if folder and not resolve_path(folder).is_dir():
        raise UserError(f"eval.published={folder!r} is not a folder; set it to a published "
                        f"comparison (mtl_jax.compare --publish=DEST, e.g. docs/results) or ''")


def _check_length(task: str, max_length: int, run) -> None:
    """The bucket a task's longest input is padded to must fit the model's positions."""
    enc = run.model.encoder_config
    limit = FAMILY_TRAITS.get(enc.family).max_positions(enc)
    buckets = tuple(run.config.data.buckets)
    padded = next((b for b in buckets if b >= max_length), buckets[-1])
    if limit is not None and padded > limit:
        raise UserError(f"tasks.{task}.max_length={max_length} pads to the bucket of {padded} "
                        f"tokens, more than the model's {limit} position embeddings; set "
                        f"tasks.{task}.max_length and data.buckets to at most {limit}")


def _check_metrics(spec, metrics) -> None:
    from mtl_jax.evaluation import metrics as metrics_lib
    from mtl_jax.tasks.types import TASK_TYPES

    task_type = TASK_TYPES.get(spec.type)
    for name in metrics:
        if name not in metrics_lib.METRICS:
            raise UserError(f"tasks.{spec.name}.metrics: unknown metric {name!r}; valid metric "
                            f"names: {', '.join(metrics_lib.METRICS.names())}")
        valid = task_type.valid_metrics
        if valid and name not in valid:
            raise UserError(f"tasks.{spec.name}.metrics: {name!r} does not apply to a "
                            f"{spec.type} task; use one of {', '.join(valid)}")
        if task_type.uses_label_names:
            metrics_lib.check_metric_for_labels(spec.name, name, spec.num_labels)


def _check_selection_metric(run, definitions) -> None:
    """train.early_stopping_metric must name one of the metrics evaluation will produce."""
    metric = run.config.train.early_stopping_metric
    if metric == "mean":
        return
    task, _, name = metric.partition("/")
    names = [s.name for s in run.model.specs]
    if task not in names or not name:
        raise UserError(f"train.early_stopping_metric={metric!r}; use 'mean' or TASK/METRIC with "
                        f"a task of this run ({', '.join(names)})")
    produced = {key for m in definitions[task].metrics for key in METRIC_KEYS.get(m, (m,))}
    if produced and name not in produced:
        raise UserError(f"train.early_stopping_metric={metric!r}: task {task} reports "
                        f"{', '.join(sorted(produced))}; pick one of those")


# The result keys each metric produces (for the early-stopping metric check).
METRIC_KEYS = {"seqeval": ("precision", "recall", "f1", "accuracy"), "squad": ("exact_match", "f1")}

