"""Command-line plumbing shared by every entry point (main, data preview, compare).

Flags are parsed by absl; configs come from ``ml_collections.config_flags`` and are locked, so an
unknown override key is rejected. Every parsing failure becomes one line on stderr naming the fix.
Config values on the command line: ``config_value`` (a dotted key's value), ``parse_value`` (text
typed like a field) and ``format_value`` (a value as ``--config.KEY=`` text absl parses back).
"""
from __future__ import annotations

import ast
import difflib
import os
import re
import sys
from typing import Callable, Iterable

from absl import app
from absl import flags
import ml_collections
from ml_collections.config_flags import config_flags

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
    siblings = ([k for k in valid if k.rsplit(".", 1)[0] == parent and k != parent] if parent
                else valid)
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
            return _bad_value(bad.group(2), f"--config.{key}", config_value(config, key), "default")
    if isinstance(e, flags.UnrecognizedFlagError):
        name = getattr(e, "flagname", None) or _first_line(e).rsplit(" ", 1)[-1].strip("'")
        near = difflib.get_close_matches(name, list(flags.FLAGS), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('--' + n for n in near)}?" if near else "see --help"
        return f"unknown flag --{name}; {hint}"
    return _first_line(e)


# --- config values on the command line ----------------------------------------------------------

def config_value(config: ml_collections.ConfigDict, dotted: str):
    """The value (or section) at ``dotted`` ("optim.lr"); an unknown key names the closest ones."""
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            near = closest_keys(dotted, config_keys(config))
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UserError(f"unknown config key {dotted!r}{hint}") from None
    return node


def parse_value(current, text: str, key: str = "value"):
    """``text`` parsed as the type of the config field's ``current`` value."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, (tuple, list)):
            return tuple(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError):
        raise UserError(_bad_value(text, key, current, "current")) from None
    return text


def format_value(value) -> str:
    """A config value as ``--config.KEY=`` text that absl parses back to the same value."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def _bad_value(text: str, key: str, value, which: str) -> str:
    """``which`` names what ``value`` is: the file's "default" (a --config.KEY flag) or the
    "current" value of a config with the overrides applied (compare's --sweep)."""
    return f"bad value {text!r} for {key}: expected {type(value).__name__} ({which} {value!r})"


# --- the config file ----------------------------------------------------------------------------

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
    spec = _config_spec(argv)
    if spec is None:
        raise UserError("no --config given")
    path, _, cfg_arg = spec.partition(":")
    module = config_flags._LoadConfigModule("cfg", path)  # pylint: disable=protected-access
    return module.get_config(cfg_arg) if cfg_arg else module.get_config()


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run`` with one-line flag errors."""
    app.run(main, flags_parser=parse_flags_or_exit)
