"""Real-data training throughput: HF PyTorch (dynamic padding) vs mtl_jax buckets vs packing.

The comparison protocol's task mix (configs/compare.py: SST-2 10k + CoLA + RTE + CoNLL-2003 from
../shared/data, max length 128, batch 32, proportional sampling, task-homogeneous batches, MiniLM
shape, AdamW, clipping at 1.0, the checkpoint's dropout), N training steps of each of, in one
process run:

  torch_dynamic_padding  Hugging Face ``BertModel`` + one linear head per task, each batch padded
                         to its longest example (what ``DataCollatorWithPadding`` does)
  mtl_jax_buckets        the mtl_jax train step, each batch padded to a bucket (32, 64, 128)
  mtl_jax_packing        the same with ``data.packing=true`` (examples packed into rows)

All three train on the very same examples in the same order: the PyTorch batches are mtl_jax's
unpacked batches with their padding cut off and re-padded to the longest example, and a packed
batch is built from the unpacked one (``train.batch_size`` counts examples under packing too).
Every framework first runs the N steps once untimed (so every batch shape has compiled: mtl_jax
compiles one step per shape), then the same N steps again, timed; host-side batching (re-padding,
packing) is inside the timed loop. Reported: examples/s, non-pad tokens/s, padding fraction (the
share of the tokens the encoder ran on that are padding) and, on mtl_jax rows, ``ratio_vs_torch``
in examples/s. Rows are appended to bench/results/real_data.jsonl.

  python bench/real_data.py [--steps=40] [--note=...] [--config.KEY=VALUE ...]   # CPU;
                                                            # overrides: mtl_jax's side only
  python bench/real_data.py --table [--update_readme]       # the table of the results file
  python bench/real_data.py --data_dir=.data/shared_data --model_dir=.data/minilm --random_init
                                                            # a lent GPU (bench/device_run.sh)
"""
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
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU

RESULTS = REPO / "bench" / "results" / "real_data.jsonl"
FRAMEWORKS = ("torch_dynamic_padding", "mtl_jax_buckets", "mtl_jax_packing")


# --- the shared setup -------------------------------------------------------------------------

def protocol_config(data_dir: str, model_dir: str, random_init: bool, packing: bool,
                    overrides: dict):
    """configs/compare.py's config (every task), optionally on another data folder / model, with
    ``overrides`` ({"model.attention_impl": "bnth", ...}: mtl_jax's side only)."""
    from configs import compare
    from mtl_jax import cli
    from mtl_jax.tasks import presets

    c = compare.get_config()
    if data_dir:
        for name in list(c.tasks):
            c.tasks[name] = presets.local_task(name, data_dir, max_length=128,
                                               max_train_examples=compare.MAX_TRAIN.get(name, 0))
    if model_dir:
        c.model.name_or_path = model_dir
    c.model.random_init = random_init
    c.data.packing = packing
    for key, text in overrides.items():
        parent, _, leaf = key.rpartition(".")
        cli.config_value(c, parent)[leaf] = cli.parse_value(cli.config_value(c, key), text, key)
    return c


def build(config):
    from mtl_jax.training import runner

    run = runner.build_run(config, splits=("train",))
    return run, run.data.train_iterator(row_shards=run.row_shards)


def real_rows(batch) -> "np.ndarray":  # noqa: F821
    return batch["weight"] > 0


def count_tokens(batch: dict) -> tuple[int, int, int]:
    """(examples, non-pad tokens, tokens the encoder runs on) of an mtl_jax host batch."""
    from mtl_jax.data import packing

    real = real_rows(batch)
    nonpad = int(batch["attention_mask"][real].sum())
    rows = batch[packing.PACKED_KEYS[0]] if packing.PACKED_KEYS[0] in batch else batch["input_ids"]
    return int(real.sum()), nonpad, int(rows.size)


# --- mtl_jax ----------------------------------------------------------------------------------

