"""One task of an mtl_jax run -> a Hugging Face Transformers directory:

  python -m mtl_jax.export --workdir=DIR --task=NAME --out=HF_DIR
      [--checkpoint=best|latest|STEP] [--encoder_only]

Writes config.json (id2label/label2id), model.safetensors and the run's tokenizer files:
BertForSequenceClassification (classification; regression with problem_type=regression),
BertForTokenClassification or BertForQuestionAnswering; a T5 run writes T5EncoderModel plus the
head in mtl_jax_head.safetensors and mtl_jax_head.json. ``--encoder_only`` writes the encoder the
task runs through (BertModel / T5EncoderModel). Soft sharing exports the task's own encoder;
LoRA is merged into the weights; prefix tuning and adapters are refused (vanilla Transformers
models have no place for them), and so is a BERT sentence head without heads.pooling=pooler.
The Hugging Face hub is never contacted.
"""
from __future__ import annotations

from absl import flags

from mtl_jax import cli
from mtl_jax.errors import UserError, user_errors
from mtl_jax.export.driver import export_run

_WORKDIR = flags.DEFINE_string("workdir", None, "The mtl_jax training workdir to export from.")
_TASK = flags.DEFINE_string("task", None, "The task whose model (head) to export.")
_OUT = flags.DEFINE_string("out", None, "The Transformers directory to write.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "best, latest or a step number.")
_ENCODER_ONLY = flags.DEFINE_bool("encoder_only", False,
                                  "Write the task's encoder alone (BertModel / T5EncoderModel).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def main(argv: list[str]) -> None:
    del argv
    with user_errors(verbose=_VERBOSE.value):
        for flag in (_WORKDIR, _TASK, _OUT):
            if not flag.value:
                raise UserError(f"--{flag.name} is not set; usage: python -m mtl_jax.export "
                                f"--workdir=DIR --task=NAME --out=HF_DIR")
        _quiet_library_logs()
        result = export_run(_WORKDIR.value, _TASK.value, _OUT.value, _CHECKPOINT.value,
                            _ENCODER_ONLY.value)
        for note in result.notes:
            print(f"[export] note: {note}")
        print(f"[export] wrote {result.out}: {result.architecture} of task {result.task} "
              f"(checkpoint step {result.step})")


def _quiet_library_logs() -> None:
    """orbax logs every checkpoint read at INFO; a failed one is reported in one line here."""
    from absl import logging as absl_logging

    from mtl_jax.training import runner

    absl_logging.set_verbosity(absl_logging.WARNING)
    if not _VERBOSE.value:
        runner.quiet_library_logs()


if __name__ == "__main__":
    cli.run(main)
