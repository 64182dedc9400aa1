"""Which Transformers model an export is, and where its task head goes.

``HEAD_EXPORTS`` (task type -> ``HeadExport``) says how a head maps onto Transformers' own head
modules; ``FAMILIES`` (encoder family -> ``Family``) how a family's exports are laid out:

  bert  the encoder under ``bert.`` plus the head in the model: BertForSequenceClassification
        (classification, and regression with problem_type=regression), BertForTokenClassification,
        BertForQuestionAnswering (our [H, 2] span head is qa_outputs: column 0 start, 1 end),
        BertForMultipleChoice.
        A head on the pooled vector needs heads.pooling=pooler: those classes always apply the
        pooler's tanh(W h_[CLS] + b).
  t5    T5EncoderModel in model.safetensors; the head, in Transformers' tensor names, in
        mtl_jax_head.safetensors, with mtl_jax_head.json saying how it is applied (pooling
        included: the head file is ours, so any pooling is exact).

A new task type is one ``HEAD_EXPORTS`` entry (multiple_choice: BertForMultipleChoice, whose
classifier is our [H, 1] choice scorer).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from mtl_jax.checkpoints import hf
from mtl_jax.errors import UserError
from mtl_jax.registry import Registry
from mtl_jax.tasks.spec import TaskSpec

HEAD_FILE = "mtl_jax_head.safetensors"
HEAD_INFO_FILE = "mtl_jax_head.json"
HEAD_FORMAT = "mtl_jax_head/1"


@dataclasses.dataclass(frozen=True)
class HeadExport:
    """How one task type's head (``heads.py``: a Dense named ``dense``) maps onto Transformers."""

    bert_class: str  # the BertFor* class holding the head
    hf_name: str  # its Linear's name there ("classifier", "qa_outputs")
    pooled: bool  # reads the pooled sentence vector (heads.pooling), not every token's
    formula: str  # the head in HF tensor names (written into mtl_jax_head.json)
    problem_type: str | None = None


HEAD_EXPORTS: Registry[HeadExport] = Registry("task type")
HEAD_EXPORTS.register("sequence_classification", HeadExport(
    "BertForSequenceClassification", "classifier", pooled=True,
    formula="logits[B, C] = pooled @ classifier.weight.T + classifier.bias; softmax for "
            "probabilities", problem_type="single_label_classification"))
HEAD_EXPORTS.register("sequence_regression", HeadExport(
    "BertForSequenceClassification", "classifier", pooled=True,
    formula="value[B] = (pooled @ classifier.weight.T + classifier.bias)[:, 0]",
    problem_type="regression"))
HEAD_EXPORTS.register("token_classification", HeadExport(
    "BertForTokenClassification", "classifier", pooled=False,
    formula="logits[B, L, C] = last_hidden_state @ classifier.weight.T + classifier.bias; a "
            "word's tag is the argmax at its first sub-token"))
HEAD_EXPORTS.register("extractive_qa", HeadExport(
    "BertForQuestionAnswering", "qa_outputs", pooled=False,
    formula="[start, end] logits[B, L, 2] = last_hidden_state @ qa_outputs.weight.T + "
            "qa_outputs.bias"))

HEAD_EXPORTS.register("multiple_choice", HeadExport(
    "BertForMultipleChoice", "classifier", pooled=True,
    formula="scores[B, C] = (pooled[B, C] @ classifier.weight.T + classifier.bias)[..., 0], "
            "each (context, choice) pair encoded on its own; softmax over C"))

# How mtl_jax_head.json describes a pooling (heads.POOLINGS) in Transformers' outputs.
POOLING_FORMULAS: Registry[str] = Registry("pooling")
POOLING_FORMULAS.register("cls", "pooled = last_hidden_state[:, 0]")
POOLING_FORMULAS.register("mean", "pooled = mean of last_hidden_state over attention_mask == 1")
POOLING_FORMULAS.register("pooler", "pooled = pooler_output (tanh(W h_[CLS] + b))")


