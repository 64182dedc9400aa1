"""A random 2-layer BERT MultiTaskModel (hidden 32) with two tasks, and its parameter counts
worked out by hand from the architecture, for the summary and FLOPs tests."""
from configs.base import get_base_config
from mtl_jax.models import multitask
from mtl_jax.models.encoder_config import EncoderConfig
from mtl_jax.tasks.spec import TaskSpec

SPECS = [TaskSpec("cls", "sequence_classification", 3, 0),
         TaskSpec("ner", "token_classification", 5, 1)]
T, D, LAYERS, FFN, VOCAB, POSITIONS, RANK = 2, 32, 2, 64, 50, 32, 4

# word + position + token-type tables, and the embedding LayerNorm (scale, bias)
EMBEDDINGS = VOCAB * D + POSITIONS * D + 2 * D + 2 * D  # 2752
# query/key/value/output (kernel + bias), mlp wi and wo, two LayerNorms
LAYER = 4 * (D * D + D) + (D * FFN + FFN) + (FFN * D + D) + 2 * 2 * D  # 8544
POOLER = D * D + D  # 1056
HEADS = (D * 3 + 3) + (D * 5 + 5)  # cls 99 + ner 165 = 264
# LoRA on query and value of each layer: lora_a [T, D, r] and lora_b [T, r, heads, head_dim]
LORA = LAYERS * 2 * (T * D * RANK + T * RANK * D)  # 2048
TOTAL_HARD = EMBEDDINGS + LAYERS * LAYER + POOLER + HEADS  # 21160


def tiny_bert(groups=None, **sections):
    """``sections``: config overrides as section__field=value; ``groups``: optim.groups."""
    c = get_base_config()
    c.model.random_init = True
    c.peft.update(dict(lora_rank=RANK, prefix_length=3, prefix_hidden=16))
    for key, value in sections.items():
        section, field = key.split("__")
        c[section][field] = value
    for name, rule in (groups or {}).items():
        c.optim.groups[name] = rule
    enc = EncoderConfig(family="bert", vocab_size=VOCAB, hidden_size=D, num_layers=LAYERS,
                        num_heads=4, head_dim=8, intermediate_size=FFN,
                        max_position_embeddings=POSITIONS,
                        **multitask.encoder_overrides(c, len(SPECS)))
    return multitask.MultiTaskModel(c, SPECS, enc)
