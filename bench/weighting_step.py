"""Train-step time of every weighting / surgery method relative to equal weighting.

Same stacked batch ([T, B//T, L]) for every method (loss weightings see it flattened); a
MiniLM-shaped random MultiTaskModel (BERT, hidden 384, 6 layers, 12 heads, vocab 30522) on CPU.
Also the 8-device (fake CPU devices, data parallel) vs 1-device overhead of the equal step.
Target: pcgrad and gradnorm <= 1.25x equal.

    python bench/weighting_step.py [--batch 16] [--length 32] [--rounds 5]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs.base import get_base_config  # noqa: E402
from mtl_jax.models import multitask  # noqa: E402
from mtl_jax.tasks.spec import TaskSpec  # noqa: E402
from mtl_jax.training import parallel, sharding, state as state_lib  # noqa: E402
from mtl_jax.training.weighting import WEIGHTINGS  # noqa: E402

SPECS = [TaskSpec("a", "sequence_classification", 2, 0),
         TaskSpec("b", "sequence_classification", 3, 1)]


def make_config(name, devices):
    c = get_base_config()
    c.model.random_init, c.model.family = True, "bert"
    c.model.size.update(dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536))
    c.weighting.name = name
    c.data.batch_mode = "stacked"
    c.parallel.mesh.update(dict(data=devices, fsdp=1, tensor=1))
    return c


def stacked_batch(batch, length, seed=0):
    r = np.random.RandomState(seed)
    T, b = len(SPECS), batch // len(SPECS)
    ids = r.randint(1000, 30000, (T, b, length)).astype(np.int32)
    zeros = np.zeros((T, b), np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
            "task_id": np.repeat(np.arange(T, dtype=np.int32)[:, None], b, 1),
            "weight": np.ones((T, b), np.float32),
            "label": r.randint(0, 2, (T, b)).astype(np.int32),
            "target": np.zeros((T, b), np.float32), "tag_ids": np.full_like(ids, -100),
            "start_positions": zeros, "end_positions": zeros}


def build(name, devices, batch):
    """-> a function running one step on its own state (compiled here)."""
    c = make_config(name, devices)
    model = multitask.build_model(c, SPECS)
    mesh = sharding.make_mesh(c, jax.devices()[:devices])
    params = model.init_params(jax.random.PRNGKey(0))
    strategy = parallel.build(model, c, mesh,
                              state_lib.abstract_train_state(model, params, c, 1000))
    box = [strategy.init_state(params)]
    train_step = strategy.train_step
    batch = strategy.place_batch(batch)
    rng = strategy.place_rng(jax.random.PRNGKey(1))

    def run():
        box[0], m = train_step(box[0], batch, rng)
        jax.block_until_ready(m)
    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--methods", default=",".join(
        ["equal"] + [n for n in WEIGHTINGS.names() if n != "equal"]))
    args = p.parse_args()
    batch = stacked_batch(args.batch, args.length)
    runs = {(n, 1): build(n, 1, batch) for n in args.methods.split(",")}
    runs[("equal", 8)] = build("equal", 8, batch)
    # Rounds interleave the methods so that load from other processes hits all of them alike;
    # the minimum over rounds is the least-disturbed step time.
    best = {k: float("inf") for k in runs}
    for _ in range(args.rounds):
        for k, (run, _) in runs.items():
            t0 = time.perf_counter()
            run()
            best[k] = min(best[k], time.perf_counter() - t0)
    base = best[("equal", 1)]
    print(f"MultiTaskModel (random MiniLM shape), T={len(SPECS)}, stacked batch {args.batch} x "
          f"{args.length}, {jax.devices()[0].platform}, min over {args.rounds} interleaved rounds")
    for (name, devices), t in best.items():
        label = name if devices == 1 else f"{name}, {devices} devices (data parallel)"
        print(f"  {label:36s} {t * 1e3:8.1f} ms  {t / base:5.2f}x equal (1 device)   "
              f"compile {runs[(name, devices)][1]:.0f}s")


if __name__ == "__main__":
    main()
