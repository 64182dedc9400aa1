"""Predictions on raw inputs: JSONL records in the task's own field names -> one JSON per line.

    sequence_classification  {"sentence": ...}          -> {"label": "positive",
                                                            "probabilities": {"negative": .1, ...}}
    sequence_regression      {"sentence1", "sentence2"} -> {"value": 3.2}
    token_classification     {"tokens": [...] or "a b"} -> {"tags": [...], "entities":
                                                            [{"type", "start", "end", "text"}]}
    extractive_qa            {"question", "context"}    -> {"answer": "..."}
    multiple_choice          {"premise", "choice1", ...} -> {"choice": 1, "label": "choice2",
                                                            "text": "...", "probabilities":
                                                            [.3, .7] (one per choice)}

An input's ``id`` (or the QA task's id_field) is copied to its output. Inputs go through the
same tokenization and batching as evaluation (labels are dummies, never read).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Callable

import numpy as np

from mtl_jax.data import batching
from mtl_jax.data.features import Features
from mtl_jax.data.pipeline import TaskData
from mtl_jax.errors import UserError
from mtl_jax.evaluation.evaluate import collect_outputs
from mtl_jax.evaluation.qa_postprocess import best_answers
from mtl_jax.evaluation.metrics import entities
from mtl_jax.registry import Registry
from mtl_jax.tasks.definitions import task_definitions
from mtl_jax.tasks.types import TASK_TYPES, choice_context, choice_texts


def read_inputs(path: str) -> list[dict]:
    """JSON objects, one a line, from ``path`` or stdin ("-"); blank lines are skipped."""
    name = "stdin" if path == "-" else path
    try:
        lines = sys.stdin.readlines() if path == "-" else open(path, encoding="utf-8").readlines()
    except OSError as e:
        raise UserError(f"cannot read --input={path} ({e.strerror or type(e).__name__}); pass a "
                        f"JSONL file or - for stdin") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: bytes that are not UTF-8 at byte offset {e.start} "
                        f"({e.object[e.start:e.end]!r}); give UTF-8 JSON lines") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}:{number}: not valid JSON ({e.msg}); give one JSON object a "
                            f"line") from None
        if not isinstance(record, dict):
            raise UserError(f"{name}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _field(record: dict, field: str, where: str, definition):
    if field not in record:
        raise UserError(f"{where}: field {field!r} missing (this task reads "
                        f"{', '.join(definition.text_fields)}); fix the input")
    value = record[field]
    return "" if value is None else value


@dataclasses.dataclass(frozen=True)
class Predictor:
    """``example``: raw record -> the task type's example (dummy labels); ``outputs``: the
    per-feature head outputs of all examples -> one JSON-ready dict per example."""

    example: Callable
    outputs: Callable


PREDICTORS: Registry[Predictor] = Registry("task type")


def _texts(record, where, definition):
    return tuple(str(_field(record, f, where, definition)) for f in definition.text_fields)


def _softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def _classes(examples, features, outputs, definition, label_names):
    out = []
    for logits in outputs:
        p = _softmax(logits)
        out.append({"label": label_names[int(np.argmax(p))],
                    "probabilities": {n: float(v) for n, v in zip(label_names, p)}})
    return out


PREDICTORS.register("sequence_classification", Predictor(
    example=lambda r, where, d: dict(texts=_texts(r, where, d), label=0), outputs=_classes))
PREDICTORS.register("sequence_regression", Predictor(
    example=lambda r, where, d: dict(texts=_texts(r, where, d), target=0.0),
    outputs=lambda e, f, outputs, d, n: [{"value": float(np.ravel(o)[0])} for o in outputs]))


def _words(record, where, definition):
    words = _field(record, definition.text_fields[0], where, definition)
    words = words.split() if isinstance(words, str) else [str(w) for w in words]
    if not words:
        raise UserError(f"{where}: no words in {definition.text_fields[0]!r}; give a list of words "
                        f"or a whitespace-separated string")
    return dict(words=words, tags=[0] * len(words))


def _tags(examples, features, outputs, definition, label_names):
    tagged = TASK_TYPES.get("token_classification").postprocess(
        examples, features, outputs, definition, label_names)["predictions"]
    out = []
    for example, tags in zip(examples, tagged):
        spans = sorted(entities(tags), key=lambda s: s[1])
        out.append({"tags": tags, "entities": [
            {"type": kind, "start": first, "end": last + 1,
             "text": " ".join(example["words"][first:last + 1])} for kind, first, last in spans]})
    return out


PREDICTORS.register("token_classification", Predictor(example=_words, outputs=_tags))


def _qa_example(record, where, definition):
    question, context = _texts(record, where, definition)
    if not context.strip():
        raise UserError(f"{where}: empty {definition.text_fields[1]!r}; "
                        f"give a context to answer from")
    # Dummy answer span (its first character): tokenization needs one, prediction ignores it.
    return dict(id=str(record.get(definition.id_field, "")), question=question, context=context,
                answers=[""], spans=[(0, 1)])


def _answers(examples, features, outputs, definition, label_names):
    answers = best_answers(examples, features, outputs, n_best=definition.n_best,
                           max_answer_length=definition.max_answer_length)
    return [{"answer": a} for a in answers]


PREDICTORS.register("extractive_qa", Predictor(example=_qa_example, outputs=_answers))


def _choice_example(record, where, definition):
    for column in TASK_TYPES.get("multiple_choice").columns(definition)[:-1]:  # not the label
        _field(record, column, where, definition)
    return dict(context=choice_context(record, definition),
                choices=choice_texts(record, where, definition), label=0, where=where)


def _choices(examples, features, outputs, definition, label_names):
    out = []
    for example, scores in zip(examples, outputs):
        p = _softmax(scores)
        best = int(np.argmax(p))
        out.append({"choice": best, "label": label_names[best], "text": example["choices"][best],
                    "probabilities": [float(v) for v in p]})
    return out


PREDICTORS.register("multiple_choice", Predictor(example=_choice_example, outputs=_choices))


def predict(run, state, task: str, records: list[dict]) -> list[dict]:
    """One output dict per record, in order (see the module docstring)."""
    if not records:
        return []
    config = run.config
    spec = run.spec(task)
    definition = task_definitions(config)[spec.name]
    predictor = PREDICTORS.get(spec.type)
    examples = [predictor.example(r, f"input line {i}", definition)
                for i, r in enumerate(records, 1)]
    features = Features(TASK_TYPES.get(spec.type).tokenize(
        examples, run.tokenizer, definition, config.data, spec.label_names))
    task_data = TaskData(spec, definition, "predict", examples, features, run.data.keys,
                         batching.check_buckets(config.data.buckets))
    outputs = collect_outputs(task_data, run.predict_fn(state, spec.name), config.eval.batch_size)
    id_field = definition.get("id_field", "id")
    results = predictor.outputs(examples, features, outputs, definition, spec.label_names)
    return [({"id": r[id_field]} if id_field in r else {}) | out
            for r, out in zip(records, results)]
