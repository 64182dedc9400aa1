"""MiniLM with per-task bottleneck adapters (Houlsby: after attention and FFN), encoder frozen.

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
    c.peft.kind = "adapter"
    c.peft.adapter_kind = "houlsby"
    # 24 = hidden 384 / 16 (AdapterHub's reduction factor): ~3.8% of MiniLM trainable with 4 tasks.
    c.peft.adapter_size = 24 if "tiny" not in bert_multitask.parse_args(arg) else 8
    c.optim.lr = 1e-3  # adapters and heads train from scratch: 10x the full fine-tuning rate
    return c
