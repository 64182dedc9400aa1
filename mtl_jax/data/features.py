"""Tokenized features of one split: ragged token arrays packed flat, plus a disk cache.

Token-level arrays (``input_ids``, ``token_type_ids``, ``tag_ids``, ``word_ids``,
``offset_mapping``) are concatenated over features and sliced by ``offsets``; per-feature arrays
(``label``, ``target``, ``start_positions``, ``end_positions``, ``example_index``,
``choice_lengths``) have one row per feature. A feature is one tokenized sequence (QA examples
may give several windows; a multiple-choice example is one feature of C sequences).
The arrays come from ``mtl_jax.text.tokenize`` (through each task type's ``tokenize``).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

import numpy as np

# Bump when tokenization or the feature layout changes: invalidates every cache entry.
CODE_VERSION = 3
TOKEN_KEYS = ("input_ids", "token_type_ids", "tag_ids", "word_ids", "offset_mapping")


class Features:
    """Packed features; ``arrays['lengths']`` holds each feature's token count.

    Multiple-choice features (``choice_lengths`` [N, C]) hold C token rows each, every row
    padded to the feature's length (its longest choice's); ``lengths`` stays the bucket measure.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.lengths = arrays["lengths"]
        self.rows = arrays["choice_lengths"].shape[1] if "choice_lengths" in arrays else 1
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths * self.rows)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def tokens(self, key: str, i: int) -> np.ndarray:
        return self.arrays[key][self.offsets[i]:self.offsets[i + 1]]

    def token_rows(self, key: str, i: int) -> np.ndarray:
        """[rows, length]: feature i's token rows (one row unless it is multiple choice)."""
        return self.tokens(key, i).reshape(self.rows, -1)

    def row_lengths(self, i: int) -> np.ndarray:
        """[rows]: the token count of each of feature i's rows."""
        if "choice_lengths" in self.arrays:
            return self.arrays["choice_lengths"][i]
        return self.lengths[i:i + 1]

    def scalar(self, key: str, i: int):
        return self.arrays[key][i]

    def save(self, path: pathlib.Path, meta: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        os.close(fd)
        np.savez(tmp, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **self.arrays)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry

    @classmethod
    def load(cls, path: pathlib.Path) -> tuple["Features", dict]:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
            meta = json.loads(z["__meta__"].tobytes().decode())
        return cls(arrays), meta


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer by its full serialized state (vocab, normalizer, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = f"{type(tokenizer).__name__}|{getattr(tokenizer, 'padding_side', '')}"
    return hashlib.sha256((state + extra).encode()).hexdigest()[:16]


def cache_path(cache_dir: str, key: dict) -> pathlib.Path:
    root = pathlib.Path(os.path.expanduser(cache_dir or "~/.cache/mtl_jax"))
    digest = hashlib.sha256(
        json.dumps(dict(key, code_version=CODE_VERSION), sort_keys=True).encode())
    return root / "features" / f"{digest.hexdigest()[:24]}.npz"
