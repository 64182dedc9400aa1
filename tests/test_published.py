"""eval.published: the end of a run prints a published comparison's figures beside its own."""
import json

import numpy as np
import pytest

from mtl_jax.training import published


def write(folder, relative, task, metrics):
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"final": {task: metrics}, "final_step": 9}))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "results"
    write(root, "runs/single_sent/results.json", "sent", {"accuracy": 0.81})
    write(root, "runs/hard/results.json", "sent", {"accuracy": 0.79})
    write(root, "reference/sent/results.json", "sent", {"accuracy": 0.8, "f1": 0.5})
    return root


def test_published_figures_sit_beside_the_run_s(folder):
    table = published.published_table(str(folder), {"sent": {"accuracy": 0.7, "loss": 0.3},
                                                    "ner": {"f1": 0.9}})
    lines = table.splitlines()
    assert lines[1].split() == ["task", "metric", "this", "run", "single-task", "hard", "sharing",
                                "HF", "reference"]
    # Only rows something was published for: not sent/loss, nor ner (nothing published).
    assert [line.split() for line in lines[3:]] == [
        ["sent", "accuracy", "0.7000", "0.8100", "0.7900", "0.8000"]]


def test_a_column_without_the_metric_shows_a_dash(folder):
    table = published.published_table(str(folder), {"sent": {"f1": 0.4}})
    assert table.splitlines()[-1].split() == ["sent", "f1", "0.4000", "-", "-", "0.5000"]


def test_no_folder_no_table_and_a_missing_folder_says_so(tmp_path, folder):
    assert published.published_table("", {"sent": {"accuracy": 1.0}}) == ""
    assert "no such folder" in published.published_table(str(tmp_path / "nope"), {"sent": {}})
    assert "no figures for this run's tasks" in published.published_table(
        str(folder), {"other": {"accuracy": 1.0}})


def test_the_main_job_reads_the_committed_comparison(shared_data):
    from configs import bert_multitask
    from conftest import REPO

    config = bert_multitask.get_config()
    expected = json.loads((REPO / "docs/results/runs/single_cola/results.json").read_text())
    table = published.published_table(config.eval.published, {"cola": {"matthews_corrcoef": 0.1}})
    row = table.splitlines()[-1].split()
    assert row[:4] == ["cola", "matthews_corrcoef", "0.1000",
                       f"{expected['final']['cola']['matthews_corrcoef']:.4f}"]
    assert bert_multitask.get_config("tiny").eval.published == ""
    # Its mix names every task it trains (data.sampler=rates refuses a missing or unknown one).
    from mtl_jax.data.samplers import build_sampler

    sampler = build_sampler(config.data.sampler, [1] * len(config.tasks), config.data, 0,
                            tuple(config.tasks))
    np.testing.assert_allclose(sampler.rates.sum(), 1.0)
    assert config.data.sampler == "rates" and config.data.packing


def test_a_run_prints_them_under_its_results_table(tmp_path, folder, capsys):
    from mtl_jax.training import loop, runner
    from run_helpers import tiny_config

    config = tiny_config(tmp_path, ("sent",))
    config.train.num_steps = 2
    config.eval.published = str(folder)
    metrics = {"sent": {"accuracy": 0.625}}
    loop.train(runner.build_run(config), str(tmp_path / "run"),
               evaluate_fn=lambda state, step: (metrics, {}))
    out = capsys.readouterr().out
    results, _, beside = out.partition("Published figures")
    assert ["sent", "accuracy", "0.6250"] in [line.split()[:3] for line in results.splitlines()]
    assert beside.splitlines()[-1].split() == ["sent", "accuracy", "0.6250", "0.8100", "0.7900",
                                               "0.8000"]


def test_a_missing_folder_is_refused_before_training(tmp_path):
    from mtl_jax.training import runner, validate
    from run_helpers import one_line_error, tiny_config

    config = tiny_config(tmp_path, ("sent",))
    config.eval.published = str(tmp_path / "nope")
    line = one_line_error(validate.check_run, runner.build_run(config))
    assert "eval.published=" in line and "is not a folder" in line
