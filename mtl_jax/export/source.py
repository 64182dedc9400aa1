"""The run an export reads: its checkpoint (``init_from.read_source``: ``best|latest|STEP``, the
saved config, params as host NumPy), the model that config builds, and the one plain encoder that
the named task runs through (its sharing strategy's view, its PEFT folded in or refused)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from mtl_jax.checkpoints import init_from
from mtl_jax.errors import UserError
from mtl_jax.models import export as inference_export
from mtl_jax.models import multitask
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.registry import Registry
from mtl_jax.tasks.definitions import task_definitions
from mtl_jax.tasks.spec import TaskSpec
from mtl_jax.tasks.types import TASK_TYPES


@dataclasses.dataclass(frozen=True)
class RunSource:
    """One task of a trained run, as read from its checkpoint."""

    directory: str
    step: int
    config: ml_collections.ConfigDict  # the run's resolved config (label names included)
    model: multitask.MultiTaskModel
    spec: TaskSpec
    params: Any  # the whole params tree, NumPy leaves

    @property
    def head_params(self) -> dict:
        return self.params["heads"][self.spec.name]


def _as_config_values(value):
    """JSON lists back to the tuples the config holds (text_fields, buckets, label names)."""
    if isinstance(value, dict):
        return {k: _as_config_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_as_config_values(v) for v in value)
    return value


def config_from_record(record: dict, where: str) -> ml_collections.ConfigDict:
    """The ConfigDict a checkpoint's ``config`` item was saved from."""
    if not record.get("tasks") or not record.get("model"):
        raise UserError(f"{where}: the checkpoint holds no run config (model, tasks); export a "
                        f"checkpoint written by python -m mtl_jax.main --mode=train")
    return ml_collections.ConfigDict(_as_config_values(record))


def task_specs(config, where: str) -> list[TaskSpec]:
    """The TaskSpecs the run was built with: its saved label names, tasks in config order."""
    specs = []
    for index, (name, definition) in enumerate(task_definitions(config).items()):
        task_type = TASK_TYPES.get(definition.type)
        names = tuple(definition.label_names)
        if task_type.uses_label_names and not names:
            raise UserError(f"{where}: the saved config has no label names for task {name}; "
                            f"export a checkpoint written by python -m mtl_jax.main --mode=train")
        specs.append(TaskSpec(name, definition.type, task_type.num_labels(names), index, names))
    return specs


def check_checkpoint_choice(checkpoint: str) -> None:
    if checkpoint not in init_from.WHICH and not checkpoint.isdigit():
        raise UserError(f"--checkpoint={checkpoint!r}; use best, latest or a step number")


def read_run(workdir: str, task: str, checkpoint: str = "latest") -> RunSource:
    """The checkpoint ``checkpoint`` of ``workdir``, its config's model and ``task``'s spec."""
    check_checkpoint_choice(checkpoint)
    where = f"--workdir={workdir} --checkpoint={checkpoint}"
    source = init_from.read_source(f"{workdir}:{checkpoint}", where=where)
    config = config_from_record(source.config, where)
    specs = task_specs(config, where)
    by_name = {s.name: s for s in specs}
    if task not in by_name:
        raise UserError(f"--task={task!r} is not a task of the run in {workdir} (its tasks: "
                        f"{', '.join(by_name)}); pass one of those")
    model = multitask.build_model(config, specs)
    return RunSource(source.directory, source.step, config, model, by_name[task], source.params)


# --- the task's encoder ---------------------------------------------------------------------------
# peft.kind -> (one encoder's params, run) -> (plain encoder params, its EncoderConfig): the PEFT
# of the task folded into the encoder, or a UserError where a vanilla Transformers model has no
# place for it.
PeftExport = Callable[[Any, RunSource], tuple[Any, EncoderConfig]]
PEFT_EXPORTS: Registry[PeftExport] = Registry("peft kind")


@PEFT_EXPORTS.register("none")
def _plain(encoder, run: RunSource):
    return encoder, run.model.encoder_config


@PEFT_EXPORTS.register("lora")
def _merged_lora(encoder, run: RunSource):
    merged, cfg = inference_export.merge_lora({"encoder": encoder, "heads": run.params["heads"]},
                                              run.model, run.spec.name)
    return merged["encoder"], cfg


def _refusal(kind: str, missing: str) -> PeftExport:
    def refuse(encoder, run: RunSource):
        raise UserError(
            f"peft.kind={kind} cannot be exported: vanilla Transformers BERT/T5 models have no "
            f"{missing}, so task {run.spec.name}'s outputs would change; serve it with "
            f"--mode=predict, or train with peft.kind=lora (merged into the weights on export)")
    return refuse


PEFT_EXPORTS.register("prefix", _refusal("prefix", "place for per-layer prefix keys and values"))
PEFT_EXPORTS.register("adapter", _refusal("adapter", "bottleneck adapter layers"))


def task_encoder(run: RunSource) -> tuple[Any, EncoderConfig]:
    """(params, config) of the plain encoder ``run.spec``'s task runs through: its row of a
    soft-sharing stack, its LoRA merged; the layout (scanned or not) as stored."""
    names = [s.name for s in run.model.specs]
    one, _ = run.model.sharing_strategy.one_encoder(run.params["encoder"], run.spec.name, names)
    return PEFT_EXPORTS.get(run.config.peft.kind)(one, run)
