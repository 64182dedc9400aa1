"""Each bad input is one UserError line that says what is wrong and where."""
import os
import subprocess
import sys
import textwrap

import pytest
import transformers

from data_helpers import base_config, write_jsonl
from mtl_jax.data.pipeline import build_data
from run_helpers import one_line_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


def load(tmp_path, tokenizer, rows=None, splits=("train",), empty_text="skip", **task):
    config = base_config(tmp_path, empty_text=empty_text)
    path = (write_jsonl(tmp_path / "train.jsonl", rows) if rows is not None
            else str(tmp_path / "absent.jsonl"))
    fields = dict(type="sequence_classification", text_fields=("sentence",),
                  label_names=("neg", "pos"), data=dict(train=path))
    fields.update(task)
    config.tasks.t = fields
    return build_data(config, tokenizer, splits=splits)


error = one_line_error  # tests name it error()


def test_missing_file(tmp_path, tokenizer):
    assert "tasks.t.data.train: file" in error(load, tmp_path, tokenizer) and "not found" in error(
        load, tmp_path, tokenizer)


def test_missing_column_names_the_columns_found(tmp_path, tokenizer):
    message = error(load, tmp_path, tokenizer, [dict(text="hi", label=0)])
    assert "train.jsonl:1: column 'sentence' not found (columns: text, label)" in message


def test_label_outside_label_names(tmp_path, tokenizer):
    rows = [dict(sentence="ok", label=1), dict(sentence="bad", label=7)]
    assert "train.jsonl:2: label 7 is not one of the label names (neg, pos)" in error(
        load, tmp_path, tokenizer, rows)
    rows[1]["label"] = "neutral"
    assert "train.jsonl:2: label 'neutral'" in error(load, tmp_path, tokenizer, rows)


def test_tokens_and_tags_of_different_lengths(tmp_path, tokenizer):
    rows = [dict(tokens=["a", "b"], tags=["O", "O"]),
            dict(tokens=["a", "b", "c"], tags=["O", "O"])]
    message = error(load, tmp_path, tokenizer, rows, type="token_classification",
                    text_fields=("tokens",), label_field="tags", label_names=("O", "B-X"))
    assert "train.jsonl:2: 3 tokens but 2 tags" in message


def test_empty_text_skipped_and_counted_or_error(tmp_path, tokenizer):
    rows = [dict(sentence="fine", label=0), dict(sentence="  ", label=1),
            dict(sentence=None, label=1)]
    data = load(tmp_path, tokenizer, rows).split("t", "train")
    assert len(data.examples) == 1 and data.skipped_empty == 2
    assert "train.jsonl:2: empty text" in error(load, tmp_path, tokenizer, rows, empty_text="error")


def test_unknown_task_type_lists_valid_ones(tmp_path, tokenizer):
    message = error(load, tmp_path, tokenizer, [dict(sentence="a", label=0)], type="sentiment")
    assert "unknown task type 'sentiment'" in message
    assert ("extractive_qa, multiple_choice, sequence_classification, sequence_regression, "
            "token_classification") in message


def test_qa_answer_not_in_context(tmp_path, tokenizer):
    rows = [dict(id="1", question="q?", context="Paris is in France.",
                 answers=dict(text=["Paris"], answer_start=[0])),
            dict(id="2", question="q?", context="Paris is in France.",
                 answers=dict(text=["Rome"], answer_start=[0]))]
    message = error(load, tmp_path, tokenizer, rows, splits=("validation",), type="extractive_qa",
                    text_fields=("question", "context"), label_field="answers", label_names=(),
                    max_length=64, doc_stride=16,
                    data=dict(validation=str(tmp_path / "train.jsonl")))
    assert "train.jsonl:2: answer 'Rome' does not occur in its context" in message


def test_unknown_task_field_and_hub_unreachable(tmp_path, tokenizer):
    assert "unknown task field 'max_lenght'" in error(load, tmp_path, tokenizer, [], max_lenght=3)
    from mtl_jax.tasks import presets

    config = base_config(tmp_path)
    config.tasks.rte = presets.hub_task("rte", hub="mtl-jax-no-such-org/no-such-dataset")
    message = error(build_data, config, tokenizer)
    assert "cannot load hub dataset mtl-jax-no-such-org/no-such-dataset/rte[train]" in message
    assert "local_task('rte', DATA_DIR)" in message


def test_preview_cli_bad_input_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl",
                       [dict(sentence="fine", label=0), dict(sentence="x", label=9)])
    config = tmp_path / "cfg.py"
    config.write_text(textwrap.dedent(f"""
        from configs.base import get_base_config

        def get_config(arg=None):
            c = get_base_config()
            c.data.cache_dir = {str(tmp_path / 'cache')!r}
            c.tasks.t = dict(type="sequence_classification", text_fields=("sentence",),
                             label_names=("a", "b"), data=dict(train={data!r}))
            return c
    """))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "mtl_jax.data", f"--config={config}", "--show=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: {data}:2: label 9 is not one of the label names (a, b) nor an index into them; "
        f"fix the row or the task's label_names"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_preview_cli_prints_sizes_labels_examples_and_rates(tmp_path):
    rows = [dict(sentence=f"sentence number {i} is {'good' if i % 3 else 'bad'}",
                 label=int(i % 3 > 0))
            for i in range(30)]
    tags = [dict(tokens=["Peter", "lives", "in", "Berlin"],
                 ner_tags=["B-PER", "O", "O", "B-LOC"])] * 10
    config = tmp_path / "cfg.py"
    config.write_text(textwrap.dedent(f"""
        from configs.base import get_base_config

        def get_config(arg=None):
            c = get_base_config()
            c.data.cache_dir = {str(tmp_path / 'cache')!r}
            c.tasks.cls = dict(type="sequence_classification", text_fields=("sentence",),
                               label_names=("a", "b"), max_length=6,
                               data=dict(train={write_jsonl(tmp_path / 'c.jsonl', rows)!r}))
            c.tasks.ner = dict(type="token_classification", text_fields=("tokens",),
                               label_field="ner_tags", label_names=("O", "B-PER", "B-LOC"),
                               data=dict(train={write_jsonl(tmp_path / 'n.jsonl', tags)!r}))
            return c
    """))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "mtl_jax.data", f"--config={config}", "--show=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "train: 30 examples, 30 features" in out and "label counts (train): a=10, b=20" in out
    # Tags aligned under their words.
    assert "Peter lives in Berlin\n    B-PER O     O  B-LOC" in out
    # "sentence number N is good" = 7 tokens with [CLS]/[SEP] > max_length 6: every example
    # truncated.
    assert "30 (100.0%) longer than max_length=6" in out
    assert "rates over train features: cls=0.750, ner=0.250" in out  # proportional 30:10
