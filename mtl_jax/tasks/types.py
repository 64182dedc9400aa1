"""Task types (a registry): what each type reads, how it tokenizes, its batch label arrays and its
evaluation post-processing. A new type is one subclass registered in ``TASK_TYPES``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from mtl_jax.errors import UserError
from mtl_jax.evaluation.qa_postprocess import best_answers
from mtl_jax.registry import Registry
from mtl_jax.text import tokenize


class TaskType:
    """Base class. ``label_keys`` are the batch keys the type fills (ignore values elsewhere)."""

    name = ""
    label_keys: tuple[str, ...] = ()
    extra_fields: dict[str, Any] = {}
    default_metrics: tuple[str, ...] = ()
    # The metrics whose inputs this type's postprocess produces (checked before training).
    valid_metrics: tuple[str, ...] = ()
    uses_label_names = True
    # Examples hold one sequence per choice: the run's batches gain a choice axis [B, C, L].
    has_choices = False

    def num_labels(self, label_names: tuple[str, ...]) -> int:
        return len(label_names)

    def columns(self, definition) -> tuple[str, ...]:
        return (*definition.text_fields, definition.label_field)

    def check_definition(self, task: str, definition) -> None:
        if not definition.text_fields:
            raise UserError(f"tasks.{task}.text_fields is empty; name the input column(s), "
                            f"e.g. ('sentence',)")

    def parse(self, record: dict, where: str, definition, label_ids: dict) -> dict | None:
        """A validated example, or None when its text is empty."""
        raise NotImplementedError

    def raw_labels(self, record: dict, definition) -> list:
        """Label values as they appear in the file (for deriving label names)."""
        value = record.get(definition.label_field)
        return value if isinstance(value, list) else [value]

    def tokenize(self, examples: list[dict], tokenizer, definition, data_config,
                 label_names) -> dict:
        raise NotImplementedError

    def postprocess(self, examples: list[dict], features, outputs: list[np.ndarray], definition,
                    label_names) -> dict:
        """Per-feature head outputs -> {"predictions", "references"} in the metrics' format."""
        raise NotImplementedError

    def describe(self, example: dict, label_names) -> str:
        raise NotImplementedError


TASK_TYPES: Registry[TaskType] = Registry("task type")


def _register(cls):
    TASK_TYPES.register(cls.name, cls())
    return cls


def _texts(record: dict, definition) -> tuple[str, ...] | None:
    texts = tuple("" if record[f] is None else str(record[f]) for f in definition.text_fields)
    return None if any(not t.strip() for t in texts) else texts


def label_id(value, where: str, label_ids: dict) -> int:
    """A label given as a name, or as an index (int or digit string) into the label names."""
    if isinstance(value, str) and value in label_ids:
        return label_ids[value]
    if isinstance(value, bool) or value is None:
        index = None
    elif isinstance(value, (int, np.integer)):
        index = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        index = int(value)
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    else:
        index = None
    if index is None or not 0 <= index < len(label_ids):
        names = ", ".join(label_ids)
        raise UserError(f"{where}: label {value!r} is not one of the label names ({names}) nor an "
                        f"index into them; fix the row or the task's label_names")
    return index


def argmax_predictions(examples, outputs) -> dict:
    """The class (or choice) of highest score per example, against each example's ``label``."""
    return dict(predictions=np.array([int(np.argmax(o)) for o in outputs], np.int64),
                references=np.array([e["label"] for e in examples], np.int64))


@_register
class SequenceClassification(TaskType):
    name = "sequence_classification"
    label_keys = ("label",)
    default_metrics = ("accuracy",)
    valid_metrics = ("accuracy", "f1", "f1_macro", "f1_micro", "matthews_corrcoef")

    def parse(self, record, where, definition, label_ids):
        texts = _texts(record, definition)
        if texts is None:
            return None
        return dict(texts=texts, label=label_id(record[definition.label_field], where, label_ids))

    def tokenize(self, examples, tokenizer, definition, data_config, label_names):
        arrays = tokenize.encode_texts(tokenizer, [e["texts"] for e in examples],
                                       definition.max_length)
        arrays["label"] = np.array([e["label"] for e in examples], np.int32)
        return arrays

    def postprocess(self, examples, features, outputs, definition, label_names):
        return argmax_predictions(examples, outputs)

    def describe(self, example, label_names):
        return " ||| ".join(example["texts"]) + f"  ->  {label_names[example['label']]}"


