"""Training FLOPs per example under soft sharing, LoRA, prefixes and frozen groups, against
numbers worked out by hand from the tiny model's parameter counts (tests/tiny_bert.py)."""
import pytest

from mtl_jax.training import flops
from tiny_bert import D, HEADS, LAYER, LAYERS, LORA, POOLER, T, tiny_bert

S = 16  # sequence length
ATTENTION = 4 * LAYERS * D * S  # forward QK^T and AV per token: 4096
ENCODER = LAYERS * LAYER + POOLER  # 18144: per-token matmul parameters of one encoder copy


def test_full_fine_tuning_is_the_standard_6n_count():
    cost = flops.train_cost_of(tiny_bert())
    n = ENCODER + HEADS  # 18408
    assert cost.per_token(S) == 6 * n + 12 * LAYERS * D * S == 122736
    assert cost.per_example(S) == S * 122736


def test_soft_sharing_counts_one_encoder_per_example():
    model = tiny_bert(sharing__mode="soft")
    assert model.abstract_params()["encoder"]["pooler"]["dense"]["kernel"].shape == (T, D, D)
    # The params hold T = 2 encoders (2 * 18144 + 264 = 36552); each example runs one.
    cost = flops.train_cost_of(model)
    assert cost.per_token(S) == 6 * (ENCODER + HEADS) + 3 * ATTENTION == 122736


def test_lora_weight_gradients_only_for_lora_and_heads():
    cost = flops.train_cost_of(tiny_bert(peft__kind="lora"))
    n = ENCODER + HEADS + LORA // T  # 19432: each example uses its own task's LoRA rows
    trainable = HEADS + LORA // T  # 1288 (the encoder and pooler are frozen)
    # forward 2N + attention, activation grads 2N + 2 * attention, weight grads 2 * trainable
    assert cost.per_token(S) == 4 * n + 2 * trainable + 3 * ATTENTION == 92592


def test_prefix_adds_its_keys_to_attention_and_no_per_token_parameters():
    cost = flops.train_cost_of(tiny_bert(peft__kind="prefix"))  # prefix_length 3
    attention = 4 * LAYERS * D * (S + 3)
    assert cost.per_token(S) == 4 * (ENCODER + HEADS) + 2 * HEADS + 3 * attention == 88752


def test_only_heads_training_needs_no_encoder_backward():
    groups = dict(enc=dict(labels="embeddings|encoder", frozen=True),
                  top=dict(labels="pooler|heads/.*"))
    cost = flops.train_cost_of(tiny_bert(groups=groups))
    n, top = ENCODER + HEADS, POOLER + HEADS  # 18408, 1320
    # forward 2N + attention, then activation and weight grads of the pooler and heads only
    assert cost.per_token(S) == 2 * n + ATTENTION + 2 * top + 2 * top == 46192


@pytest.mark.parametrize("kind", ["embeddings", "encoder"])
def test_frozen_groups_drop_weight_gradients(kind):
    frozen_size = {"embeddings": 0, "encoder": LAYERS * LAYER}[kind]  # tables are no matmuls
    groups = dict(off=dict(labels=kind, frozen=True), on=dict(labels=f"(?!{kind}$).*"))
    cost = flops.train_cost_of(tiny_bert(groups=groups))
    n = ENCODER + HEADS
    assert cost.per_token(S) == 6 * n - 2 * frozen_size + 3 * ATTENTION
