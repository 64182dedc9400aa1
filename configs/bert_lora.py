"""MiniLM with per-task LoRA (rank 8, alpha 16) on the attention query/value, encoder frozen.

Same tasks and schedule as bert_multitask.py (args tiny / full).
"""
import pathlib
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from configs import bert_multitask  # noqa: E402


def get_config(arg=None):
    c = bert_multitask.get_config(arg)
    c.peft.kind = "lora"
    c.peft.lora_rank = 8 if "tiny" not in bert_multitask.parse_args(arg) else 4
    c.peft.lora_alpha = 16.0
    c.peft.lora_targets = r"(query|value)"
    c.optim.lr = 5e-4
    return c