@_register
class SequenceRegression(TaskType):
    name = "sequence_regression"
    label_keys = ("target",)
    default_metrics = ("pearson", "spearman")
    valid_metrics = ("pearson", "spearman")
    uses_label_names = False

    def num_labels(self, label_names):
        return 1

    def parse(self, record, where, definition, label_ids):
        texts = _texts(record, definition)
        if texts is None:
            return None
        value = record[definition.label_field]
        try:
            target = float(value)
        except (TypeError, ValueError):
            target = math.nan
        if not math.isfinite(target):
            raise UserError(f"{where}: regression target {value!r} is not a finite number; "
                            f"fix the row")
        return dict(texts=texts, target=target)

    def tokenize(self, examples, tokenizer, definition, data_config, label_names):
        arrays = tokenize.encode_texts(tokenizer, [e["texts"] for e in examples],
                                       definition.max_length)
        arrays["target"] = np.array([e["target"] for e in examples], np.float32)
        return arrays

    def postprocess(self, examples, features, outputs, definition, label_names):
        return dict(predictions=np.array([float(np.ravel(o)[0]) for o in outputs], np.float64),
                    references=np.array([e["target"] for e in examples], np.float64))

    def describe(self, example, label_names):
        return " ||| ".join(example["texts"]) + f"  ->  {example['target']:g}"


@_register
class TokenClassification(TaskType):
    name = "token_classification"
    label_keys = ("tag_ids",)
    default_metrics = ("seqeval",)
    valid_metrics = ("seqeval",)

    def check_definition(self, task, definition):
        if len(definition.text_fields) != 1:
            raise UserError(f"tasks.{task}.text_fields must name one column of word lists, "
                            f"e.g. ('tokens',)")

    def parse(self, record, where, definition, label_ids):
        words, tags = record[definition.text_fields[0]], record[definition.label_field]
        if not isinstance(words, list) or not isinstance(tags, list):
            raise UserError(f"{where}: {definition.text_fields[0]!r} and "
                            f"{definition.label_field!r} must be lists (one entry per word)")
        if len(words) != len(tags):
            raise UserError(f"{where}: {len(words)} tokens but {len(tags)} tags; "
                            f"each word needs exactly one tag")
        if not words:
            return None
        return dict(words=[str(w) for w in words],
                    tags=[label_id(t, where, label_ids) for t in tags])

    def tokenize(self, examples, tokenizer, definition, data_config, label_names):
        return tokenize.encode_words(tokenizer, [e["words"] for e in examples],
                                     [e["tags"] for e in examples], definition.max_length,
                                     data_config.label_all_subtokens, tuple(label_names))

    def postprocess(self, examples, features, outputs, definition, label_names):
        """Tag of each word = argmax at its first sub-token; words cut by truncation count as
        "O"."""
        outside = "O" if "O" in label_names else label_names[0]
        predictions, references = [], []
        for i, (example, logits) in enumerate(zip(examples, outputs)):
            words = features.tokens("word_ids", i)
            predicted = [outside] * len(example["tags"])
            for position in np.flatnonzero(words >= 0):
                predicted[words[position]] = label_names[int(np.argmax(logits[position]))]
            predictions.append(predicted)
            references.append([label_names[t] for t in example["tags"]])
        return dict(predictions=predictions, references=references)

    def describe(self, example, label_names):
        """Words with each tag aligned under its word."""
        tags = [label_names[t] for t in example["tags"]]
        widths = [max(len(w), len(t)) for w, t in zip(example["words"], tags)]
        top = " ".join(w.ljust(n) for w, n in zip(example["words"], widths))
        bottom = " ".join(t.ljust(n) for t, n in zip(tags, widths))
        return f"{top.rstrip()}\n    {bottom.rstrip()}"


