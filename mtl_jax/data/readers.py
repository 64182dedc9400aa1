"""Reading one split of a task into raw rows: local files (jsonl/json/csv/tsv/CoNLL) or a hub
dataset.

A row is ``(where, record)``; ``where`` ("path:line" or "glue/rte[validation] row 7") is what every
error message about that row names.
"""
from __future__ import annotations

import csv
import io
import json
import pathlib
from typing import Callable, Iterator

from mtl_jax.errors import UserError
from mtl_jax.registry import Registry
from mtl_jax.tasks.definitions import resolve_path

Row = tuple[str, dict]
FORMATS: Registry[Callable[[pathlib.Path, dict], list[Row]]] = Registry("file format")
_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "conll",
             ".conll": "conll", ".iob": "conll", ".bio": "conll"}


def read_text(path: pathlib.Path) -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 are one line naming the file, the line
    and the byte offset (a raw UnicodeDecodeError names neither)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: bytes that are not UTF-8 at byte offset {e.start} "
                        f"({data[e.start:e.end]!r}); re-encode the file as UTF-8 (e.g. iconv -f "
                        f"latin1 -t utf-8)") from None


def text_lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file."""
    return enumerate(io.StringIO(read_text(path), newline=None), 1)


@FORMATS.register("jsonl")
def _read_jsonl(path: pathlib.Path, definition) -> list[Row]:
    rows = []
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg}); fix the line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line_no}: expected a JSON object per line, "
                            f"got {type(record).__name__}")
        rows.append((f"{path}:{line_no}", record))
    return rows


@FORMATS.register("json")
def _read_json(path: pathlib.Path, definition) -> list[Row]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
        if data and isinstance(data[0], dict) and "paragraphs" in data[0]:
            data = list(_flatten_squad(data))
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records (or SQuAD's {{'data': [...]}})")
    return [(f"{path} record {i}", r) for i, r in enumerate(data)]


def _flatten_squad(articles: list[dict]) -> Iterator[dict]:
    """The official SQuAD nesting (data/paragraphs/qas) as hub-schema records."""
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield dict(id=qa["id"], title=article.get("title", ""),
                           context=paragraph["context"], question=qa["question"],
                           answers=dict(text=[a["text"] for a in qa["answers"]],
                                        answer_start=[a["answer_start"] for a in qa["answers"]]))


def _read_delimited(path: pathlib.Path, delimiter: str) -> list[Row]:
    f = io.StringIO(read_text(path), newline="")
    # TSV (GLUE style) has bare quotes inside sentences; CSV uses standard quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
    return [(f"{path}:{reader.line_num}", dict(r)) for r in reader]


FORMATS.register("csv", lambda path, definition: _read_delimited(path, ","))
FORMATS.register("tsv", lambda path, definition: _read_delimited(path, "\t"))


@FORMATS.register("conll")
def _read_conll(path: pathlib.Path, definition) -> list[Row]:
    """Column text: token first, tag last, blank line between sentences, -DOCSTART- skipped."""
    tokens_field = definition.text_fields[0] if definition.text_fields else "tokens"
    rows, tokens, tags, start = [], [], [], 0
    for line_no, line in text_lines(path):
        parts = line.split()
        if parts and parts[0] == "-DOCSTART-":
            continue
        if not parts:
            if tokens:
                rows.append((f"{path}:{start}",
                             {tokens_field: tokens, definition.label_field: tags}))
            tokens, tags = [], []
            continue
        if len(parts) < 2:
            raise UserError(f"{path}:{line_no}: a CoNLL line needs a token and a tag column, "
                            f"got {line.strip()!r}")
        if not tokens:
            start = line_no
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        rows.append((f"{path}:{start}", {tokens_field: tokens, definition.label_field: tags}))
    return rows


def file_format(path: pathlib.Path, definition) -> str:
    if definition.file_format != "auto":
        FORMATS.get(definition.file_format)
        return definition.file_format
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise UserError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        f"set the task's file_format to one of "
                        f"{', '.join(FORMATS.names())}") from None


def local_path(task: str, split: str, definition) -> pathlib.Path:
    path = resolve_path(definition.data[split])
    if path.is_dir():
        raise UserError(f"tasks.{task}.data.{split}: {definition.data[split]!r} is a directory; "
                        f"name a file in it "
                        f"(e.g. {definition.data[split].rstrip('/')}/{split}.jsonl)")
    if not path.is_file():
        raise UserError(f"tasks.{task}.data.{split}: file {definition.data[split]!r} not found "
                        f"(looked in the current directory and the repo root); fix the path")
    return path


def read_split(task: str, split: str, definition) -> list[Row]:
    """All rows of ``split`` of a task, from its local file or its hub dataset."""
    if split not in definition.data:
        raise UserError(f"tasks.{task} has no {split!r} split "
                        f"(it has {', '.join(definition.data) or 'none'}); "
                        f"set tasks.{task}.data.{split}")
    if definition.hub:
        return [(f"{where_hub(definition, split)} row {i}", r)
                for i, r in enumerate(load_hub(task, split, definition))]
    path = local_path(task, split, definition)
    return FORMATS.get(file_format(path, definition))(path, definition)


def where_hub(definition, split: str) -> str:
    name = f"{definition.hub}/{definition.hub_config}" if definition.hub_config else definition.hub
    return f"{name}[{definition.data[split]}]"


def hub_folder(definition) -> pathlib.Path | None:
    """The local dataset repository folder ``hub`` names (resolved like data paths), or None for
    a hub name. ``datasets.load_dataset`` reads both the same way (data files + dataset card)."""
    folder = resolve_path(definition.hub)
    return folder if folder.is_dir() else None


def load_hub(task: str, split: str, definition):
    """A hub split via ``datasets``; an unreachable hub is one UserError line."""
    import datasets

    folder = hub_folder(definition)
    try:
        return datasets.load_dataset(str(folder) if folder else definition.hub,
                                     definition.hub_config or None, split=definition.data[split])
    except Exception as e:
        # datasets raises many types (ConnectionError, FileNotFoundError, ValueError).
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tasks.{task}: cannot load hub dataset {where_hub(definition, split)} "
                        f"({reason[:160]}); check network/HF cache, or use local files: "
                        f"mtl_jax.tasks.presets.local_task({task!r}, DATA_DIR)") from None


def hub_label_names(task: str, definition) -> tuple[str, ...]:
    """Label names from the hub dataset's features (ClassLabel, or a Sequence of ClassLabel)."""
    split = next(iter(definition.data))
    feature = load_hub(task, split, definition).features.get(definition.label_field)
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for tags
    return tuple(getattr(feature, "names", None) or ())


def source_fingerprint(task: str, split: str, definition) -> dict:
    """What identifies the split's content cheaply (for the tokenization cache key)."""
    if definition.hub:
        fingerprint = dict(hub=where_hub(definition, split))
        folder = hub_folder(definition)
        if folder:  # a local repository's files may change under the same name
            fingerprint["files"] = [[str(f.relative_to(folder)), f.stat().st_size,
                                     f.stat().st_mtime_ns]
                                    for f in sorted(folder.rglob("*")) if f.is_file()]
        return fingerprint
    path = local_path(task, split, definition)
    stat = path.stat()
    return dict(path=str(path.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
