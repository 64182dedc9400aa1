"""Hugging Face PyTorch single-task fine-tuning under the comparison protocol (configs/compare.py).

The reference row of ``mtl_jax.compare``'s report: ``BertModel`` from the local MiniLM weights + a
linear head (dropout 0.1, [CLS] for sentence tasks, every token for CoNLL-2003, one score per
(context, choice) pair's [CLS] for COPA), Transformers' ``BertForQuestionAnswering`` with its own
loss for SQuAD (the same 384-token windows, stride 128), AdamW (lr 5e-5,
weight decay 0.01 except biases and LayerNorm, eps 1e-8), 10% linear warm-up then linear decay,
gradient clipping at 1.0 (optim.clip_norm), batch 32, seed 0. The batches and the evaluation are
mtl_jax's own (``build_data`` + ``train_iterator`` + ``evaluate_task``): the same examples in the
same order, the same SST-2 subsample, the same length buckets and the same metric code, so the
numbers compare directly with ``DIR/runs/single_<task>``.

  python bench/hf_reference.py --workdir=DIR                       # every task, the full protocol
                                                                   # (rerun: tasks with a full
                                                                   # results.json are skipped)
  python bench/hf_reference.py --workdir=DIR --tasks=rte --max_steps=20    # a quick check
  python bench/hf_reference.py --workdir=DIR --tasks=copa,squad     # the extra tasks' report

Writes ``DIR/reference/<task>/{results.json,results.md,metrics.jsonl}`` (results.json in
mtl_jax.training.results' schema, with trainable_params, wall_s and examples_per_s). A long task
(SQuAD: hours on 2 cores) checkpoints to ``DIR/reference/<task>/checkpoint.pt`` every
train.checkpoint_every steps and around each evaluation, and on SIGTERM at the next step; the
same command resumes it where it stopped, with the same batches and dropout masks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs import compare as protocol  # noqa: E402
from mtl_jax.errors import STOPPED_EXIT_CODE  # noqa: E402
from mtl_jax.evaluation import evaluate_task  # noqa: E402
from mtl_jax.training.metrics_writer import MetricsWriter  # noqa: E402
from mtl_jax.training.results import write_results  # noqa: E402

IGNORE = -100
CHECKPOINT = "checkpoint.pt"  # beside results.json; removed once the task has finished


class Classifier(torch.nn.Module):
    """BertModel + dropout + one linear layer (on [CLS], or on every token)."""

    def __init__(self, path: str, num_labels: int, per_token: bool, dropout: float):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel.from_pretrained(path, add_pooling_layer=False)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(self.bert.config.hidden_size, num_labels)
        torch.nn.init.normal_(self.head.weight, std=0.02)  # BERT's initializer_range
        torch.nn.init.zeros_(self.head.bias)
        self.per_token = per_token
        self.loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)

    def scores(self, batch: dict) -> torch.Tensor:
        hidden = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).last_hidden_state
        return self.head(self.dropout(hidden if self.per_token else hidden[:, 0]))

    def forward(self, batch: dict, keep: torch.Tensor | None = None):
        """(outputs as mtl_jax's evaluation reads them, the training loss or None).
        ``keep`` [B]: the examples that count (weight > 0); None = no loss."""
        logits = self.scores(batch)
        if keep is None:
            return logits, None
        labels = batch["tag_ids"] if self.per_token else batch["label"]
        labels = torch.where(keep[:, None] if self.per_token else keep, labels, IGNORE)
        return logits, self.loss_fn(logits.reshape(-1, logits.shape[-1]).float(),
                                    labels.reshape(-1))


class ChoiceScorer(Classifier):
    """Multiple choice (COPA): the same [CLS] -> dropout -> Linear(hidden, 1) score for each
    (context, choice) pair of a [B, C, L] batch, cross-entropy over the C scores. mtl_jax's
    multiple-choice head under the protocol's heads.pooling=cls (Transformers'
    BertForMultipleChoice puts BERT's pooler first: the heads.pooling=pooler setting)."""

    def __init__(self, path: str, dropout: float):
        super().__init__(path, 1, per_token=False, dropout=dropout)

    def forward(self, batch: dict, keep: torch.Tensor | None = None):
        rows, choices = batch["input_ids"].shape[:2]
        flat = {k: batch[k].reshape(rows * choices, -1) for k in TOKEN_KEYS}
        logits = self.scores(flat).reshape(rows, choices)
        if keep is None:
            return logits, None
        return logits, self.loss_fn(logits.float(), torch.where(keep, batch["label"], IGNORE))


class SpanReference(torch.nn.Module):
    """Extractive QA: Transformers' own BertForQuestionAnswering, its loss included (start and
    end cross-entropy averaged; a position past the sequence is ignored, which is how padding
    examples are dropped). Its softmax also covers the padding tokens of a bucket, mtl_jax's
    only the real ones (models/losses.py span_loss)."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import BertForQuestionAnswering

        # from_pretrained draws the new qa_outputs layer from N(0, initializer_range=0.02).
        self.qa = BertForQuestionAnswering.from_pretrained(path)

    def forward(self, batch: dict, keep: torch.Tensor | None = None):
        labels = {}
        if keep is not None:
            ignored = batch["input_ids"].shape[1]
            labels = {k: torch.where(keep, batch[k], ignored)
                      for k in ("start_positions", "end_positions")}
        out = self.qa(**{k: batch[k] for k in TOKEN_KEYS}, **labels)
        return torch.stack([out.start_logits, out.end_logits], dim=-1), out.loss


# Task type -> the reference model (one entry a type; mtl_jax's heads are registered the same way).
REFERENCE_MODELS = {
    "sequence_classification": lambda path, spec, c: Classifier(
        path, spec.num_labels, per_token=False, dropout=c.heads.dropout),
    "token_classification": lambda path, spec, c: Classifier(
        path, spec.num_labels, per_token=True, dropout=c.heads.dropout),
    "multiple_choice": lambda path, spec, c: ChoiceScorer(path, c.heads.dropout),
    "extractive_qa": lambda path, spec, c: SpanReference(path),
}


def reference_model(path: str, spec, c) -> torch.nn.Module:
    if spec.type not in REFERENCE_MODELS:
        sys.exit(f"error: no reference model for task type {spec.type!r}; "
                 f"have {', '.join(sorted(REFERENCE_MODELS))}")
    return REFERENCE_MODELS[spec.type](path, spec, c)


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
LABEL_KEYS = ("label", "tag_ids", "start_positions", "end_positions")


def to_torch(batch: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)).long() for k, v in batch.items()
            if k in TOKEN_KEYS + LABEL_KEYS}


def kept(raw: dict) -> torch.Tensor:
    """Padding examples (weight 0) are ignored, exactly as mtl_jax's loss does."""
    return torch.from_numpy(np.asarray(raw["weight"])) > 0


def linear_warmup_decay(total: int, fraction: float):
    """optax's schedule in mtl_jax.training.optim: 0 -> 1 over int(f * total) steps, then -> 0."""
    warmup = int(fraction * total)
    decay = max(total - warmup, 1)
    return lambda s: s / warmup if s < warmup else max(0.0, 1.0 - (s - warmup) / decay)


def optimizer(model: torch.nn.Module, c) -> torch.optim.AdamW:
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n  # noqa: E731  # optim.no_decay
    params = list(model.named_parameters())
    groups = [dict(params=[p for n, p in params if not no_decay(n)],
                   weight_decay=c.optim.weight_decay),
              dict(params=[p for n, p in params if no_decay(n)], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=c.optim.lr, betas=(c.optim.b1, c.optim.b2), eps=c.optim.eps)


@dataclasses.dataclass
class Progress:
    """What a sitting hands the next one besides the tensors (checkpointed with them)."""
    step: int = 0
    train_time: float = 0.0
    wall_s: float = 0.0
    seen: int = 0
    evaluated_step: int = 0
    final: dict = dataclasses.field(default_factory=dict)
    best: dict | None = None
    best_step: int | None = None
    last_loss: float = 0.0


class StopFlag:
    """Set by SIGTERM (main installs the handler): the loop checkpoints at the next step and
    returns, as mtl_jax's own loop does."""

    def __init__(self):
        self.requested = False


def save_checkpoint(out_dir: str, setting: dict, model, opt, schedule, iterator,
                    progress: Progress) -> None:
    """Everything the next step depends on, written atomically (a kill mid-write leaves the
    previous checkpoint)."""
    path = os.path.join(out_dir, CHECKPOINT)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(dict(setting=setting, model=model.state_dict(), optimizer=opt.state_dict(),
                    schedule=schedule.state_dict(), rng=torch.get_rng_state(),
                    iterator=iterator.get_state(), progress=dataclasses.asdict(progress)),
               path + ".tmp")
    os.replace(path + ".tmp", path)


def restore_checkpoint(out_dir: str, setting: dict, model, opt, schedule,
                       iterator) -> Progress | None:
    """The progress of the checkpoint in ``out_dir`` (tensors restored in place), or None."""
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=False)  # our own file: numbers and dicts beside tensors
    if state["setting"] != setting:
        sys.exit(f"error: {path} is from a run with {state['setting']}, this one is {setting}; "
                 "delete it to start over, or rerun with the same --tasks/--tiny_data")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    iterator.set_state(state["iterator"])
    return Progress(**state["progress"])


def train_task(task: str, out_dir: str, max_steps: int, tiny_data: bool,
               stop: StopFlag | None = None) -> dict | None:
    """Trains and evaluates one task; the primary metric, or None when ``stop`` was requested:
    then it leaves a checkpoint that the next call resumes from:
    the same batches, dropout masks and optimizer state, so the result is the uninterrupted
    run's."""
    from mtl_jax.checkpoints.hf import resolve_model_path
    from mtl_jax.data.pipeline import build_data
    from mtl_jax.text.tokenizer import load_tokenizer

    c = protocol.get_config(f"tasks={task}")
    if tiny_data:  # the tiny data caps only: the model stays the real MiniLM
        for t in c.tasks.values():
            t.max_train_examples, t.max_eval_examples = 64, 32
        protocol.set_schedule(c, (task,))
    steps = min(c.train.num_steps, max_steps) if max_steps else c.train.num_steps
    eval_every = c.train.eval_every if not max_steps else max(1, steps // 2)
    path = str(resolve_model_path(c.model.name_or_path))
    torch.manual_seed(c.seed)
    data = build_data(c, load_tokenizer(path))
    spec = data.specs[0]
    metric = protocol.PRIMARY_METRICS[task]
    model = reference_model(path, spec, c)
    opt = optimizer(model, c)
    # The schedule spans the protocol's full step count even under --max_steps (a quick run is
    # the first max_steps of the real run, not a compressed one).
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(c.train.num_steps,
                                                                           c.optim.warmup_fraction))
    iterator = data.train_iterator(c.train.batch_size, seed=c.data.shuffle_seed, process_index=0,
                                   process_count=1)
    setting = dict(task=task, tiny_data=tiny_data, protocol_steps=c.train.num_steps)
    progress = restore_checkpoint(out_dir, setting, model, opt, schedule, iterator)
    if progress is not None and progress.step > steps:
        sys.exit(f"error: {os.path.join(out_dir, CHECKPOINT)} is at step {progress.step}, past "
                 f"--max_steps={max_steps}; rerun without --max_steps to finish that run")
    if progress is not None:
        print(f"{task}: resuming from step {progress.step} ({os.path.join(out_dir, CHECKPOINT)})")
    progress = progress or Progress()
    writer = MetricsWriter(out_dir, resume_step=progress.step or None, enabled=True,
                           tensorboard=False)
    start = time.time()

    def checkpoint():
        save_checkpoint(out_dir, setting, model, opt, schedule, iterator, dataclasses.replace(
            progress, wall_s=progress.wall_s + time.time() - start))

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            predict = lambda b: model(to_torch(b))[0].float().numpy()  # noqa: E731
            metrics, report = evaluate_task(data.eval_data(task), predict, c.eval.batch_size)
        model.train()
        writer.write(step, {f"eval/{task}/{k}": v for k, v in metrics.items()})
        progress.final, progress.evaluated_step = dict(metrics), step
        if progress.best is None or progress.final[metric] > progress.best[metric]:
            progress.best, progress.best_step = progress.final, step
        checkpoint()  # an evaluation is never repeated by a resumed run

    def is_eval(step: int) -> bool:
        return step % eval_every == 0 or step == steps

    model.train()
    if progress.step and progress.evaluated_step != progress.step and is_eval(progress.step):
        evaluate(progress.step)  # the sitting before stopped during this evaluation
    while progress.step < steps:
        if stop is not None and stop.requested:
            checkpoint()
            writer.close()
            return None
        train_step(model, opt, schedule, iterator, c, progress)
        step = progress.step
        if step % c.train.log_every == 0 or step == steps:
            writer.write(step, {"train/loss": progress.last_loss,
                                "train/examples_per_s": progress.seen / progress.train_time})
        if is_eval(step):
            checkpoint()  # before the evaluation, which may take longer than the training
            evaluate(step)
        elif step % c.train.checkpoint_every == 0:
            checkpoint()
    writer.close()
    extra = dict(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                 wall_s=progress.wall_s + time.time() - start,
                 examples_per_s=progress.seen / progress.train_time,
                 framework=f"torch {torch.__version__}", protocol_steps=c.train.num_steps)
    write_results(out_dir, {task: progress.final}, final_step=steps, best={task: progress.best},
                  best_step=progress.best_step, extra=extra)
    os.remove(os.path.join(out_dir, CHECKPOINT))  # results.json now stands for the finished run
    return {task: progress.final[metric]}


def train_step(model, opt, schedule, iterator, c, progress: Progress) -> None:
    t0 = time.perf_counter()
    raw = next(iterator)
    _, loss = model(to_torch(raw), keep=kept(raw))
    loss.backward()
    if c.optim.clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.clip_norm)
    opt.step()
    schedule.step()
    opt.zero_grad(set_to_none=True)
    progress.train_time += time.perf_counter() - t0
    progress.seen += int((np.asarray(raw["weight"]) > 0).sum())
    progress.step += 1
    progress.last_loss = loss.item()