@_register
class ExtractiveQA(TaskType):
    name = "extractive_qa"
    label_keys = ("start_positions", "end_positions")
    extra_fields = dict(id_field="id", doc_stride=128, max_answer_length=30, n_best=20)
    default_metrics = ("squad",)
    valid_metrics = ("squad",)
    uses_label_names = False

    def num_labels(self, label_names):
        return 2

    def check_definition(self, task, definition):
        if len(definition.text_fields) != 2:
            raise UserError(f"tasks.{task}.text_fields must be (question_column, context_column), "
                            f"got {tuple(definition.text_fields)}")
        if definition.doc_stride >= definition.max_length // 2:
            raise UserError(f"tasks.{task}.doc_stride={definition.doc_stride} must be < "
                            f"max_length/2 ({definition.max_length // 2}); lower it")

    def columns(self, definition):
        return (*definition.text_fields, definition.label_field)

    def raw_labels(self, record, definition):
        return []

    def parse(self, record, where, definition, label_ids):
        question_field, context_field = definition.text_fields
        question, context = str(record[question_field] or ""), str(record[context_field] or "")
        if not question.strip() or not context.strip():
            return None
        answers = record[definition.label_field]
        if not isinstance(answers, dict) or "text" not in answers:
            raise UserError(f"{where}: {definition.label_field!r} must be "
                            f"{{'text': [...], 'answer_start': [...]}}")
        texts = list(answers["text"]) if isinstance(answers["text"], list) else [answers["text"]]
        starts = answers.get("answer_start", [-1] * len(texts))
        starts = list(starts) if isinstance(starts, list) else [starts]
        if not texts:
            raise UserError(f"{where}: the question has no answer; "
                            f"extractive QA (SQuAD v1.1) needs one")
        spans = [_answer_span(context, str(t), int(s), where) for t, s in zip(texts, starts)]
        qid = str(record.get(definition.id_field, where))
        return dict(id=qid, question=question, context=context, answers=[str(t) for t in texts],
                    spans=spans)

    def tokenize(self, examples, tokenizer, definition, data_config, label_names):
        return tokenize.encode_qa(tokenizer, [e["question"] for e in examples],
                                  [e["context"] for e in examples],
                                  [e["spans"][0] for e in examples], definition.max_length,
                                  definition.doc_stride)

    def postprocess(self, examples, features, outputs, definition, label_names):
        predictions = best_answers(examples, features, outputs, n_best=definition.n_best,
                                   max_answer_length=definition.max_answer_length)
        return dict(predictions=predictions, references=[e["answers"] for e in examples])

    def describe(self, example, label_names):
        start, end = example["spans"][0]
        context = example["context"]
        left, right = max(0, start - 60), min(len(context), end + 60)
        snippet = (f"{'...' if left else ''}{context[left:start]}"
                   f"[[{context[start:end]}]]{context[end:right]}"
                   f"{'...' if right < len(context) else ''}")
        return (f"Q: {example['question']}\n    C: {snippet}\n"
                f"    A: {example['answers'][0]!r} (chars {start}-{end})")


def _answer_span(context: str, text: str, start: int, where: str) -> tuple[int, int]:
    """(start_char, end_char) of an answer; a start that does not match is an error."""
    if start >= 0 and context[start:start + len(text)] == text:
        return start, start + len(text)
    if start < 0 and text and text in context:
        found = context.index(text)
        return found, found + len(text)
    raise UserError(f"{where}: answer {text!r} does not occur in its context at "
                    f"answer_start={start}; fix the row")


