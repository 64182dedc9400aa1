"""Shared helpers for the data tests: a small config, JSONL writers and the MiniLM tokenizer."""
import json

from configs.base import get_base_config


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def base_config(tmp_path, **data):
    config = get_base_config()
    config.data.cache_dir = str(tmp_path / "cache")
    for key, value in data.items():
        setattr(config.data, key, value)
    return config
