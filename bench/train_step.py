"""Training-step benchmark: mtl_jax vs PyTorch on the same hard-sharing multi-task BERT, one process.

Model: a shared BERT encoder, a sequence-classification head ([CLS], 2 classes) and a token-
classification head (9 tags); task-homogeneous batches alternating between the two tasks; AdamW
(no clipping, no dropout, on both sides). mtl_jax: build_model + create_train_state +
build_train_step; PyTorch: bench/torch_baseline.py. Timed after warm-up; throughput, tokens/s,
MFU (where the device peak is known; FLOPs/token = 6N + 12 L d s, N = non-embedding parameters,
mtl_jax/training/flops.py), peak memory, compile time and the mtl_jax / PyTorch ratios.

  python bench/train_step.py --preset=cpu [--steps=5]   # MiniLM-L6-H384 shape, batch 32, seq 128
                                                        # and 64, float32, vs PyTorch eager
  python bench/train_step.py --preset=gpu               # BERT-base shape, batch 32 and 256,
                                                        # seq 128, bf16, cuDNN attention, vs eager
                                                        # and torch.compile
  python bench/train_step.py --table                    # the markdown table of the results file

Each measurement is appended to bench/results/train_step.jsonl (one JSON object a line).
"""  # noqa: E501 (line 1 is main()'s argparse description, kept word for word)
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = REPO / "bench" / "results" / "train_step.jsonl"
SHAPES = {
    "minilm-l6-h384": dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                           intermediate_size=1536),
    "bert-base": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                      intermediate_size=3072),
}
# preset -> (model shape, [(batch, seq)], dtype, attention, device, torch variants)
PRESETS = {
    "cpu": ("minilm-l6-h384", [(32, 128), (32, 64)], "float32", "xla", "cpu", ("eager",)),
    "gpu": ("bert-base", [(32, 128), (256, 128)], "bfloat16", "cudnn", "cuda",
            ("eager", "compile")),
}
NUM_CLASSES, NUM_TAGS = 2, 9


