"""Entry point: ``python -m mtl_jax.main --config=configs/bert_multitask.py --workdir=DIR``."""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mtl_jax import cli
from mtl_jax.errors import user_errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with :arg.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, results).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to do.")
_TASK = flags.DEFINE_string("task", None, "predict: the task whose head to use.")
_INPUT = flags.DEFINE_string("input", "-", "predict: JSONL input file, or - for stdin.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    with user_errors(verbose=_VERBOSE.value):
        from mtl_jax.training import runner  # heavy imports only after flags parsed

        runner.run(_MODE.value, _CONFIG.value, _WORKDIR.value, task=_TASK.value,
                   input_path=_INPUT.value, verbose=_VERBOSE.value)


if __name__ == "__main__":
    cli.run(main)
