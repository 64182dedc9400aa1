"""MiniLM, soft sharing: one encoder per task (all from the same weights) tied by an L2 penalty.

Batches are task-homogeneous so each step runs one task's encoder (see
mtl_jax/models/soft_sharing.py for the cost of mixed batches). Same tasks and schedule as
bert_multitask.py (args tiny / full).
"""
import pathlib
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from configs import bert_multitask  # noqa: E402


def get_config(arg=None):
    c = bert_multitask.get_config(arg)
    c.sharing.mode = "soft"
    c.sharing.soft_penalty = "mean"
    c.sharing.soft_lambda = 1e-3
    c.data.batch_mode = "homogeneous"
    return c