@_register
class MultipleChoice(TaskType):
    """Pick one of C answers (COPA; the shape of SWAG, PIQA, HellaSwag): each (context, choice)
    pair is encoded on its own, the head gives one score per choice, softmax over the choices.

    Fields: ``text_fields`` names every column read; those not in ``choice_fields`` form the
    context (text_a), joined by spaces in ``text_fields`` order, each value first replaced by
    its ``context_phrases`` entry when it has one; ``choice_fields`` names one column per choice
    (text_b), or one column holding a list of choices. ``label_names`` name the choices (their
    count is C, the same for every example); the label is a choice's index or name. COPA's
    preset uses jiant's formulation: text_a = "premise What was the cause of this?" (or "What
    happened as a result?" for "effect"), text_b = the choice.

    Batch layout: choices are a leading axis of the example. A run with a multiple-choice task
    gives every row C slots (``input_ids``/``attention_mask``/``token_type_ids`` [B, C, L], C
    the largest choice count of the run's multiple-choice tasks); a row of another task fills
    slot 0 and leaves the others as padding. The model runs the encoder on the [B * C, L]
    flattening (``models/choices.py``) and gives the other heads slot 0 again, so:
    - mixed and homogeneous batches are the same code (one row = one example of its task_id),
      and the batch shape is fixed for the run: one trace per bucket;
    - the sampler, streams, stacked/episode layouts, sharding (example axis unchanged) and the
      per-example loss normalisation need nothing new: an example is one row, its loss the
      cross-entropy over its C scores (``label`` [B]), counted once;
    - PEFT routing: every slot of a row carries the row's task_id into the encoder, so each
      choice of an example uses its task's prefix/adapter/LoRA rows.
    The price: in a run with a multiple-choice task every row of every task costs C sequences
    of encoder compute (padding slots are computed too). Flattening choices into C consecutive
    rows with a group index would avoid that, but every consumer of rows (sampler and streams,
    which count examples; batches that must not split a group across devices or sub-batches;
    per-example counts and weights; segment softmax in the loss) would need to know about groups.
    A task with fewer choices than the run's C ignores its extra slots (its head keeps the
    scores of its own choices); examples with differing choice counts (ARC) are not supported.
    Sequence packing, should it come, packs along L inside the slots: the axis does not change.
    """

    name = "multiple_choice"
    label_keys = ("label",)
    extra_fields = dict(choice_fields=(), context_phrases={})
    default_metrics = ("accuracy",)
    valid_metrics = ("accuracy",)
    has_choices = True

    def columns(self, definition):
        extra = tuple(f for f in definition.choice_fields if f not in definition.text_fields)
        return (*definition.text_fields, *extra, definition.label_field)

    def check_definition(self, task, definition):
        choice_fields = tuple(definition.choice_fields)
        if not choice_fields:
            raise UserError(f"tasks.{task}.choice_fields is empty; name the choice columns, "
                            f"e.g. ('choice1', 'choice2'), or one column holding a list")
        if not _context_fields(definition):
            raise UserError(f"tasks.{task}.text_fields {tuple(definition.text_fields)} has no "
                            f"context column outside choice_fields {choice_fields}; add one, "
                            f"e.g. ('premise', *choice_fields)")

    def parse(self, record, where, definition, label_ids):
        context = choice_context(record, definition)
        choices = choice_texts(record, where, definition)
        if not context.strip() or any(not c.strip() for c in choices):
            return None
        if len(choices) != len(label_ids):
            raise UserError(f"{where}: {len(choices)} choices but the task has {len(label_ids)} "
                            f"label names ({', '.join(label_ids)}), one per choice; fix the row or "
                            f"the task's label_names")
        return dict(context=context, choices=choices,
                    label=label_id(record[definition.label_field], where, label_ids))

    def tokenize(self, examples, tokenizer, definition, data_config, label_names):
        for e in examples:  # parse checked the data; predict inputs arrive here unchecked
            if len(e["choices"]) != len(label_names):
                raise UserError(f"{e.get('where', 'an input')}: {len(e['choices'])} choices, "
                                f"the task has {len(label_names)}; give one per choice")
        arrays = tokenize.encode_choices(tokenizer, [e["context"] for e in examples],
                                         [e["choices"] for e in examples], definition.max_length)
        arrays["label"] = np.array([e["label"] for e in examples], np.int32)
        return arrays

    def postprocess(self, examples, features, outputs, definition, label_names):
        return argmax_predictions(examples, outputs)

    def describe(self, example, label_names):
        choices = "\n".join(f"    {'*' if i == example['label'] else ' '} {name}: {choice}"
                            for i, (name, choice) in enumerate(zip(label_names,
                                                                   example["choices"])))
        return f"{example['context']}\n{choices}"


def _context_fields(definition) -> tuple[str, ...]:
    return tuple(f for f in definition.text_fields if f not in tuple(definition.choice_fields))


def choice_context(record: dict, definition) -> str:
    """The context columns joined by spaces, each value replaced by its context_phrases entry."""
    phrases = dict(definition.context_phrases)
    values = ("" if record[f] is None else str(record[f]) for f in _context_fields(definition))
    return " ".join(phrases.get(v, v) for v in values)


def choice_texts(record: dict, where: str, definition) -> tuple[str, ...]:
    fields = tuple(definition.choice_fields)
    if len(fields) > 1:
        return tuple("" if record[f] is None else str(record[f]) for f in fields)
    value = record[fields[0]]
    if not isinstance(value, list):
        raise UserError(f"{where}: choice column {fields[0]!r} must hold a list of choices when "
                        f"it is the only one in choice_fields; name one column per choice instead")
    return tuple("" if c is None else str(c) for c in value)
