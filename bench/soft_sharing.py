"""Soft vs hard sharing: cost of one forward+backward step per example (target: soft <= 1.2x hard).

Both models see the same task-homogeneous batches; the step is jax.value_and_grad of the summed
task losses (plus the soft penalty for soft sharing). Soft sharing runs one task's encoder chosen
by a dynamic index into the [T, ...] stack, so the extra cost is the gradient scatter into the
stack and the O(T * params) penalty. Prints per-example step times and their ratio, measured in
the same run.

  python bench/soft_sharing.py                       # random BERT, hidden 384, 6 layers
                                                     # (MiniLM size)
  python bench/soft_sharing.py --layers 2 --hidden 128 --steps 5   # quick
"""
import argparse
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.base import get_base_config  # noqa: E402
from mtl_jax.models import multitask  # noqa: E402
from mtl_jax.models.encoder_config import EncoderConfig  # noqa: E402
from mtl_jax.tasks.spec import TaskSpec  # noqa: E402


def build(args, mode):
    c = get_base_config()
    c.model.random_init = True
    c.sharing.mode = mode
    c.data.batch_mode = "homogeneous"
    c.model.dropout = 0.0
    specs = [TaskSpec(f"task{t}", "sequence_classification", 2, t) for t in range(args.tasks)]
    enc = EncoderConfig(family="bert", vocab_size=args.vocab, hidden_size=args.hidden,
                        num_layers=args.layers, num_heads=args.hidden // 64 or 1,
                        head_dim=min(64, args.hidden), intermediate_size=4 * args.hidden,
                        **multitask.encoder_overrides(c, len(specs)))
    return multitask.MultiTaskModel(c, specs, enc)


def batches(args, n):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield {"input_ids": rng.integers(1, args.vocab, (args.batch, args.length)).astype(np.int32),
               "attention_mask": np.ones((args.batch, args.length), np.int32),
               "token_type_ids": np.zeros((args.batch, args.length), np.int32),
               "task_id": np.full((args.batch,), i % args.tasks, np.int32),
               "weight": np.ones((args.batch,), np.float32),
               "label": rng.integers(0, 2, args.batch).astype(np.int32)}


def time_step(model, args):
    params = model.init_params(jax.random.key(0))

    def total(p, batch, rng):
        losses, _, aux = model.task_losses(p, batch, rng)
        return losses.sum() + aux["soft_penalty"]

    step = jax.jit(jax.value_and_grad(total))
    times = []
    for i, batch in enumerate(batches(args, args.warmup + args.steps)):
        start = time.perf_counter()
        jax.block_until_ready(step(params, batch, jax.random.key(i)))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) / args.batch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--batch", type=int, default=32)  # configs' train.batch_size
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    print(f"backend {jax.default_backend()}, {args.tasks} tasks, hidden {args.hidden}, "
          f"{args.layers} layers, vocab {args.vocab}, batch {args.batch}x{args.length}")
    hard = time_step(build(args, "hard"), args)
    soft = time_step(build(args, "soft"), args)
    print(f"hard sharing: {hard * 1e3:.2f} ms/example")
    print(f"soft sharing: {soft * 1e3:.2f} ms/example")
    ratio = soft / hard
    print(f"soft/hard step cost per example: {ratio:.3f}x (target <= 1.2x: "
          f"{'OK' if ratio <= 1.2 else 'OVER'})")


if __name__ == "__main__":
    main()