def bench_mtl_jax(config, steps: int) -> dict:
    """N steps untimed (compiles every shape), the same N steps again timed."""
    import jax

    run, it = build(config)
    state, train_step = run.init_state(), run.train_step()
    rng = run.strategy.place_rng(jax.random.PRNGKey(0))
    start = it.get_state()

    def one_pass():
        nonlocal state
        examples = nonpad = tokens = 0
        metrics = None
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = next(it)
            state, metrics = train_step(state, run.batch(batch), rng)
            e, n, t = count_tokens(batch)
            examples, nonpad, tokens = examples + e, nonpad + n, tokens + t
        jax.block_until_ready((state.params, metrics))
        return time.perf_counter() - t0, examples, nonpad, tokens, float(metrics["train/loss"])

    warmup_s = one_pass()[0]
    it.set_state(start)
    elapsed, examples, nonpad, tokens, loss = one_pass()
    return dict(examples_s=examples / elapsed, nonpad_tokens_s=nonpad / elapsed,
                padding_fraction=1 - nonpad / tokens, step_s=elapsed / steps,
                warmup_s=warmup_s, examples=examples, loss=loss,
                device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
                versions=dict(jax=jax.__version__))


def host_batches(config, steps: int) -> tuple[list[dict], list]:
    """The first ``steps`` unpacked batches of the protocol's iterator, and the task specs."""
    run, it = build(config)
    return [next(it) for _ in range(steps)], run.model.specs


# --- Hugging Face PyTorch ----------------------------------------------------------------------

def dynamic_padding(batch: dict, spec, device: str) -> dict:
    """An mtl_jax batch as ``DataCollatorWithPadding`` gives it: real examples, padded to the
    longest of them."""
    import torch

    real = real_rows(batch)
    length = int(batch["attention_mask"][real].sum(1).max())
    take = lambda key: torch.from_numpy(batch[key][real][:, :length]).long().to(device)  # noqa
    out = dict(input_ids=take("input_ids"), attention_mask=take("attention_mask"),
               token_type_ids=take("token_type_ids"))
    if spec.type == "token_classification":
        out["labels"] = take("tag_ids")
    elif spec.type == "sequence_classification":
        out["labels"] = torch.from_numpy(batch["label"][real]).long().to(device)
    else:
        raise SystemExit(f"error: bench/real_data.py's PyTorch side trains sequence and token "
                         f"classification; task {spec.name} is {spec.type}")
    return out


def torch_model(config, specs, random_init: bool, device: str):
    import torch
    from transformers import BertConfig, BertModel

    from mtl_jax.checkpoints.hf import resolve_model_path

    path = str(resolve_model_path(config.model.name_or_path))
    if random_init:  # the shape mtl_jax builds: the checkpoint's config, model.size on top
        bert = BertConfig.from_pretrained(path, attn_implementation="sdpa")
        names = dict(hidden_size="hidden_size", num_layers="num_hidden_layers",
                     num_heads="num_attention_heads", intermediate_size="intermediate_size")
        for ours, theirs in names.items():
            if config.model.size[ours]:
                setattr(bert, theirs, config.model.size[ours])
        encoder = BertModel(bert, add_pooling_layer=True)
    else:
        encoder = BertModel.from_pretrained(path, attn_implementation="sdpa")
    hidden = encoder.config.hidden_size

    class MultiTaskBert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.dropout = torch.nn.Dropout(config.heads.dropout)
            self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, s.num_labels) for s in specs)

        def forward(self, task: int, input_ids, attention_mask, token_type_ids):
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            if specs[task].type == "sequence_classification":
                out = out[:, 0]  # heads.pooling=cls, as configs/compare.py
            return self.heads[task](self.dropout(out))

    return MultiTaskBert().to(device)


def bench_torch(config, batches: list[dict], specs, random_init: bool, device: str) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    model = torch_model(config, specs, random_init, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.optim.lr,
                            weight_decay=config.optim.weight_decay, fused=device == "cuda")
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def one_pass():
        examples = nonpad = tokens = 0
        t0 = time.perf_counter()
        for batch in batches:
            task = int(batch["task_id"][real_rows(batch)][0])
            inputs = dynamic_padding(batch, specs[task], device)
            labels = inputs.pop("labels")
            logits = model(task, **inputs)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            examples += labels.shape[0]
            nonpad += int(inputs["attention_mask"].sum())
            tokens += inputs["input_ids"].numel()
        last = loss.item()
        sync()
        return time.perf_counter() - t0, examples, nonpad, tokens, last

    warmup_s = one_pass()[0]
    elapsed, examples, nonpad, tokens, loss = one_pass()
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return dict(examples_s=examples / elapsed, nonpad_tokens_s=nonpad / elapsed,
                padding_fraction=1 - nonpad / tokens, step_s=elapsed / len(batches),
                warmup_s=warmup_s, examples=examples, loss=loss, device=name,
                platform=device,
                versions=dict(torch=torch.__version__, transformers=transformers.__version__))


