"""What the data preview CLI prints: per task split sizes, labels, decoded examples, lengths,
mixing."""
from __future__ import annotations

import numpy as np

from mtl_jax.data.pipeline import RunData, label_counts
from mtl_jax.data.samplers import build_sampler

_HIST_BINS = (16, 32, 64, 128, 256, 384, 512)
_LENGTH_SAMPLE = 20000  # untruncated lengths are measured on at most this many examples


def untruncated_lengths(task_data, tokenizer) -> np.ndarray:
    """Token counts without truncation (QA: question + full context; multiple choice: the
    longest (context, choice) pair, the length its row is padded to)."""
    examples = task_data.examples[:_LENGTH_SAMPLE]
    if "choices" in examples[0]:
        enc = tokenizer([e["context"] for e in examples for _ in e["choices"]],
                        [c for e in examples for c in e["choices"]])
        pairs = np.array([len(x) for x in enc["input_ids"]])
        return pairs.reshape(len(examples), -1).max(1)
    if "words" in examples[0]:
        enc = tokenizer([e["words"] for e in examples], is_split_into_words=True)
    elif "question" in examples[0]:
        enc = tokenizer([e["question"] for e in examples], [e["context"] for e in examples])
    else:
        pair = len(examples[0]["texts"]) > 1
        enc = tokenizer([e["texts"][0] for e in examples],
                        [e["texts"][1] for e in examples] if pair else None)
    return np.array([len(x) for x in enc["input_ids"]])


def histogram(lengths: np.ndarray) -> str:
    edges = [0, *[b for b in _HIST_BINS if b < lengths.max()], int(lengths.max())]
    counts, _ = np.histogram(lengths, bins=np.array(edges) + 0.5)
    widest = max(counts.max(), 1)
    return "\n".join(f"      {lo + 1:>4}-{hi:<4} {n:>7} {'#' * int(round(30 * n / widest))}"
                     for lo, hi, n in zip(edges[:-1], edges[1:], counts))


def task_preview(run: RunData, name: str, tokenizer, show: int) -> str:
    spec = next(s for s in run.specs if s.name == name)
    splits = run.data[name]
    lines = [f"== {name} ({spec.type}, task_id {spec.index}, num_labels {spec.num_labels})"]
    for split, task_data in splits.items():
        skipped = f", {task_data.skipped_empty} empty skipped" if task_data.skipped_empty else ""
        lines.append(f"  {split}: {len(task_data.examples)} examples, "
                     f"{len(task_data.features)} features{skipped}")
    if spec.label_names:
        lines.append(f"  labels: {', '.join(spec.label_names)}")
    first = splits.get("train") or next(iter(splits.values()))
    counts = label_counts(first)
    if counts:
        lines.append(f"  label counts ({first.split}): "
                     + ", ".join(f"{n}={counts[n]}" for n in spec.label_names))
    task_type = first.task_type
    for example in first.examples[:show]:
        lines.append(f"  [{example['where']}]\n    {task_type.describe(example, spec.label_names)}")
    lengths = untruncated_lengths(first, tokenizer)
    max_length = first.definition.max_length
    truncated = int((lengths > max_length).sum())
    sampled = f" (first {len(lengths)})" if len(lengths) < len(first.examples) else ""
    lines.append(f"  token lengths ({first.split}{sampled}): mean {lengths.mean():.1f}, "
                 f"max {lengths.max()}; {truncated} ({100 * truncated / len(lengths):.1f}%) "
                 f"longer than max_length={max_length}"
                 + (" (QA: split into windows)" if spec.type == "extractive_qa"
                    else " (truncated)"))
    lines.append(histogram(lengths))
    return "\n".join(lines)


def preview(run: RunData, tokenizer, show: int) -> str:
    parts = [task_preview(run, s.name, tokenizer, show) for s in run.specs]
    trained = [s.name for s in run.specs if "train" in run.data[s.name]]
    if trained:
        d = run.config.data
        sampler = build_sampler(d.sampler, [len(run.data[n]["train"].features) for n in trained],
                                d, d.shuffle_seed, tuple(trained))
        rates = ", ".join(f"{n}={r:.3f}" for n, r in zip(trained, sampler.rates))
        untrained = [s.name for s in run.specs if s.name not in trained]
        parts.append(f"== mixing: sampler={d.sampler} batch_mode={d.batch_mode} "
                     f"(temperature={d.temperature}, size_cap={d.size_cap})\n"
                     f"  rates over train features: {rates}"
                     + (f"\n  no train split (evaluation only): {', '.join(untrained)}"
                        if untrained else ""))
    return "\n\n".join(parts)
