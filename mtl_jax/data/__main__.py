"""Data preview: ``python -m mtl_jax.data --config=configs/bert_multitask.py --show=3``."""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mtl_jax import cli
from mtl_jax.errors import user_errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with :arg.", lock_config=True)
_SHOW = flags.DEFINE_integer("show", 3, "Decoded examples to print per task.")
_SPLITS = flags.DEFINE_list("splits", ["train", "validation"],
                            "Splits to load (tasks lacking one skip it).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    with user_errors(verbose=_VERBOSE.value):
        import transformers

        from mtl_jax.data import pipeline, preview
        from mtl_jax.text.tokenizer import tokenizer_for

        transformers.logging.set_verbosity_error()  # untruncated lengths exceed model_max_length
        config = _CONFIG.value
        tokenizer = tokenizer_for(config)
        # A task without a train split is previewed (evaluation only), not rejected.
        run = pipeline.build_data(config, tokenizer, splits=tuple(_SPLITS.value),
                                  require_train=False)
        print(preview.preview(run, tokenizer, _SHOW.value))


if __name__ == "__main__":
    cli.run(main)
