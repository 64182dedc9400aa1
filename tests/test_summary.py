"""The parameter summary counts what the optimizer trains (its frozen groups), checked against
counts worked out by hand from the parameter shapes (tests/tiny_bert.py)."""
import jax

from mtl_jax.models import summary
from mtl_jax.models import param_groups
from mtl_jax.training import optim
from tiny_bert import EMBEDDINGS, HEADS, LORA, TOTAL_HARD, tiny_bert

FREEZE_EMBEDDINGS = dict(emb=dict(labels="embeddings", frozen=True),
                         rest=dict(labels="(?!embeddings$).*"))


def _counts(model):
    params = model.abstract_params()  # shapes only
    return summary.count(params, model.trainable_mask(params)), model.summary(params)


def test_frozen_embedding_group_drops_trainable_by_the_embedding_count():
    (total, trainable), text = _counts(tiny_bert())
    assert (total, trainable) == (TOTAL_HARD, TOTAL_HARD)  # 21160, everything trains
    assert text == "params: total 0.0212M, trainable 0.0212M (100.0%)"
    (total, trainable), text = _counts(tiny_bert(groups=FREEZE_EMBEDDINGS))
    assert (total, trainable) == (TOTAL_HARD, TOTAL_HARD - EMBEDDINGS)  # 21160 - 2752 = 18408
    assert text == "params: total 0.0212M, trainable 0.0184M (87.0%)"  # 18408 / 21160 = 86.99%


def test_lora_counts_heads_and_lora_and_groups_freeze_more():
    # Default PEFT groups: the whole checkpoint (embeddings, encoder, pooler) is frozen.
    (total, trainable), _ = _counts(tiny_bert(peft__kind="lora"))
    assert (total, trainable) == (TOTAL_HARD + LORA, HEADS + LORA)  # 23208, 264 + 2048
    groups = dict(frozen=dict(labels="embeddings|encoder|pooler|heads/ner", frozen=True),
                  trainable=dict(labels="peft|heads/cls"))
    (_, trainable), _ = _counts(tiny_bert(groups=groups, peft__kind="lora"))
    assert trainable == HEADS + LORA - (32 * 5 + 5)  # the ner head [32, 5] + [5] frozen too


def test_frozen_mask_is_the_optimizers_assignment():
    for model in (tiny_bert(groups=FREEZE_EMBEDDINGS), tiny_bert(peft__kind="adapter")):
        params = model.init_params(jax.random.key(0))
        labels = model.param_labels(params)
        frozen = param_groups.frozen_mask(model.config, params, labels)
        opt = optim.build_optimizer(model.config, params, labels, 10)
        assert jax.tree.map(lambda f: not f, frozen) == opt.trainable_mask()
        assert opt.group_of["encoder"]["pooler"]["dense"]["kernel"] == (
            "rest" if model.peft_kind == "none" else "frozen")
        assert frozen["encoder"]["embeddings"]["word_embeddings"]["embedding"]