# --- the run and its table --------------------------------------------------------------------

def measure(args, make=None) -> list[dict]:
    """The three frameworks' rows; ``make(packing) -> config`` (default: the protocol's)."""
    import jax

    device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
    make = make or (lambda packing: protocol_config(args.data_dir, args.model_dir,
                                                    args.random_init, packing, args.overrides))
    config = make(False)
    batches, specs = host_batches(config, args.steps)
    results = {"torch_dynamic_padding": bench_torch(config, batches, specs, args.random_init,
                                                    device)}
    print(json.dumps(results["torch_dynamic_padding"]), flush=True)
    for name, packing in (("mtl_jax_buckets", False), ("mtl_jax_packing", True)):
        results[name] = bench_mtl_jax(make(packing), args.steps)
        results[name]["ratio_vs_torch"] = (results[name]["examples_s"]
                                           / results["torch_dynamic_padding"]["examples_s"])
        print(json.dumps(results[name]), flush=True)
    common = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                  host=platform.node(), cpu_count=os.cpu_count(), steps=args.steps,
                  batch=config.train.batch_size, tasks="+".join(config.tasks),
                  batch_mode=config.data.batch_mode, attention=config.model.attention_impl,
                  packing_row_multiple=config.data.packing_row_multiple,
                  overrides=args.overrides,
                  random_init=args.random_init, note=args.note)
    return [dict(common, framework=name, **r) for name, r in results.items()]


def table(path: pathlib.Path = RESULTS, last: int = 0) -> str:
    rows = ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.exists() else [])
    rows = rows[-last:] if last else rows
    lines = ["| date | device | framework | attention | batch mode | steps | examples/s "
             "| non-pad tokens/s | padding | / torch |", "|" + " --- |" * 5 + " ---: |" * 5]
    for r in rows:
        ratio = r.get("ratio_vs_torch")
        lines.append(f"| {r['date'][:16]} | {r['device']} | {r['framework']} | "
                     f"{r['attention']} | {r['batch_mode']} | {r['steps']} | "
                     f"{r['examples_s']:.1f} | "
                     f"{r['nonpad_tokens_s']:,.0f} | {r['padding_fraction']:.1%} | "
                     f"{'-' if ratio is None else format(ratio, '.2f')} |")
    return "\n".join(lines)


def update_readme(readme: pathlib.Path = REPO / "bench" / "README.md") -> None:
    """Rewrites the table between the README's real_data markers from the results file."""
    import readme_table

    readme_table.update(readme, "real_data", table())


def config_overrides(parser, argv: list[str]) -> dict:
    """``--config.KEY=VALUE`` flags (mtl_jax's side: e.g. --config.model.attention_impl=bnth,
    --config.data.packing_row_multiple=4); anything else is an error."""
    out = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not key.startswith("--config.") or not eq:
            parser.error(f"unrecognized argument {arg!r}; mtl_jax settings go as "
                         f"--config.KEY=VALUE")
        out[key.removeprefix("--config.")] = value
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per framework")
    parser.add_argument("--data_dir", default="",
                        help="folder of sst2/cola/rte/conll2003 (default: configs/compare.py's "
                        "../shared/data)")
    parser.add_argument("--model_dir", default="",
                        help="HF BERT directory (default: the embedded MiniLM)")
    parser.add_argument("--random_init", action="store_true",
                        help="random encoder weights on both sides (a directory with config and "
                        "tokenizer only, as on a lent GPU)")
    parser.add_argument("--note", default="", help="free text stored with each row")
    parser.add_argument("--table", action="store_true", help="print the results table and exit")
    parser.add_argument("--update_readme", action="store_true",
                        help="also rewrite bench/README.md's table")
    args, rest = parser.parse_known_args()
    args.overrides = config_overrides(parser, rest)
    if not args.table:
        rows = measure(args)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(table())
    if args.update_readme:
        update_readme()


if __name__ == "__main__":
    main()