def jax_setup(shape: dict, dtype: str, attention: str, model_dir: str = "",
              dropout: float = 0.0):
    """(model, state, train_step) of mtl_jax for the benchmark model (``dropout``: the
    encoder's hidden and attention dropout; 0 as the PyTorch baseline).

    ``model_dir``: a Hugging Face directory whose tokenizer gives the vocabulary (default: the
    embedded MiniLM); only its vocabulary is used, the encoder is random at ``shape``.
    """
    import jax

    from configs.base import get_base_config
    from mtl_jax.models.multitask import build_model
    from mtl_jax.tasks.spec import TaskSpec
    from mtl_jax.training import parallel, sharding
    from mtl_jax.training.state import abstract_train_state

    c = get_base_config()
    c.model.random_init = True
    c.model.name_or_path = model_dir or c.model.name_or_path
    c.model.family = "bert"
    c.model.size.update({k: v for k, v in shape.items() if k != "vocab_size"})
    c.model.dtype, c.model.attention_impl, c.model.dropout = dtype, attention, dropout
    c.heads.dropout = 0.0
    c.optim.clip_norm = 0.0  # torch_baseline does not clip
    c.data.batch_mode = "homogeneous"
    specs = [TaskSpec("cls", "sequence_classification", NUM_CLASSES, 0, ("neg", "pos")),
             TaskSpec("tags", "token_classification", NUM_TAGS, 1,
                      tuple(f"T{i}" for i in range(NUM_TAGS)))]
    model = build_model(c, specs)
    assert model.encoder_config.vocab_size == shape["vocab_size"], model.encoder_config.vocab_size
    params = model.init_params(jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    strategy = parallel.build(model, c, mesh, abstract_train_state(model, params, c, 10_000))
    return model, strategy.init_state(params), strategy


def jax_batches(batch: int, seq: int, vocab: int) -> list[dict]:
    """Two task-homogeneous batches (task 0: a label per example; task 1: a tag per token)."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, vocab, (batch, seq)).astype(np.int32)
    common = dict(input_ids=ids, attention_mask=np.ones_like(ids),
                  token_type_ids=np.zeros_like(ids), weight=np.ones(batch, np.float32))
    cls = dict(common, task_id=np.zeros(batch, np.int32),
               label=rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
               tag_ids=np.full((batch, seq), -100, np.int32))
    tags = dict(common, task_id=np.ones(batch, np.int32), label=np.full(batch, -100, np.int32),
                tag_ids=rng.integers(0, NUM_TAGS, (batch, seq)).astype(np.int32))
    return [cls, tags]


def bench_jax(setup, batch: int, seq: int, vocab: int, steps: int, warmup: int) -> dict:
    import jax

    model, state, strategy = setup
    train_step = strategy.train_step
    batches = [strategy.place_batch(b) for b in jax_batches(batch, seq, vocab)]
    rng = strategy.place_rng(jax.random.PRNGKey(1))
    t0 = time.perf_counter()
    for i in range(max(warmup, 2)):  # the first call compiles; both tasks share one shape
        state, metrics = train_step(state, batches[i % 2], rng)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = train_step(state, batches[i % 2], rng)
    jax.block_until_ready((state.params, metrics))
    elapsed = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    return dict(framework="mtl_jax", examples_s=batch * steps / elapsed, step_s=elapsed / steps,
                compile_s=compile_s, peak_bytes=stats.get("peak_bytes_in_use"),
                loss=float(metrics["train/loss"]), jax_version=jax.__version__), state


def param_count(tree) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(tree))


def measure(preset: str, steps: int, warmup: int, model_dir: str = "", attention: str = "",
            dropout: float = 0.0) -> list[dict]:
    """``attention``: model.attention_impl ("" = the preset's); ``dropout`` > 0 trains mtl_jax
    with dropout (the PyTorch side has none: compare such rows with each other only)."""
    import jax

    import torch_baseline
    from mtl_jax.training import flops

    shape_name, points, dtype, preset_attention, device, torch_variants = PRESETS[preset]
    attention = attention or preset_attention
    shape = SHAPES[shape_name]
    setup = jax_setup(shape, dtype, attention, model_dir, dropout)
    params = param_count(setup[1].params)
    torch_params = torch_baseline.param_count(shape, NUM_CLASSES, NUM_TAGS)
    if params != torch_params:  # both sides must train the same model
        raise SystemExit(f"error: mtl_jax model has {params:,} parameters, the PyTorch one "
                         f"{torch_params:,}; the benchmark would compare different models")
    labels = setup[0].param_labels(setup[1].params)
    n = flops.non_embedding_params(setup[1].params, labels)
    peak = flops.device_peak_flops()
    common = dict(device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
                  preset=preset, model=shape_name, dtype=dtype, attention=attention,
                  dropout=dropout,
                  non_embedding_params=n, params=params,
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  host=platform.node(), cpu_count=os.cpu_count(), steps=steps, warmup=warmup)
    rows = []
    for batch, seq in points:
        per_example = flops.train_flops_per_example(n, shape["num_layers"], shape["hidden_size"],
                                                    seq)
        torch_rows = {}
        for variant in torch_variants:
            r = torch_baseline.bench_torch(shape, batch, seq, steps=steps, warmup=warmup,
                                           compile=variant == "compile", device=device,
                                           bf16=dtype == "bfloat16", num_classes=NUM_CLASSES,
                                           num_tags=NUM_TAGS)
            torch_rows[variant] = r
        ours, state = bench_jax(setup, batch, seq, shape["vocab_size"], steps, warmup)
        setup = (setup[0], state, setup[2])  # the old state was donated
        for r in [*torch_rows.values(), ours]:
            r.update(common, batch=batch, seq=seq, tokens_s=r["examples_s"] * seq,
                     tflops_s=r["examples_s"] * per_example / 1e12,
                     mfu=flops.mfu(r["examples_s"], per_example, peak, 1))
            r["versions"] = {k: r.pop(k) for k in ("jax_version", "torch_version") if k in r}
        for variant, r in torch_rows.items():
            ours[f"ratio_vs_torch_{variant}"] = ours["examples_s"] / r["examples_s"]
        rows += [*torch_rows.values(), ours]
        for r in [*torch_rows.values(), ours]:
            print(json.dumps(r))
    return rows


def table(path: pathlib.Path = RESULTS, last: int = 0) -> str:
    """A markdown table of the results file (newest last; ``last`` > 0 keeps that many rows)."""
    rows = ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.exists() else [])
    rows = rows[-last:] if last else rows
    head = ("| date | device | framework | model | batch | seq | dtype | examples/s | tokens/s "
            "| MFU | compile s | peak MiB | mtl_jax / torch eager | mtl_jax / torch.compile |")
    lines = [head, "|" + " --- |" * 4 + " ---: |" * 10]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2 ** 20
        lines.append(f"| {r['date'][:16]} | {r['device']} | {r['framework']} | {r['model']} | "
                     f"{r['batch']} | {r['seq']} | {r['dtype']} | {r['examples_s']:.1f} | "
                     f"{r['tokens_s']:,.0f} | {fmt(r.get('mfu'), '.1%')} | "
                     f"{fmt(r.get('compile_s'), '.1f')} | {fmt(peak, ',.0f')} | "
                     f"{fmt(r.get('ratio_vs_torch_eager'), '.2f')} | "
                     f"{fmt(r.get('ratio_vs_torch_compile'), '.2f')} |")
    return "\n".join(lines)


def update_readme(readme: pathlib.Path = REPO / "bench" / "README.md") -> None:
    """Rewrites the table between the README's train_step markers from the results file."""
    import readme_table

    readme_table.update(readme, "train_step", table())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--note", default="",
                        help="free text stored with each row (e.g. 'shared CPU')")
    parser.add_argument("--model_dir", default="",
                        help="HF directory whose tokenizer sets the vocabulary "
                        "(default: the embedded MiniLM; a lent GPU machine lacks that package)")
    parser.add_argument("--config.model.attention_impl", dest="attention", default="",
                        help="mtl_jax attention implementation (default: the preset's), e.g. "
                        "bnth; stored in each row's 'attention'")
    parser.add_argument("--config.model.dropout", dest="dropout", type=float, default=0.0,
                        help="mtl_jax dropout (hidden and attention); the PyTorch side keeps 0")
    parser.add_argument("--table", action="store_true", help="print the results table and exit")
    parser.add_argument("--update_readme", action="store_true",
                        help="also rewrite bench/README.md's table")
    args = parser.parse_args()
    if not args.table:
        if args.preset == "cpu":
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax

        if args.preset == "gpu" and jax.devices()[0].platform != "gpu":
            raise SystemExit("error: --preset=gpu needs a GPU (jax sees only "
                             f"{jax.devices()[0].platform}); use --preset=cpu")
        rows = measure(args.preset, args.steps, args.warmup, args.model_dir, args.attention,
                       args.dropout)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, note=args.note)) + "\n")
    print(table())
    if args.update_readme:
        update_readme()


if __name__ == "__main__":
    main()
