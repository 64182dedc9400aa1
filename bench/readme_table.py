"""Rewrites a generated table between a README's ``<!-- NAME:begin -->`` / ``:end`` markers."""
from __future__ import annotations

import pathlib


def update(readme: pathlib.Path, name: str, table: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"error: {readme} lacks the {begin} / {end} markers; "
                         f"add them where the table goes")
    head, rest = text.split(begin, 1)
    readme.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1])
