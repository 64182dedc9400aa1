"""Export one task of an mtl_jax run as a Hugging Face Transformers directory (usage:
``__main__.py``): config.json (id2label/label2id), model.safetensors and the run's tokenizer files,
loadable with ``BertFor*.from_pretrained(DIR)`` (T5: ``T5EncoderModel`` plus the head in
mtl_jax_head.safetensors / .json), giving the outputs ``--mode=predict`` gives.

Modules (each imports only those above it):
  source.py         the run: checkpoint (best | latest | STEP) and saved config through
                    ``checkpoints.init_from.read_source``, its model, the task's plain encoder
                    (soft sharing: the task's own; LoRA merged; prefix and adapters refused:
                    ``PEFT_EXPORTS``)
  weights.py        Flax encoder -> HF tensors and config.json, the inverse of
                    ``checkpoints/hf.py`` through its own tables, checked by reading back
  architectures.py  task type -> Transformers head (``HEAD_EXPORTS``), encoder family -> layout
                    (``FAMILIES``), the pooling refusal
  driver.py         export_run: everything checked, then the directory written
  __main__.py       the absl command line

(``mtl_jax.models.export`` is another thing: the inference folds of the Flax model.)
"""
# The public names, re-exported so that `from mtl_jax import export; export.X` works.
from mtl_jax.export.architectures import (  # noqa: F401
    FAMILIES, HEAD_EXPORTS, HEAD_FILE, HEAD_INFO_FILE, Exported, HeadExport)
from mtl_jax.export.driver import MODEL_FILE, PROVENANCE_FILE, ExportResult, export_run  # noqa: F401
from mtl_jax.export.source import PEFT_EXPORTS, RunSource, read_run, task_encoder  # noqa: F401
from mtl_jax.export.weights import encoder_tensors, hf_config, unstack_layers  # noqa: F401
