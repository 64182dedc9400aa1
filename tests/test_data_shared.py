"""The real datasets in ../shared/data: SST-2 and CoNLL-2003 validation load, tokenize and
score."""
import numpy as np
import transformers

from configs.base import get_base_config
from mtl_jax.data.pipeline import build_data
from mtl_jax.evaluation import evaluate_task
from mtl_jax.tasks import presets


def test_sst2_and_conll2003_validation(shared_data, minilm_path, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    config = get_base_config()
    config.data.cache_dir = str(tmp_path)
    config.tasks.sst2 = presets.local_task("sst2", str(shared_data))
    config.tasks.conll2003 = presets.local_task("conll2003", str(shared_data))
    run = build_data(config, tokenizer, splits=("validation",))
    assert ([(s.name, s.index, s.num_labels) for s in run.specs]
            == [("conll2003", 0, 9), ("sst2", 1, 2)])
    sst2, conll = run.split("sst2"), run.split("conll2003")
    assert len(sst2.examples) == 872 and len(conll.examples) == 3250  # README split counts
    assert np.bincount(sst2.features.arrays["label"]).tolist() == [428, 444]
    assert conll.examples[0]["words"][:3] == ["CRICKET", "-", "LEICESTERSHIRE"]
    assert conll.spec.label_names[conll.examples[0]["tags"][2]] == "B-ORG"

    def gold_labels(batch):  # a perfect classifier: one-hot of the gold label
        return np.eye(2)[np.maximum(batch["label"], 0)]

    metrics, report = evaluate_task(sst2, gold_labels, batch_size=64)
    assert metrics == {"accuracy": 1.0} and "positive" in report

    # One-hot of the gold tags at labelled positions: truncation is the only loss.
    def gold_tags(batch):
        return np.eye(9)[np.maximum(batch["tag_ids"], 0)]

    metrics, report = evaluate_task(conll, gold_tags, batch_size=64)
    truncated_words = sum(len(e["words"]) - (conll.features.tokens("word_ids", i) >= 0).sum()
                          for i, e in enumerate(conll.examples))
    assert truncated_words > 0 and 0.99 < metrics["f1"] < 1.0 and metrics["precision"] == 1.0
    assert "PER" in report and "LOC" in report