@dataclasses.dataclass
class Exported:
    """What the writer puts in the output directory."""

    architecture: str
    tensors: dict[str, np.ndarray]  # model.safetensors
    config: dict  # config.json fields besides the encoder's (labels, head dropout)
    head_tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    head_info: dict | None = None  # mtl_jax_head.json
    notes: list[str] = dataclasses.field(default_factory=list)


def head_tensors(head_params: Mapping, hf_name: str) -> dict[str, np.ndarray]:
    """Our head's Dense as a PyTorch Linear ``hf_name`` (weight [out, in], bias [out])."""
    dense = head_params["dense"]
    kernel = np.asarray(dense["kernel"], np.float32)
    return {f"{hf_name}.weight": np.ascontiguousarray(
                hf.LINEAR.to_hf(kernel, hf.LINEAR.hf_shape(kernel.shape))),
            f"{hf_name}.bias": np.asarray(dense["bias"], np.float32)}


def label_fields(spec: TaskSpec, head: HeadExport) -> dict:
    fields = dict(num_labels=spec.num_labels)
    if spec.label_names:
        fields.update(id2label=dict(enumerate(spec.label_names)),
                      label2id={n: i for i, n in enumerate(spec.label_names)})
    if head.problem_type:
        fields["problem_type"] = head.problem_type
    return fields


# --- families ------------------------------------------------------------------------------------

def _bert_task_model(spec: TaskSpec, head_params, config, tensors) -> Exported:
    head = HEAD_EXPORTS.get(spec.type)
    pooling = config.heads.pooling
    if head.pooled and pooling != "pooler":
        raise UserError(
            f"heads.pooling={pooling} cannot be exported as {head.bert_class}: it always applies "
            f"BERT's pooler tanh(W h_[CLS] + b), which pooling {pooling} does not; train with "
            f"heads.pooling=pooler to export task {spec.name} (or pass --encoder_only)")
    encoder = {f"bert.{k}": v for k, v in tensors.items()
               if head.pooled or not k.startswith("pooler.")}  # the others have no pooler
    return Exported(head.bert_class, {**encoder, **head_tensors(head_params, head.hf_name)},
                    dict(label_fields(spec, head), classifier_dropout=config.heads.dropout))


def _side_file_task_model(spec: TaskSpec, head_params, config, tensors) -> Exported:
    head = HEAD_EXPORTS.get(spec.type)
    weights = head_tensors(head_params, head.hf_name)
    info = dict(format=HEAD_FORMAT, task=spec.name, type=spec.type, formula=head.formula,
                label_names=list(spec.label_names), dropout=config.heads.dropout,
                tensors={k: list(v.shape) for k, v in weights.items()})
    if head.pooled:
        info.update(pooling=config.heads.pooling,
                    pooling_formula=POOLING_FORMULAS.get(config.heads.pooling))
    return Exported("T5EncoderModel", dict(tensors), label_fields(spec, head), weights, info,
                    notes=[f"the {spec.type} head is in {HEAD_FILE} (applied as {HEAD_INFO_FILE} "
                           f"says): Transformers' T5 has no such head class"])


@dataclasses.dataclass(frozen=True)
class Family:
    encoder_class: str  # --encoder_only
    task_model: Callable[[TaskSpec, Mapping, object, dict], Exported]


FAMILIES: Registry[Family] = Registry("encoder family")
FAMILIES.register("bert", Family("BertModel", _bert_task_model))
FAMILIES.register("t5", Family("T5EncoderModel", _side_file_task_model))


def encoder_model(family_name: str, tensors: dict) -> Exported:
    """--encoder_only: the encoder alone (BertModel / T5EncoderModel)."""
    family = FAMILIES.get(family_name)
    absent = sorted(hf.FAMILY_CONVERTERS.get(family_name).optional - set(tensors))
    notes = [f"the encoder has no {', '.join(absent)}: {family.encoder_class} initialises them "
             f"randomly on load (BERT: use last_hidden_state, not pooler_output)"] if absent else []
    return Exported(family.encoder_class, dict(tensors), {}, notes=notes)
