"""Compile time of a 12-layer BERT-base-shaped encoder with and without nn.scan over layers.

Lowers and compiles (never runs) the forward and a parameter gradient; parameters are abstract
(ShapeDtypeStruct), so no weights are allocated. Prints seconds and the scan/loop ratio.

    python bench/compile_scan.py [--layers 12] [--hidden 768] [--batch 8] [--length 128]
"""
import argparse
import time

import jax
import jax.numpy as jnp

from mtl_jax.checkpoints.hf import random_encoder_config
from mtl_jax.models.encoder import build_encoder, init_encoder_params


def compile_seconds(fn, *args) -> float:
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def measure(scan_layers: bool, args) -> dict:
    cfg = random_encoder_config("bert", 30522, hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                                scan_layers=scan_layers)
    encoder = build_encoder(cfg)
    params = jax.eval_shape(lambda: init_encoder_params(encoder, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32)

    def forward(p, ids):
        return encoder.apply({"params": p}, ids, jnp.ones_like(ids))

    def loss(p, ids):
        return jnp.mean(forward(p, ids) ** 2)

    return {"forward": compile_seconds(forward, params, ids),
            "grad": compile_seconds(jax.grad(loss), params, ids)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    print(f"backend={jax.default_backend()} layers={args.layers} hidden={args.hidden} "
          f"batch={args.batch} length={args.length}")
    loop, scan = measure(False, args), measure(True, args)
    for what in ("forward", "grad"):
        print(f"{what:8s} compile: loop {loop[what]:7.2f}s  scan {scan[what]:7.2f}s  "
              f"scan/loop {scan[what] / loop[what]:.2f}x")


if __name__ == "__main__":
    main()
