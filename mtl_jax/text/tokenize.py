"""Tokenization with HF fast tokenizers into packed feature arrays, one function per input kind.

Each function returns the arrays of ``mtl_jax.data.features.Features``: token-level arrays packed
flat (``pack``) with ``lengths`` per feature, and per-feature arrays with one row each.
"""
from __future__ import annotations

import itertools

import numpy as np

from mtl_jax.errors import UserError

IGNORE = -100
_CHUNK = 2048  # examples per tokenizer call: bounds peak memory, keeps the Rust batching fast


def pack(sequences: list[list[int]], dtype=np.int32) -> np.ndarray:
    """Ragged sequences concatenated into one flat array (``Features`` slices it by lengths)."""
    total = sum(len(s) for s in sequences)
    return np.fromiter(itertools.chain.from_iterable(sequences), dtype=dtype, count=total)


def _lengths(ids: list[list[int]]) -> np.ndarray:
    return np.array([len(x) for x in ids], np.int32)


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield slice(start, min(n, start + _CHUNK))


def _type_ids(enc, i: int, length: int) -> list[int]:
    # T5-style tokenizers return no token_type_ids: segment 0 everywhere.
    return enc["token_type_ids"][i] if "token_type_ids" in enc else [0] * length


def encode_texts(tokenizer, texts: list[tuple[str, ...]],
                 max_length: int) -> dict[str, np.ndarray]:
    """Single sentences or pairs, truncated (longest first) to ``max_length`` tokens."""
    ids, types = [], []
    for s in _chunks(len(texts)):
        part = texts[s]
        firsts = [t[0] for t in part]
        seconds = [t[1] for t in part] if part and len(part[0]) > 1 else None
        enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
        ids.extend(enc["input_ids"])
        types.extend(_type_ids(enc, i, len(x)) for i, x in enumerate(enc["input_ids"]))
    return dict(lengths=_lengths(ids), input_ids=pack(ids), token_type_ids=pack(types),
                example_index=np.arange(len(ids), dtype=np.int32))


def encode_choices(tokenizer, contexts: list[str], choices: list[tuple[str, ...]],
                   max_length: int) -> dict[str, np.ndarray]:
    """(context, choice) pairs, each truncated (longest first) to ``max_length`` tokens; one
    feature per example (every example has the same number of choices C): its C sequences as
    rows, each padded with 0 to the feature's length (its longest pair's, the bucket measure),
    and ``choice_lengths`` [N, C] their own token counts."""
    num_choices = len(choices[0])
    pairs = encode_texts(tokenizer, [(c, x) for c, row in zip(contexts, choices) for x in row],
                         max_length)
    choice_lengths = pairs["lengths"].reshape(-1, num_choices)
    widths = np.repeat(choice_lengths.max(1), num_choices)
    cuts = np.cumsum(pairs["lengths"])[:-1]

    def padded_rows(key):
        rows = np.split(pairs[key], cuts)
        return [np.pad(r, (0, w - len(r))) for r, w in zip(rows, widths)]

    return dict(lengths=choice_lengths.max(1), choice_lengths=choice_lengths,
                input_ids=pack(padded_rows("input_ids")),
                token_type_ids=pack(padded_rows("token_type_ids")),
                example_index=np.arange(len(choices), dtype=np.int32))


def _inside_to_begin(label_names: tuple[str, ...]) -> dict[int, int]:
    """B-X -> I-X label ids, for labelling continuation sub-tokens (HF's ``label_all_tokens``)."""
    index = {n: i for i, n in enumerate(label_names)}
    return {i: index.get("I-" + n[2:], i) for i, n in enumerate(label_names) if n.startswith("B-")}


