"""Where an mtl_jax training step spends its time on this backend: a jax.profiler trace of the
train_step.py model, summed by op kind and by output shape (dense matmuls, attention, the rest).

  python bench/profile_step.py [--shape=minilm-l6-h384] [--batch=32] [--seq=128] [--steps=2]
                               [--attention=xla|bnth] [--dropout=0.0]

Times are per step and summed over the XLA threads that ran the ops ("thread time"); compare the
total with the wall time to see how busy the cores were. Nothing is written to the results files.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import train_step as bench

OP_THREADS = "tf_XLAEigen"  # XLA:CPU's op threads in the trace


def op_times(trace_dir: str, steps: int) -> collections.Counter:
    """{HLO op name: thread ms per step} from the trace's XLA op threads."""
    import jax

    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[-1]
    totals = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith(OP_THREADS):
                continue
            for event in line.events:
                if "ThunkExecutor" not in event.name and not event.name.startswith("end:"):
                    totals[event.name] += event.duration_ns / 1e6 / steps
    return totals


def category(name: str, hlo: str, seq: int) -> str:
    """'matmul f32[...]', 'attention' (an op with a [.., seq, seq] result) or 'other <kind>'."""
    match = re.search(r"^\s*%?" + re.escape(name) + r" = (\S+)", hlo, re.M)
    shape = match.group(1).split("{")[0] if match else "?"
    if f"{seq},{seq}]" in shape:
        return "attention scores/probs " + shape
    if name.startswith(("ynn_fusion", "dot")):
        return "matmul " + shape
    return "other " + re.sub(r"\.\d+$", "", name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(bench.SHAPES), default="minilm-l6-h384")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--attention", default="xla", help="model.attention_impl")
    parser.add_argument("--dropout", type=float, default=0.0, help="model.dropout")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    shape = bench.SHAPES[args.shape]
    model, state, strategy = bench.jax_setup(shape, "float32", args.attention,
                                             dropout=args.dropout)
    train_step = strategy.train_step
    batches = [strategy.place_batch(b)
               for b in bench.jax_batches(args.batch, args.seq, shape["vocab_size"])]
    rng = strategy.place_rng(jax.random.PRNGKey(1))
    for i in range(3):
        state, metrics = train_step(state, batches[i % 2], rng)
    jax.block_until_ready(metrics)
    hlo = train_step.lower(state, batches[0], rng).compile().as_text()
    trace_dir = tempfile.mkdtemp(prefix="mtl_jax_trace_")
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, metrics = train_step(state, batches[i % 2], rng)
    jax.block_until_ready(metrics)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    jax.profiler.stop_trace()
    per_op = op_times(trace_dir, args.steps)
    by_category = collections.Counter()
    for name, ms in per_op.items():
        by_category[category(name, hlo, args.seq)] += ms
    print(f"wall {wall_ms:.0f} ms/step (traced); "
          f"op thread time {sum(per_op.values()):.0f} ms/step; {os.cpu_count()} CPUs")
    for label, ms in by_category.most_common(args.top):
        print(f"{ms:8.1f} ms  {label}")


if __name__ == "__main__":
    sys.exit(main())
