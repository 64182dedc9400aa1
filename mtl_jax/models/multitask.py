"""MultiTaskModel: a shared (or per-task) encoder, per-task PEFT, and one head per task.

Parameters::

  {"encoder": what the sharing strategy stores (sharing.py: hard, one encoder's params;
              soft, the same tree with every leaf [T, ...]),
   "heads":   {<task>: head params},
   ...        what the PEFT kind adds (peft_layers.PeftKind.init_params; prefix: "prefix")}

Every head runs on every example (heads are cheap next to the encoder), so one compiled step
serves any mix of tasks; ``task_losses`` keeps each task's own examples. Adapters and LoRA live
inside the encoder and are gathered per example by ``task_id``; prefixes are gathered by their
PEFT kind (``PeftKind.batch_prefix``). The model never tests a sharing mode's or a PEFT kind's
name: ``sharing.STRATEGIES`` and ``peft_layers.PEFT_KINDS`` entries own what differs.
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mtl_jax.checkpoints import hf
from mtl_jax.errors import UserError
from mtl_jax.models import choices as choices_lib
from mtl_jax.models import heads as heads_lib
from mtl_jax.models import param_groups
from mtl_jax.models import losses as losses_lib
from mtl_jax.models import packing as packing_lib
from mtl_jax.models import peft_layers
from mtl_jax.models import sharing as sharing_lib
from mtl_jax.models import summary as summary_lib
from mtl_jax.models.encoder import build_encoder
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.tasks.spec import TaskSpec
from mtl_jax.text.tokenizer import tokenizer_for

HOMOGENEOUS_BATCH_MODES = ("homogeneous", "stacked")  # stacked: each sub-batch holds one task


def encoder_overrides(config, num_tasks: int) -> dict:
    """EncoderConfig fields set by the run config (runtime switches, dropout, in-encoder PEFT)."""
    m = config.model
    out = dict(dtype=m.dtype, attention_impl=m.attention_impl, remat=m.remat,
               scan_layers=m.scan_layers)
    if m.dropout >= 0:
        out.update(hidden_dropout=m.dropout, attention_dropout=m.dropout)
    out.update(peft_layers.PEFT_KINDS.get(config.peft.kind).encoder_overrides(config.peft,
                                                                              num_tasks))
    return out


def _random_encoder_config(config, overrides) -> EncoderConfig:
    sizes = {k: v for k, v in config.model.size.items() if v}
    vocab_size = len(tokenizer_for(config))
    family = config.model.family
    if family == "auto":
        raise UserError("model.random_init needs model.family (bert, t5 or t5_v1_1), not auto")
    return hf.random_encoder_config(family, vocab_size=vocab_size, **sizes, **overrides)


def _pretrained_encoder_config(config, overrides) -> EncoderConfig:
    path = pathlib.Path(hf.resolve_model_path(config.model.name_or_path))
    hf_config = json.loads((path / "config.json").read_text())
    return hf.encoder_config_from_hf(hf_config, **overrides)


def _check_specs(specs: Sequence[TaskSpec]) -> list[TaskSpec]:
    specs = sorted(specs, key=lambda s: s.index)
    if not specs:
        raise UserError("the model needs at least one task; add one to config.tasks")
    if [s.index for s in specs] != list(range(len(specs))):
        raise UserError(f"task indices must be 0..T-1, got {[s.index for s in specs]}; "
                        "build TaskSpecs with consecutive indices")
    for s in specs:
        heads_lib.HEADS.get(s.type)
    return specs


class MultiTaskModel:
    """See the module docstring and docs/architecture.md for the contract."""

    def __init__(self, config, specs: Sequence[TaskSpec], encoder_config: EncoderConfig):
        self.config = config
        self.specs = _check_specs(specs)
        self.num_tasks = len(self.specs)
        self.sharing = config.sharing.mode
        self.sharing_strategy = sharing_lib.STRATEGIES.get(self.sharing)
        self.peft_kind = config.peft.kind
        self.peft_method = peft_layers.PEFT_KINDS.get(self.peft_kind)
        self.pooling = config.heads.pooling
        self.homogeneous = config.data.batch_mode in HOMOGENEOUS_BATCH_MODES
        self.encoder_config = encoder_config
        self.encoder = build_encoder(encoder_config)
        self.heads = {s.name: heads_lib.build_head(s.type, s.num_labels, config.heads.dropout)
                      for s in self.specs}
        heads_lib.POOLINGS.get(self.pooling)
        self._tokenizer = None

    # --- parameters -----------------------------------------------------------------------

    def _dummy_inputs(self):
        ids = jnp.zeros((1, 8), jnp.int32)
        return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=ids,
                    task_ids=jnp.zeros((1,), jnp.int32) if self.encoder_config.num_tasks else None)

    def init_encoder(self, rng, pretrained: bool):
        if not pretrained:
            init = jax.jit(lambda r: self.encoder.init(r, **self._dummy_inputs())["params"])
            return nn.unbox(init(rng))
        overrides = encoder_overrides(self.config, self.num_tasks)
        _, params = hf.load_encoder(self.config.model.name_or_path, dtype=overrides.pop("dtype"),
                                    rng=rng, **overrides)
        return nn.unbox(params)

    def init_params(self, rng, pretrained: bool | None = None):
        """All parameters; the encoder from the checkpoint unless model.random_init."""
        pretrained = not self.config.model.random_init if pretrained is None else pretrained
        enc_rng, head_rng, peft_rng = jax.random.split(rng, 3)
        encoder = self.init_encoder(enc_rng, pretrained)
        heads_lib.check_pooling(self.pooling, encoder)
        # fold_in, not a 4-way split: the keys above (and so every existing init) stay the same.
        encoder = self.sharing_strategy.init_encoder(jax.random.fold_in(enc_rng, 1), encoder,
                                                     self.num_tasks)
        hidden = self.encoder_config.hidden_size
        feats = heads_lib.Features(jnp.zeros((1, 2, hidden)), jnp.ones((1, 2), jnp.int32),
                                   jnp.zeros((1, hidden)), choices=jnp.zeros((1, 1, hidden)))
        head_rngs = jax.random.split(head_rng, self.num_tasks)
        params = {"encoder": encoder,
                  "heads": {s.name: self.heads[s.name].init(r, feats)["params"]
                            for s, r in zip(self.specs, head_rngs)}}
        params.update(self.peft_method.init_params(peft_rng, self.config.peft, self.num_tasks,
                                                   self.encoder_config))
        return params

    def abstract_params(self):
        """ShapeDtypeStructs of ``init_params`` without reading any checkpoint (for restores)."""
        return jax.eval_shape(functools.partial(self.init_params, pretrained=False),
                              jax.random.key(0))

    # --- forward --------------------------------------------------------------------------

    def _encode(self, encoder_params, batch, prefix, rng, deterministic):
        rngs = {} if deterministic else {"dropout": rng}
        inputs = packing_lib.encoder_inputs(batch, with_task_ids=self.encoder_config.num_tasks > 0)
        hidden = self.encoder.apply({"params": encoder_params}, **inputs, prefix=prefix,
                                    deterministic=deterministic, rngs=rngs)
        hidden = packing_lib.example_hidden(hidden, batch)  # packed rows -> [B, Le, H]
        pooled = heads_lib.POOLINGS.get(self.pooling)(hidden, batch["attention_mask"],
                                                     encoder_params)
        return hidden, pooled

    def features(self, params, batch, rng=None, deterministic=True, homogeneous=None):
        """Runs the encoder(s) -> heads.Features. ``homogeneous`` defaults to data.batch_mode."""
        if not deterministic and rng is None:
            raise ValueError("deterministic=False needs an rng for dropout")
        homogeneous = self.homogeneous if homogeneous is None else homogeneous
        sequences = choices_lib.encoder_batch(batch)  # [B * C, L] when the batch has choices
        prefix = self.peft_method.batch_prefix(params, sequences)
        run_encoder = functools.partial(self._encode, batch=sequences, prefix=prefix, rng=rng,
                                        deterministic=deterministic)
        hidden, pooled = self.sharing_strategy.encode(run_encoder, params["encoder"], sequences,
                                                      homogeneous)
        return choices_lib.head_features(hidden, pooled, batch)

    def apply(self, params, batch, rng=None, deterministic=True, homogeneous=None):
        """{task: head output on every example of the batch}."""
        feats = self.features(params, batch, rng, deterministic, homogeneous)
        head_rngs = {} if deterministic else dict(zip(
            (s.name for s in self.specs), jax.random.split(jax.random.fold_in(rng, 1),
                                                           self.num_tasks)))
        return {s.name: self.heads[s.name].apply(
                    {"params": params["heads"][s.name]}, feats, deterministic=deterministic,
                    rngs={"dropout": head_rngs[s.name]} if head_rngs else {})
                for s in self.specs}

    def task_losses(self, params, batch, rng=None, deterministic=False, homogeneous=None):
        """-> (losses [T], counts [T], aux); aux["soft_penalty"] already includes lambda and
        aux["loss_denominators"] [T] is what each task's mean divides by (see losses.py)."""
        outputs = self.apply(params, batch, rng, deterministic, homogeneous)
        sums, denominators, counts = losses_lib.task_loss_sums(outputs, batch, self.specs)
        losses = losses_lib.mean_losses(sums, denominators)
        penalty = self.sharing_strategy.penalty(params["encoder"], self.config.sharing)
        return losses, counts, {"soft_penalty": penalty, "loss_denominators": denominators}

    # --- bookkeeping ----------------------------------------------------------------------

    def param_labels(self, params):
        return self.sharing_strategy.param_labels(params)

    def trainable_mask(self, params):
        """What the optimizer trains: its groups (optim.groups, or the PEFT defaults) decide."""
        frozen = param_groups.frozen_mask(self.config, params, self.param_labels(params))
        return jax.tree.map(lambda f: not f, frozen)

    def summary(self, params) -> str:
        return summary_lib.summary(params, self.trainable_mask(params))

    def logical_specs(self, params):
        """PartitionSpecs of logical axis names (from the encoder's boxes), () where unannotated.

        The sharing strategy maps one encoder's specs to its stored encoder leaves (soft sharing
        puts None, replicated, on the leading task axis).
        """
        boxed = jax.eval_shape(lambda: self.encoder.init(jax.random.key(0),
                                                         **self._dummy_inputs())["params"])
        by_path = {path: spec for path, spec in jax.tree_util.tree_leaves_with_path(
            nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, PartitionSpec))}

        def spec_for(path, leaf):
            if summary_lib._names(path)[0] != "encoder":
                return PartitionSpec()
            return self.sharing_strategy.encoder_spec(path[1:],
                                                      by_path.get(path[1:], PartitionSpec()))

        return jax.tree_util.tree_map_with_path(spec_for, params)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self.config)
        return self._tokenizer


def build_model(config, specs: Sequence[TaskSpec]) -> MultiTaskModel:
    sharing_lib.STRATEGIES.get(config.sharing.mode).check_config(config)
    specs = _check_specs(specs)
    overrides = encoder_overrides(config, len(specs))
    encoder_config = (_random_encoder_config(config, overrides) if config.model.random_init
                      else _pretrained_encoder_config(config, overrides))
    return MultiTaskModel(config, specs, encoder_config)
