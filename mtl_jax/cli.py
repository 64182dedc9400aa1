"""Command-line plumbing shared by every entry point (main, data preview, compare).

Flags are parsed by absl; configs come from ``ml_collections.config_flags`` and are locked, so an
unknown override key is rejected. Every parsing failure becomes one line on stderr naming the fix.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Callable, Iterable

from absl import flags
import ml_collections

from mtl_jax.errors import UserError

_OVERRIDE = re.compile(r"^--config\.([\w.]+)")
_BAD_VALUE = re.compile(r"^flag --config\.([\w.]+)=(.*?): ")


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key path of ``config`` (leaves and sections)."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(config_keys(value, path + "."))
    return keys


def closest_keys(key: str, valid: Iterable[str], n: int = 3) -> list[str]:
    valid = list(valid)
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in valid if k.rsplit(".", 1)[0] == parent and k != parent] if parent else valid
    return difflib.get_close_matches(key, siblings, n=n, cutoff=0.5) or difflib.get_close_matches(
        key, valid, n=n, cutoff=0.4)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().replace("\\n", "\n").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError-style quoting
        text = text[1:-1]
    return text.splitlines()[0] if text else type(e).__name__


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl ``flags_parser``: parses argv; a bad flag or override is one line and exit code 2."""
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)
    try:
        _check_config_file(argv)
        return flags.FLAGS(argv)
    except Exception as e:  # absl wraps override errors in several exception types
        if verbose:
            raise
        message = _describe_flag_error(argv, e)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _describe_flag_error(argv: list[str], e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    for arg in argv:
        m = _OVERRIDE.match(arg)
        if not m:
            continue
        key = m.group(1)
        try:
            config = _load_config_for(argv)
        except Exception:  # the config file itself is broken: fall through to the raw message
            break
        valid = config_keys(config)
        if key not in valid:
            near = closest_keys(key, valid)
            hint = f"; did you mean {', '.join('--config.' + k for k in near)}?" if near else ""
            return f"unknown config key --config.{key}{hint}"
        bad = _BAD_VALUE.match(str(e))
        if bad and bad.group(1) == key:
            default = _lookup(config, key)
            return (f"bad value {bad.group(2)!r} for --config.{key}: expected "
                    f"{type(default).__name__} (default {default!r})")
    if isinstance(e, flags.UnrecognizedFlagError):
        name = getattr(e, "flagname", None) or _first_line(e).rsplit(" ", 1)[-1].strip("'")
        near = difflib.get_close_matches(name, list(flags.FLAGS), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('--' + n for n in near)}?" if near else "see --help"
        return f"unknown flag --{name}; {hint}"
    return _first_line(e)


def _lookup(config: ml_collections.ConfigDict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _config_spec(argv: list[str]) -> str | None:
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _check_config_file(argv: list[str]) -> None:
    """A missing or broken --config file is one clear line (absl would defer it or hide it)."""
    spec = _config_spec(argv)
    if spec is None:
        return  # absl reports the missing required flag
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found; pass --config=PATH of an existing "
                        "config .py file (e.g. --config=configs/base.py)")
    try:
        _load_config_for(argv)
    except UserError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # anything the config file raises
        raise UserError(f"config file {path} failed to load ({type(e).__name__}: "
                        f"{_first_line(e)}); fix it or run with --verbose for the traceback") from e


def _load_config_for(argv: list[str]) -> ml_collections.ConfigDict:
    """Loads the --config file named in argv (without overrides) to list its valid keys."""
    from ml_collections.config_flags import config_flags as cf  # local: private helper

    spec = _config_spec(argv)
    if spec is None:
        raise UserError("no --config given")
    path, _, cfg_arg = spec.partition(":")
    module = cf._LoadConfigModule("cfg", path)  # pylint: disable=protected-access
    return module.get_config(cfg_arg) if cfg_arg else module.get_config()


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run`` with one-line flag errors."""
    from absl import app

    app.run(main, flags_parser=parse_flags_or_exit)
