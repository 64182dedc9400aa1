"""The PyTorch / Hugging Face baseline of the training-step benchmark.

The same hard-sharing multi-task BERT as mtl_jax's: one shared ``BertModel``, a sequence
classification head on [CLS] and a token classification head, task-homogeneous batches alternating
between the two tasks, AdamW. Timed after warm-up in the calling process.
"""
from __future__ import annotations

import time

import numpy as np


def _model(shape: dict, num_classes: int, num_tags: int):
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        intermediate_size=shape["intermediate_size"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")

    class MultiTaskBert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # With the pooler (unused by both heads), as mtl_jax's BERT keeps it: same parameters.
            self.encoder = BertModel(config)
            self.cls_head = torch.nn.Linear(config.hidden_size, num_classes)
            self.tag_head = torch.nn.Linear(config.hidden_size, num_tags)

        def forward(self, input_ids, attention_mask, task: int):
            hidden = self.encoder(input_ids=input_ids,
                                  attention_mask=attention_mask).last_hidden_state
            if task == 0:
                return self.cls_head(hidden[:, 0])
            return self.tag_head(hidden)

    return MultiTaskBert()


def param_count(shape: dict, num_classes: int, num_tags: int) -> int:
    return sum(p.numel() for p in _model(shape, num_classes, num_tags).parameters())


def bench_torch(shape: dict, batch: int, seq: int, *, steps: int = 10, warmup: int = 3,
                compile: bool = False, device: str = "cpu", bf16: bool = False,
                num_classes: int = 2, num_tags: int = 9, seed: int = 0) -> dict:
    """Examples/s, compile time and peak memory of a PyTorch multi-task train step."""
    import torch

    torch.manual_seed(seed)
    model = _model(shape, num_classes, num_tags).to(device)
    fused = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, fused=fused)
    rng = np.random.default_rng(seed)
    ids = torch.tensor(rng.integers(1000, shape["vocab_size"], (batch, seq)), device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    labels = [torch.tensor(rng.integers(0, num_classes, (batch,)), device=device),
              torch.tensor(rng.integers(0, num_tags, (batch, seq)), device=device)]
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(task: int):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, mask, task)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]).float(), labels[task].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    run = torch.compile(step) if compile else step
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(warmup):
        run(i % 2).item()
    sync()
    compile_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = run(i % 2)
    loss.item()
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dict(framework="torch_compile" if compile else "torch_eager",
                examples_s=batch * steps / elapsed, step_s=elapsed / steps,
                compile_s=compile_s, peak_bytes=peak, torch_version=torch.__version__)