def finished(out_dir: str) -> bool:
    """A full protocol run already wrote its results here (rerunning the script
    resumes the list)."""
    try:
        with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError):
        return False
    return results.get("final_step") == results.get("protocol_steps")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True,
                        help="the comparison's DIR (writes DIR/reference/<task>)")
    parser.add_argument("--tasks", default=",".join(protocol.TASKS),
                        help="comma-separated, of the protocol's tasks and "
                             f"{','.join(protocol.EXTRA_TASKS)}")
    parser.add_argument("--max_steps", type=int, default=0,
                        help="stop after N steps (0 = the protocol's)")
    parser.add_argument("--tiny_data", action="store_true",
                        help="64 train / 32 eval examples a task")
    args = parser.parse_args()
    stop = StopFlag()
    signal.signal(signal.SIGTERM, lambda *_: setattr(stop, "requested", True))
    for task in (t for t in args.tasks.split(",") if t):
        if task not in protocol.TASKS + protocol.EXTRA_TASKS:
            sys.exit(f"error: unknown task {task!r}; use a comma-separated subset of "
                     f"{','.join(protocol.TASKS + protocol.EXTRA_TASKS)}")
        out = os.path.join(args.workdir, "reference", task)
        if finished(out) and not (args.max_steps or args.tiny_data):
            print(task, "results.json exists (a finished protocol run), skipped ->", out)
            continue
        result = train_task(task, out, args.max_steps, args.tiny_data, stop=stop)
        if result is None:
            print(f"stopped (SIGTERM) with a checkpoint in {out}; rerun the same command to "
                  "resume", file=sys.stderr)
            sys.exit(STOPPED_EXIT_CODE)  # mtl_jax's own: schedulers requeue on it
        print(task, result, "->", out)


if __name__ == "__main__":
    main()
