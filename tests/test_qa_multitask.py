"""configs/bert_qa_multitask.py: SQuAD (extractive QA) + CoNLL-2003 (NER) + SST-2 in one model,
mixed packed batches, on the real ../shared/data files (tiny model, 64 examples a task)."""
import importlib.util
import math

from conftest import REPO
from mtl_jax.training import loop, runner
from mtl_jax.training.metrics_writer import read_metrics


def qa_config(arg: str):
    spec = importlib.util.spec_from_file_location("bert_qa_multitask",
                                                  REPO / "configs" / "bert_qa_multitask.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_the_default_config_trains_squad_with_ner_and_classification(shared_data):
    c = qa_config("")
    assert {n: t.type for n, t in c.tasks.items()} == dict(
        squad="extractive_qa", conll2003="token_classification", sst2="sequence_classification")
    assert (c.tasks.squad.max_length, c.tasks.squad.doc_stride) == (384, 128)
    assert c.data.packing and c.data.batch_mode == "mixed"
    assert c.eval.max_examples == 0  # SQuAD's whole validation split, EM and F1


def test_tiny_qa_multitask_run_trains_every_task_and_scores_squad(shared_data, tmp_path):
    c = qa_config("tiny")
    c.data.cache_dir = str(tmp_path / "cache")
    workdir = tmp_path / "run"
    loop.train(runner.build_run(c), str(workdir))
    events = read_metrics(str(workdir / "metrics.jsonl"))
    losses = {k: v for e in events for k, v in e.items() if k.startswith("train/loss/")}
    assert {"train/loss/squad", "train/loss/conll2003", "train/loss/sst2"} <= losses.keys()
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    final = {k: v for e in events if e["step"] == c.train.num_steps for k, v in e.items()}
    for key in ("eval/squad/exact_match", "eval/squad/f1", "eval/conll2003/f1",
                "eval/sst2/accuracy"):
        assert key in final and 0.0 <= final[key] <= 1.0, (key, sorted(final))
