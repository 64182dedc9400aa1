"""A tiny model with the MultiTaskModel contract, for the training tests (no encoder needed).

Token embeddings -> masked mean pool -> 2 tanh layers + LayerNorm ("encoder") -> one linear head
per classification task. Losses are per-task means of cross-entropy over the task's examples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mtl_jax.tasks.spec import TaskSpec


class ToyModel:
    def __init__(self, num_labels=(3, 2), vocab=64, hidden=32, penalty=0.0, dropout=0.0):
        self.specs = [TaskSpec(f"t{i}", "sequence_classification", n, i)
                      for i, n in enumerate(num_labels)]
        self.vocab, self.hidden, self.penalty, self.dropout = vocab, hidden, penalty, dropout

    def init_params(self, rng):
        ks = jax.random.split(rng, 4 + len(self.specs))
        d, n = self.hidden, lambda k, s: 0.3 * jax.random.normal(k, s, jnp.float32)
        enc = {f"layers_{i}": {"kernel": n(ks[1 + i], (d, d)), "bias": n(ks[3 + i], (d,)) * 0.1}
               for i in range(2)}
        enc["LayerNorm"] = {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}
        return {"embeddings": {"word_embeddings": n(ks[0], (self.vocab, d))},
                "encoder": enc,
                "heads": {s.name: {"kernel": n(ks[4 + s.index], (d, s.num_labels)),
                                   "bias": jnp.zeros((s.num_labels,))} for s in self.specs}}

    def _features(self, params, batch, rng, deterministic):
        x = params["embeddings"]["word_embeddings"][batch["input_ids"]]
        m = batch["attention_mask"][..., None].astype(x.dtype)
        h = (x * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0)
        for i in range(2):
            layer = params["encoder"][f"layers_{i}"]
            h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
            if not deterministic and self.dropout > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1 - self.dropout, h.shape)
                h = jnp.where(keep, h / (1 - self.dropout), 0.0)
        ln = params["encoder"]["LayerNorm"]
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]

    def apply(self, params, batch, rng=None, deterministic=True, homogeneous=None):
        h = self._features(params, batch, rng, deterministic)
        return {s.name: h @ params["heads"][s.name]["kernel"] + params["heads"][s.name]["bias"]
                for s in self.specs}

    def task_losses(self, params, batch, rng=None, deterministic=False, homogeneous=None):
        outs = self.apply(params, batch, rng, deterministic)
        losses, counts = [], []
        for s in self.specs:
            logits = outs[s.name]
            label = batch["label"]
            valid = (batch["task_id"] == s.index) & (label >= 0) & (batch["weight"] > 0)
            safe = jnp.clip(label, 0, s.num_labels - 1)
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe[:, None], -1)[:, 0]
            w = valid * batch["weight"]
            c = valid.sum().astype(jnp.float32)
            counts.append(c)
            losses.append(jnp.sum(nll * w) / jnp.maximum(c, 1.0))
        pen = self.penalty * jnp.sum(params["encoder"]["layers_0"]["kernel"] ** 2)
        return jnp.stack(losses), jnp.stack(counts), {"soft_penalty": pen}

    def param_labels(self, params):
        def label(path, _):
            top = path[0].key
            return f"heads/{path[1].key}" if top == "heads" else top
        return jax.tree_util.tree_map_with_path(label, params)

    def logical_specs(self, params):
        def spec(path, x):
            names = [k.key for k in path]
            if names[0] == "embeddings":
                return P("vocab", "embed")
            if names[0] == "heads":
                return P("embed", None) if x.ndim == 2 else P()
            if names[-1] == "kernel":
                return P("embed", "mlp")
            return P("embed")
        return jax.tree_util.tree_map_with_path(spec, params)


def make_batch(seed, batch_size=16, length=8, num_tasks=2, vocab=64, num_labels=(3, 2),
               mixed=True, stacked=False):
    """Random batch in the architecture's format (mixed tasks, or stacked [T, B//T, ...])."""
    r = np.random.RandomState(seed)
    if stacked:
        subs = [make_batch(seed * 100 + t, batch_size // num_tasks, length, num_tasks, vocab,
                           num_labels, mixed=False) for t in range(num_tasks)]
        for t, sub in enumerate(subs):
            sub["task_id"][:] = t
            sub["label"] = r.randint(0, num_labels[t], sub["label"].shape).astype(np.int32)
        return {k: np.stack([s[k] for s in subs]) for k in subs[0]}
    lengths = r.randint(2, length + 1, batch_size)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    task = r.randint(0, num_tasks, batch_size) if mixed else np.zeros(batch_size, np.int64)
    label = np.array([r.randint(0, num_labels[t]) for t in task])
    return {"input_ids": (r.randint(1, vocab, (batch_size, length)) * mask).astype(np.int32),
            "attention_mask": mask, "token_type_ids": np.zeros_like(mask),
            "task_id": task.astype(np.int32), "weight": np.ones(batch_size, np.float32),
            "label": label.astype(np.int32)}