def encode_words(tokenizer, words: list[list[str]], tags: list[list[int]], max_length: int,
                 label_all_subtokens: bool, label_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Pre-split words -> sub-tokens; each word's tag goes to its first sub-token (others -100,
    or the I- form of the tag with ``label_all_subtokens``). ``word_ids`` keeps, per token, the
    word it starts (-1 elsewhere) so evaluation maps predictions back to words."""
    begin_to_inside = _inside_to_begin(label_names) if label_all_subtokens else {}
    ids, types, tag_ids, word_ids = [], [], [], []
    for s in _chunks(len(words)):
        enc = tokenizer(words[s], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        for i, example_tags in enumerate(tags[s]):
            token_tags, token_words, previous = [], [], None
            for w in enc.word_ids(i):
                if w is None:
                    token_tags.append(IGNORE)
                    token_words.append(-1)
                elif w != previous:
                    token_tags.append(example_tags[w])
                    token_words.append(w)
                else:
                    token_tags.append(begin_to_inside.get(example_tags[w], example_tags[w])
                                      if label_all_subtokens else IGNORE)
                    token_words.append(-1)
                previous = w
            ids.append(enc["input_ids"][i])
            types.append(_type_ids(enc, i, len(enc["input_ids"][i])))
            tag_ids.append(token_tags)
            word_ids.append(token_words)
    return dict(lengths=_lengths(ids), input_ids=pack(ids), token_type_ids=pack(types),
                tag_ids=pack(tag_ids), word_ids=pack(word_ids),
                example_index=np.arange(len(ids), dtype=np.int32))


def encode_qa(tokenizer, questions: list[str], contexts: list[str],
              answers: list[tuple[int, int]], max_length: int,
              doc_stride: int) -> dict[str, np.ndarray]:
    """Question + context windows (``doc_stride`` tokens of overlap) with start/end token positions.

    ``answers[i]`` is (start_char, end_char) of example i's first answer. A window that does not
    contain the whole answer points both positions at index 0 (CLS). ``offset_mapping`` keeps the
    character span of context tokens and (-1, -1) elsewhere, for post-processing.
    """
    if tokenizer.padding_side != "right":
        raise UserError("extractive QA needs a tokenizer with padding_side='right'")
    ids, types, offsets, starts, ends, example_index = [], [], [], [], [], []
    for s in _chunks(len(questions)):
        try:
            enc = tokenizer([q.lstrip() for q in questions[s]], contexts[s],
                            truncation="only_second", max_length=max_length, stride=doc_stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        except Exception as e:  # the tokenizer refuses when the question alone fills max_length
            raise UserError(f"QA tokenization failed ({str(e).splitlines()[0][:120]}); raise the "
                            "task's max_length or lower doc_stride") from None
        for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
            sequence_ids = enc.sequence_ids(i)
            token_offsets = [o if sid == 1 else (-1, -1)
                             for o, sid in zip(enc["offset_mapping"][i], sequence_ids)]
            start, end = _answer_tokens(token_offsets, *answers[s.start + sample])
            ids.append(enc["input_ids"][i])
            types.append(_type_ids(enc, i, len(enc["input_ids"][i])))
            offsets.append(token_offsets)
            starts.append(start)
            ends.append(end)
            example_index.append(s.start + sample)
    flat_offsets = [o for window in offsets for o in window]
    return dict(lengths=_lengths(ids), input_ids=pack(ids), token_type_ids=pack(types),
                offset_mapping=np.array(flat_offsets, np.int32).reshape(-1, 2),
                start_positions=np.array(starts, np.int32), end_positions=np.array(ends, np.int32),
                example_index=np.array(example_index, np.int32))


def _answer_tokens(token_offsets: list[tuple[int, int]], start_char: int,
                   end_char: int) -> tuple[int, int]:
    """Token span of the answer characters in this window, or (0, 0) (the [CLS] "no answer" target)
    when the window does not hold the whole answer or there is no answer (predict inputs)."""
    context = [i for i, (a, _) in enumerate(token_offsets) if a >= 0]
    if (end_char <= start_char or not context or token_offsets[context[0]][0] > start_char
            or token_offsets[context[-1]][1] < end_char):
        return 0, 0
    # Both exist after the checks above; end < start when the answer is only the gap between tokens.
    start = next(i for i in context if token_offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if token_offsets[i][0] < end_char)
    return (start, end) if end >= start else (0, 0)
