"""``export_run``: one task of an mtl_jax run -> a Transformers directory (see __init__.py)."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil

from mtl_jax.checkpoints import hf
from mtl_jax.errors import UserError
from mtl_jax.export.architectures import (FAMILIES, HEAD_FILE, HEAD_INFO_FILE, Exported,
                                          encoder_model)
from mtl_jax.export.source import read_run, task_encoder
from mtl_jax.export.weights import encoder_tensors, hf_config, source_hf_config
from mtl_jax.text.tokenizer import VOCAB_FILES
from mtl_jax.training.workdir import write_json

MODEL_FILE = "model.safetensors"
PROVENANCE_FILE = "mtl_jax_export.json"
# Every file an export may write besides the tokenizer's: removed first, so a re-export into the
# same directory leaves no stale head file behind.
OWN_FILES = ("config.json", MODEL_FILE, HEAD_FILE, HEAD_INFO_FILE, PROVENANCE_FILE)
TOKENIZER_FILES = (*VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "merges.txt")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out: pathlib.Path
    architecture: str
    task: str
    step: int
    notes: tuple[str, ...]


def export_run(workdir: str, task: str, out: str, checkpoint: str = "latest",
               encoder_only: bool = False) -> ExportResult:
    """Writes ``task``'s model (or, ``encoder_only``, its encoder) from ``workdir``'s checkpoint
    ``checkpoint`` (best | latest | STEP) to ``out``: config.json, model.safetensors, the
    tokenizer files (and for T5 the head files). Every refusal is raised before anything is
    written."""
    out_dir = _check_out(workdir, out)
    run = read_run(workdir, task, checkpoint)
    encoder, cfg = task_encoder(run)
    tensors = encoder_tensors(encoder, cfg)
    exported = (encoder_model(cfg.family, tensors) if encoder_only else
                FAMILIES.get(cfg.family).task_model(run.spec, run.head_params, run.config,
                                                    tensors))
    config = hf_config(cfg, source_hf_config(run.config), architectures=[exported.architecture],
                       **exported.config)
    _write(out_dir, config, exported, _tokenizer_dir(run.config))
    write_json(str(out_dir / PROVENANCE_FILE), dict(
        workdir=os.path.abspath(workdir), checkpoint=checkpoint, step=run.step, task=task,
        task_type=run.spec.type, architecture=exported.architecture, encoder_only=encoder_only,
        sharing=run.config.sharing.mode, peft=run.config.peft.kind, notes=exported.notes))
    return ExportResult(out_dir, exported.architecture, task, run.step, tuple(exported.notes))


def _check_out(workdir: str, out: str) -> pathlib.Path:
    if not out:
        raise UserError("--out is not set; pass --out=DIR (the Transformers directory to write)")
    path = pathlib.Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out={out} is a file; pass a directory")
    if os.path.exists(workdir) and path.resolve() == pathlib.Path(workdir).resolve():
        raise UserError(f"--out={out} is the run's workdir (its config.json would be "
                        f"overwritten); pass another directory")
    return path


def _tokenizer_dir(config) -> pathlib.Path:
    """The directory the run's tokenizer was loaded from (``text.tokenizer.tokenizer_for``)."""
    return hf.resolve_model_path(config.model.tokenizer or config.model.name_or_path)


def _write(out: pathlib.Path, config, exported: Exported,
           tokenizer_dir: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name in OWN_FILES:
        (out / name).unlink(missing_ok=True)
    metadata = {"format": "pt"}  # Transformers refuses safetensors files of other formats
    save_file(exported.tensors, str(out / MODEL_FILE), metadata=metadata)
    config.save_pretrained(str(out))
    if exported.head_tensors:
        save_file(exported.head_tensors, str(out / HEAD_FILE), metadata=metadata)
        write_json(str(out / HEAD_INFO_FILE), exported.head_info)
    for pattern in TOKENIZER_FILES:
        for path in tokenizer_dir.glob(pattern):
            if path.is_file():
                shutil.copyfile(path, out / path.name)
