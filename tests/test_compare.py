"""mtl_jax.compare: the setup plan, the resume logic (fake launcher), the report from fake runs."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, hf_reference_module
from mtl_jax import compare
from mtl_jax.errors import UserError
from mtl_jax.training.results import write_results

sys.path.insert(0, str(REPO))
from configs import compare as compare_config  # noqa: E402

METRICS = {"sst2": "accuracy", "cola": "matthews_corrcoef", "rte": "accuracy", "conll2003": "f1"}


@pytest.fixture
def tiny(shared_data):
    return compare_config.get_config("tiny")


# --- the protocol config -----------------------------------------------------------------------

def test_protocol_steps_are_three_epochs_of_the_capped_data(shared_data):
    c = compare_config.get_config()
    # SST-2 capped at 10,000; CoLA 8,551, RTE 2,490, CoNLL-2003 14,041 train rows (README counts).
    assert compare_config.count_train_examples(c.tasks.sst2) == 10_000
    assert compare_config.count_train_examples(c.tasks.cola) == 8_551
    assert compare_config.count_train_examples(c.tasks.rte) == 2_490
    assert c.train.num_steps == -(-3 * (10_000 + 8_551 + 2_490 + 14_041) // 32) == 3289
    assert compare_config.get_config("tasks=rte").train.num_steps == -(-3 * 2_490 // 32) == 234
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_fraction, c.optim.schedule) == (
        5e-5, 0.01, 0.1, "linear")
    assert c.train.batch_size == 32 and all(t.max_length == 128 for t in c.tasks.values())
    assert compare.protocol_metrics(c) == METRICS
    tiny = compare_config.get_config("tiny,tasks=rte,epochs=1")
    assert tiny.train.num_steps == 4 and tiny.model.random_init  # 64 examples / batch 16


def test_extra_tasks_get_their_windows_buckets_and_one_final_evaluation(shared_data):
    c = compare_config.get_config("tasks=copa+squad")
    assert compare_config.count_train_examples(c.tasks.squad) == 1_500  # of 87,599 questions
    assert compare_config.count_train_examples(c.tasks.copa) == 400
    assert (c.tasks.squad.type, c.tasks.squad.max_length, c.tasks.squad.doc_stride) == (
        "extractive_qa", 384, 128)
    assert c.tasks.copa.type == "multiple_choice" and c.tasks.copa.max_length == 128
    assert tuple(c.data.buckets) == (32, 64, 128, 192, 256, 384)
    assert c.train.eval_every == c.train.num_steps  # one pass over SQuAD's 10,570 questions
    assert compare.protocol_metrics(c) == {"copa": "accuracy", "squad": "f1"}
    copa = compare_config.get_config("tasks=copa")
    assert tuple(copa.data.buckets) == (32, 64, 128)
    assert copa.train.num_steps == -(-3 * 400 // 32) and copa.train.eval_every == 38 // 6
    # The default protocol is unchanged by the extra tasks.
    assert tuple(compare_config.get_config().data.buckets) == (32, 64, 128)


def test_bad_config_args_are_user_errors(shared_data):
    with pytest.raises(UserError, match="tasks=NAME"):
        compare_config.get_config("small")
    with pytest.raises(UserError, match="unknown task 'mnli'.*copa, squad"):
        compare_config.get_config("tasks=mnli")


# --- the plan --------------------------------------------------------------------------------

def test_plan_has_every_setup_with_its_overrides(tiny):
    setups = {s.name: s for s in compare.plan(tiny, ["optim.lr=3e-5,5e-5"])}
    assert list(setups) == ["single_sst2", "single_cola", "single_rte", "single_conll2003",
                            "hard", "soft", "prefix", "adapters", "lora",
                            "hard_optim.lr=3e-05", "hard_optim.lr=5e-05"]
    all_tasks = ("sst2", "cola", "rte", "conll2003")
    for task in all_tasks:
        assert setups[f"single_{task}"].tasks == (task,)
        assert setups[f"single_{task}"].overrides == {"sharing.mode": "hard", "peft.kind": "none"}
    assert setups["soft"].overrides == {"sharing.mode": "soft", "peft.kind": "none",
                                        "data.batch_mode": "homogeneous"}
    for name, kind in [("prefix", "prefix"), ("adapters", "adapter"), ("lora", "lora")]:
        assert setups[name].overrides == {"sharing.mode": "hard", "peft.kind": kind,
                                          "optim.lr": 1e-3}
        assert setups[name].tasks == all_tasks
    assert setups["hard_optim.lr=3e-05"].sweep == ("optim.lr", 3e-5)


def test_meta_learning_setups_spend_the_multi_task_examples(shared_data):
    c = compare_config.get_config()
    with c.unlocked():
        c.compare.setups = "reptile,reptile_ft,fomaml,meta_weights,meta_weights_ft"
    setups = {s.name: s for s in compare.plan(c)}
    # 3,289 steps x 32 rows; an outer step reads 4 tasks x (3 inner + query) x 8 rows.
    reptile, fomaml = setups["reptile"].overrides, setups["fomaml"].overrides
    assert reptile["train.num_steps"] == -(-3289 * 32 // (4 * 3 * 8)) == 1097
    assert fomaml["train.num_steps"] == -(-3289 * 32 // (4 * 4 * 8)) == 823
    assert reptile["train.eval_every"] == 1097 // 6 and fomaml["train.eval_every"] == 823 // 6
    assert (reptile["train.algorithm"], fomaml["train.algorithm"]) == ("reptile", "fomaml")
    assert (reptile["optim.name"], reptile["optim.lr"], reptile["optim.b1"]) == ("sgd", 1.0, 0.0)
    assert "optim.name" not in fomaml  # the protocol's AdamW
    for o in (reptile, fomaml):
        assert (o["meta.tasks_per_step"], o["meta.inner_steps"], o["meta.inner_batch_size"],
                o["meta.inner_optimizer"], o["meta.inner_lr"]) == (4, 3, 8, "adam", 5e-5)
    weights = setups["meta_weights"].overrides
    assert weights["weighting.name"] == "meta" and weights["weighting.meta_every"] == 4
    assert setups["reptile_ft_rte"].init_from == "reptile"
    assert setups["meta_weights_ft_cola"].init_from == "meta_weights"


def test_child_command_orders_setup_then_user_then_sweep(tiny):
    setups = {s.name: s for s in compare.plan(tiny, ["optim.lr=3e-5"])}
    user = {"optim.lr": 2e-5, "train.log_every": 7}
    cmd = compare.child_command(setups["single_rte"], "/r/configs/compare.py", tiny.compare.args,
                                "/w/single_rte", user)
    assert cmd[1:] == ["-m", "mtl_jax.main", "--config=/r/configs/compare.py:tiny,tasks=rte",
                       "--workdir=/w/single_rte", "--config.optim.lr=2e-05",
                       "--config.peft.kind=none", "--config.sharing.mode=hard",
                       "--config.train.log_every=7"]
    # A user override beats the setup's PEFT lr; the sweep value beats the user's override.
    assert compare.merged_overrides(setups["lora"], user)["optim.lr"] == 2e-5
    assert compare.merged_overrides(setups["hard_optim.lr=3e-05"], user)["optim.lr"] == 3e-5
    c = compare.setup_config(tiny, setups["lora"], user)
    assert list(c.tasks.keys()) == sorted(["sst2", "cola", "rte", "conll2003"])
    assert (c.peft.kind, c.optim.lr, c.train.log_every) == ("lora", 2e-5, 7)
    assert list(compare.setup_config(tiny, setups["single_cola"]).tasks.keys()) == ["cola"]


def test_plan_errors_are_one_line(tiny):
    with pytest.raises(UserError, match="unknown config key 'optim.lrr'; did you mean optim.lr"):
        compare.plan(tiny, ["optim.lrr=1e-3"])
    with pytest.raises(UserError, match="bad value 'fast' for optim.lr: expected float"):
        compare.plan(tiny, ["optim.lr=fast"])
    with pytest.raises(UserError, match="needs KEY=V1,V2"):
        compare.plan(tiny, ["optim.lr"])
    with tiny.unlocked():
        tiny.compare.setups = "hard,shared"
    with pytest.raises(UserError, match="unknown comparison setup 'shared'"):
        compare.plan(tiny)


def test_fine_tune_setups_are_the_single_task_runs_started_from_their_source(tiny):
    with tiny.unlocked():
        tiny.compare.setups = "single,hard,hard_ft"
    setups = {s.name: s for s in compare.plan(tiny)}
    tasks = ("sst2", "cola", "rte", "conll2003")
    assert list(setups)[4:] == ["hard"] + [f"hard_ft_{t}" for t in tasks]
    for task in tasks:
        single, ft = setups[f"single_{task}"], setups[f"hard_ft_{task}"]
        assert (ft.tasks, ft.overrides, ft.sweep, ft.init_from) == (
            single.tasks, single.overrides, single.sweep, "hard")
    user = {"train.log_every": 7}
    ft = compare.child_command(setups["hard_ft_rte"], "/r/configs/compare.py", tiny.compare.args,
                               "/w/runs/hard_ft_rte", user)
    single = compare.child_command(setups["single_rte"], "/r/configs/compare.py",
                                   tiny.compare.args, "/w/runs/hard_ft_rte", user)
    assert ft == single[:5] + ["--config.model.init_from=/w/runs/hard:latest"] + single[5:]
    assert compare.SETUP_KINDS.get("lora_ft") and compare.SETUP_KINDS.get("soft_ft")
    for setups_value in ("hard_ft", "hard_ft,hard"):
        with tiny.unlocked():
            tiny.compare.setups = setups_value
        with pytest.raises(UserError, match="setup hard_ft_sst2 fine-tunes from hard, which "
                                            "compare.setups does not list before it; list hard "
                                            "first, e.g. compare.setups=hard,hard_ft"):
            compare.plan(tiny)


# --- resume (fake launcher) ------------------------------------------------------------------

class FakeLauncher:
    """Records launches; "trains" by writing results.json unless the setup is in ``fail``."""

    def __init__(self, fail=()):
        self.launched, self.fail = [], set(fail)

    def __call__(self, command, log_path):
        run_dir = os.path.dirname(log_path)
        name = os.path.basename(run_dir)
        self.launched.append(name)
        if name in self.fail:
            return 1
        task = command[3].rsplit("tasks=", 1)[1].split("+")[0]
        write_results(run_dir, {task: {METRICS[task]: 0.5}}, final_step=4)
        return 0


def test_resume_skips_finished_setups_and_relaunches_half_done_ones(tiny, tmp_path):
    with tiny.unlocked():
        tiny.compare.setups = "single,hard,lora"
    runs = tmp_path / "runs"
    # finished earlier
    write_results(str(runs / "single_sst2"), {"sst2": {"accuracy": 0.9}}, final_step=4)
    fake = FakeLauncher(fail={"lora"})

    def count(c):  # no model building in this test
        return 7, 70

    statuses = compare.run_comparison(tiny, "configs/compare.py", str(tmp_path), launch=fake,
                                      count_params=count, log=lambda s: None)
    assert fake.launched == ["single_cola", "single_rte", "single_conll2003", "hard", "lora"]
    assert statuses == {"single_sst2": "skipped", "single_cola": "done", "single_rte": "done",
                        "single_conll2003": "done", "hard": "done", "lora": "failed (exit 1)"}
    facts = json.loads((runs / "lora" / "compare.json").read_text())
    assert (facts["launches"], facts["returncode"], facts["trainable_params"]) == (1, 1, 7)
    assert facts["overrides"] == {"sharing.mode": "hard", "peft.kind": "lora", "optim.lr": "0.001"}

    fake = FakeLauncher()  # the second invocation only resumes the half-done setup
    statuses = compare.run_comparison(tiny, "configs/compare.py", str(tmp_path), launch=fake,
                                      count_params=count, log=lambda s: None)
    assert fake.launched == ["lora"]
    assert statuses["lora"] == "done" and statuses["hard"] == "skipped"
    assert json.loads((runs / "lora" / "compare.json").read_text())["launches"] == 2
    assert (tmp_path / "report.md").is_file()

    # half-done again, but now launched with other settings
    (runs / "hard" / "results.json").unlink()
    with pytest.raises(UserError, match="was started with other settings"):
        compare.run_comparison(tiny, "configs/compare.py", str(tmp_path), {"optim.lr": 1e-4},
                               launch=fake, count_params=count, log=lambda s: None)


def test_compare_only_runs_the_named_setups(tiny, tmp_path):
    with tiny.unlocked():
        tiny.compare.setups = "single,hard,hard_ft"
        tiny.compare.only = "hard, hard_ft_rte"
    fake = FakeLauncher()
    statuses = compare.run_comparison(tiny, "configs/compare.py", str(tmp_path), launch=fake,
                                      count_params=lambda c: (7, 70), log=lambda s: None)
    assert fake.launched == ["hard", "hard_ft_rte"]
    assert statuses["single_rte"] == statuses["hard_ft_sst2"] == "not selected"
    with tiny.unlocked():
        tiny.compare.only = "hard_ft_mnli"
    with pytest.raises(UserError, match="compare.only names 'hard_ft_mnli'"):
        compare.run_comparison(tiny, "configs/compare.py", str(tmp_path), launch=fake,
                               count_params=lambda c: (7, 70), log=lambda s: None)


def test_fine_tunes_wait_for_their_source_and_record_where_they_start(tiny, tmp_path):
    with tiny.unlocked():
        tiny.compare.setups = "hard,hard_ft"
    lines = []
    fake = FakeLauncher(fail={"hard"})
    statuses = compare.run_comparison(tiny, "configs/compare.py", str(tmp_path), launch=fake,
                                      count_params=lambda c: (7, 70), log=lines.append)
    assert fake.launched == ["hard"]
    assert statuses["hard_ft_rte"] == "blocked (hard not finished)"
    assert "hard_ft_rte: blocked: it starts from hard's final params and hard has not finished" \
        in "\n".join(lines)
    fake = FakeLauncher()
    statuses = compare.run_comparison(tiny, "configs/compare.py", str(tmp_path), launch=fake,
                                      count_params=lambda c: (7, 70), log=lines.append)
    assert fake.launched == ["hard", "hard_ft_sst2", "hard_ft_cola", "hard_ft_rte",
                             "hard_ft_conll2003"]
    facts = json.loads((tmp_path / "runs" / "hard_ft_rte" / "compare.json").read_text())
    assert facts["overrides"] == {"sharing.mode": "hard", "peft.kind": "none",
                                  "model.init_from": "runs/hard:latest"}  # DIR-relative
    assert f"--config.model.init_from={tmp_path}/runs/hard:latest" in facts["command"]
    # A moved comparison directory resumes its half-done fine-tunes (the settings match).
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    shutil.copytree(tmp_path, moved)
    (moved / "runs" / "hard_ft_rte" / "results.json").unlink()
    fake = FakeLauncher()
    compare.run_comparison(tiny, "configs/compare.py", str(moved), launch=fake,
                           count_params=lambda c: (7, 70), log=lines.append)
    assert fake.launched == ["hard_ft_rte"]


def test_sigterm_to_the_driver_reaches_the_job_and_stops_the_driver(tmp_path):
    """The real launcher: the job gets SIGTERM (and "checkpoints"), the driver raises Stopped."""
    job = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM,"
           " lambda *a: (print('checkpoint saved', flush=True), sys.exit(0)))\n"
           "print('training', flush=True)\n"
           "time.sleep(60)\n")
    log = tmp_path / "compare.log"
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(compare.Stopped) as stopped:
            compare.subprocess_launcher([sys.executable, "-c", job], str(log))
    finally:
        timer.cancel()
    assert (stopped.value.signum, stopped.value.returncode) == (signal.SIGTERM, 0)
    assert log.read_text().splitlines()[-2:] == ["training", "checkpoint saved"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the driver's handler is undone


def test_a_stopped_launch_is_recorded_and_ends_the_comparison(tiny, tmp_path):
    def stopped_after_a_while(command, log_path):
        time.sleep(0.05)
        raise compare.Stopped(15, 0)

    with tiny.unlocked():
        tiny.compare.setups = "hard,lora"
    lines = []
    statuses = compare.run_comparison(tiny, "configs/compare.py", str(tmp_path),
                                      launch=stopped_after_a_while, count_params=lambda c: (7, 70),
                                      log=lines.append)
    assert statuses == {"hard": "stopped (signal 15)"}  # lora not started
    facts = json.loads((tmp_path / "runs" / "hard" / "compare.json").read_text())
    assert facts["launches"] == 1 and facts["returncode"] == 0 and facts["wall_s"] >= 0.05
    assert "hard: stopped by signal 15" in lines[-1] and "rerun the same command" in lines[-1]
    assert not (tmp_path / "report.md").exists()


def test_a_job_that_exits_75_stops_the_comparison_resumably(tiny, tmp_path):
    with tiny.unlocked():
        tiny.compare.setups = "hard,lora"
    lines = []
    statuses = compare.run_comparison(tiny, "configs/compare.py", str(tmp_path),
                                      launch=lambda command, log_path: 75,
                                      count_params=lambda c: (7, 70), log=lines.append)
    assert statuses == {"hard": "stopped (exit 75)"}  # not "failed"; lora not started
    assert "rerun the same command to resume" in lines[-1]


# --- the report from hand-made run directories --------------------------------------------------

def fake_run(root, name, final, best=None, facts=None, events=(), extra=None):
    run = pathlib.Path(root) / name
    write_results(str(run), final, final_step=100, best=best or final, best_step=50, extra=extra)
    if facts is not None:
        (run / "compare.json").write_text(json.dumps(facts))
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_report_table_rows_mean_and_plots(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "hard", {"sst2": {"accuracy": 0.9, "loss": 3.0},
                            "cola": {"matthews_corrcoef": 0.4},
                            "rte": {"accuracy": 0.6}, "conll2003": {"f1": 0.8, "precision": 0.1}},
             best={"sst2": {"accuracy": 0.92}, "cola": {"matthews_corrcoef": 0.44},
                   "rte": {"accuracy": 0.64}, "conll2003": {"f1": 0.8}},
             facts={"trainable_params": 22_718_991, "wall_s": 600.0},
             events=[{"step": 10, "train/examples_per_s": 100.0},
                     {"step": 20, "train/examples_per_s": 300.0},
                     {"step": 30, "train/examples_per_s": 200.0, "eval/sst2/accuracy": 0.8},
                     {"step": 60, "eval/sst2/accuracy": 0.9, "eval/rte/accuracy": 0.6}])
    fake_run(runs, "single_sst2", {"sst2": {"accuracy": 0.91}},
             facts={"trainable_params": 2e6, "wall_s": 60.0}, extra={"examples_per_s": 50.0})
    fake_run(runs, "single_cola", {"cola": {"matthews_corrcoef": 0.5}},
             facts={"trainable_params": 3e6, "wall_s": 180.0}, extra={"examples_per_s": 10.0})
    fake_run(runs, "lora", {"sst2": {"accuracy": 0.85}}, facts={})  # a partial run: no mean
    (runs / "soft").mkdir()  # not finished: no row
    fake_run(tmp_path / "reference", "rte", {"rte": {"accuracy": 0.7}},
             extra={"trainable_params": 1e6, "wall_s": 30.0, "examples_per_s": 8.0})
    path = compare.write_report(str(tmp_path), METRICS,
                                ["single_sst2", "single_cola", "hard", "lora"])
    text = pathlib.Path(path).read_text()
    head = ("| setup | sst2 accuracy | cola matthews_corrcoef | rte accuracy | conll2003 f1 "
            "| mean | trainable params | wall time | examples/s |")
    # mean of hard = (90 + 40 + 60 + 80) / 4 = 67.5; examples/s = median(100, 300, 200) = 200.
    # single-task (all): params 2M + 3M, wall 60 + 180 s = 4.0 min,
    # examples/s = (50 * 60 + 10 * 180) / 240 = 20.
    expected = "\n".join([
        head, "| --- |" + " ---: |" * 8,
        "| single_sst2 | 91.00 | - | - | - | - | 2M | 1.0 min | 50.0 |",
        "| single_cola | - | 50.00 | - | - | - | 3M | 3.0 min | 10.0 |",
        "| single-task (all) | 91.00 | 50.00 | - | - | - | 5M | 4.0 min | 20.0 |",
        "| hard | 90.00 | 40.00 | 60.00 | 80.00 | 67.50 | 22.7M | 10.0 min | 200.0 |",
        "| lora | 85.00 | - | - | - | - | - | - | - |",
        "| HF PyTorch single-task (reference) | - | - | 70.00 | - | - | 1M | 0.5 min | 8.0 |",
    ])
    assert expected in text
    # the best table
    assert "| hard | 92.00 | 44.00 | 64.00 | 80.00 | 70.00 | 22.7M | 10.0 min | 200.0 |" in text
    rows = {r.name: r for r in compare.collect_rows(str(tmp_path), METRICS)}
    assert rows["hard"].curves == {"sst2": [(30, 0.8), (60, 0.9)], "rte": [(60, 0.6)]}
    # final_step 100 (fake_run): step 30 is 30 % of the run.
    assert rows["hard"].progress == {"sst2": [(0.3, 0.8), (0.6, 0.9)], "rte": [(0.6, 0.6)]}
    assert "![validation curves by progress](validation_curves_by_progress.png)" in text
    # Order: single_sst2 C0, single_cola C1, single-task (all) C2, hard C3, lora C4, reference C5.
    ordered = compare.collect_rows(str(tmp_path), METRICS,
                                   ["single_sst2", "single_cola", "hard", "lora"])
    fake_run(runs, "single_cola", {"cola": {"matthews_corrcoef": 0.5}}, facts={}, events=[
        {"step": 20, "eval/cola/matthews_corrcoef": 0.3}])
    ordered[1] = compare.load_run(str(runs / "single_cola"), "single_cola", METRICS)
    assert compare.curve_series(ordered, "cola", by_progress=True) == [
        ("single-task (all)", "C2", [(0.2, 0.3)])]
    assert compare.curve_series(ordered, "sst2") == [("hard", "C3", [(30, 0.8), (60, 0.9)])]
    for png in (compare.BAR_PLOT, compare.CURVE_PLOT, compare.PROGRESS_PLOT):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_combines_each_setups_fine_tunes_into_one_row(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "hard", {"sst2": {"accuracy": 0.9}, "cola": {"matthews_corrcoef": 0.4}},
             facts={"trainable_params": 22e6, "wall_s": 600.0})
    text = pathlib.Path(compare.write_report(str(tmp_path), METRICS, ["hard"])).read_text()
    assert "fine-tune" not in text  # no fine-tune runs: the report as it always was
    fake_run(runs, "hard_ft_sst2", {"sst2": {"accuracy": 0.92}},
             facts={"trainable_params": 2e6, "wall_s": 60.0}, extra={"examples_per_s": 50.0},
             events=[{"step": 5, "eval/sst2/accuracy": 0.91}])
    fake_run(runs, "hard_ft_cola", {"cola": {"matthews_corrcoef": 0.5}},
             facts={"trainable_params": 3e6, "wall_s": 180.0}, extra={"examples_per_s": 10.0})
    order = ["hard", "hard_ft_sst2", "hard_ft_cola"]
    text = pathlib.Path(compare.write_report(str(tmp_path), METRICS, order)).read_text()
    # params 2M + 3M, wall 60 + 180 s = 4.0 min (hard's 10 min not included),
    # examples/s = (50 * 60 + 10 * 180) / 240 = 20.
    assert "\n".join([
        "| hard | 90.00 | 40.00 | - | - | - | 22M | 10.0 min | - |",
        "| hard_ft_sst2 | 92.00 | - | - | - | - | 2M | 1.0 min | 50.0 |",
        "| hard_ft_cola | - | 50.00 | - | - | - | 3M | 3.0 min | 10.0 |",
        "| hard \N{RIGHTWARDS ARROW} fine-tune | 92.00 | 50.00 | - | - | - | 5M | 4.0 min | 20.0 |",
    ]) in text
    assert "`X \N{RIGHTWARDS ARROW} fine-tune` takes each task from its run `X_ft_<task>`" in text
    assert "X's own wall time not included" in text
    rows = {r.name: r for r in compare.collect_rows(str(tmp_path), METRICS, order)}
    assert rows["hard \N{RIGHTWARDS ARROW} fine-tune"].curves == {}  # each run draws its line
    assert compare.curve_series(list(rows.values()), "sst2") == [
        ("hard_ft_sst2", "C1", [(5, 0.91)])]


# --- end to end ------------------------------------------------------------------------------

@pytest.mark.skipif(not (REPO / "mtl_jax" / "training" / "runner.py").exists(),
                    reason="mtl_jax.main does not train yet (no mtl_jax/training/runner.py)")
@pytest.mark.slow  # test_compare_hard_then_its_fine_tune_end_to_end_tiny is the default tier's
def test_compare_end_to_end_tiny(shared_data, tmp_path):
    """Two tiny setups on RTE through real `python -m mtl_jax.main` subprocesses, then a report."""
    cmd = [sys.executable, "-m", "mtl_jax.compare",
           "--config=configs/compare.py:tiny,tasks=rte,epochs=1", f"--workdir={tmp_path}",
           "--config.compare.setups=single,lora", "--config.eval.batch_size=32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for setup in ("single_rte", "lora"):
        results = json.loads((tmp_path / "runs" / setup / "results.json").read_text())
        assert results["final_step"] == 4
        assert 0.0 <= results["final"]["rte"]["accuracy"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| single_rte ", "| lora "))]
    assert len(rows) == 4  # final and best tables
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("skipped") == 2, proc.stdout


@pytest.mark.skipif(not (REPO / "mtl_jax" / "training" / "runner.py").exists(),
                    reason="mtl_jax.main does not train yet (no mtl_jax/training/runner.py)")
def test_compare_hard_then_its_fine_tune_end_to_end_tiny(shared_data, tmp_path):
    """hard on RTE, then hard_ft_rte started from hard's last checkpoint, then the report."""
    cmd = [sys.executable, "-m", "mtl_jax.compare",
           "--config=configs/compare.py:tiny,tasks=rte,epochs=1", f"--workdir={tmp_path}",
           "--config.compare.setups=hard,hard_ft", "--config.eval.batch_size=32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = tmp_path / "runs"
    hard = json.loads((runs / "hard" / "results.json").read_text())
    assert json.loads((runs / "hard_ft_rte" / "results.json").read_text())["final_step"] == 4
    log = (runs / "hard_ft_rte" / "compare.log").read_text()
    assert (f"init_from {runs / 'hard'} step {hard['final_step']}: encoder (hard); heads rte\n"
            in log)  # the source's last step: its final params
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines()
            if line.startswith("| hard \N{RIGHTWARDS ARROW} fine-tune |")]
    assert len(rows) == 2  # final and best tables


def test_a_transfer_study_beside_the_runs_is_the_reports_last_section(tmp_path):
    from mtl_jax.compare import __main__ as compare_main

    fake_run(tmp_path / "runs", "hard", {t: {m: 0.5} for t, m in METRICS.items()})
    cells = {f"cb/{start}/k16_s{seed}": dict(task="cb", start=start, k=16, seed=seed,
                                             value=value, n_train=48, metric="accuracy")
             for start, base in (("pretrained", 0.5), ("hard", 0.6))
             for seed, value in enumerate((base, base + 0.1))}
    (tmp_path / "transfer").mkdir()
    (tmp_path / "transfer" / "transfer.json").write_text(json.dumps(
        {"protocol": {"metrics": {"cb": "accuracy"}}, "cells": cells}))
    path = compare.write_report(str(tmp_path), METRICS, ["hard"])
    compare_main._add_transfer_section(str(tmp_path), path)
    text = pathlib.Path(path).read_text()
    assert text.index("| hard |") < text.index("## Few-shot transfer") < text.index("### cb")
    assert "| `hard` | 65.00 ± 7.07 (2 seeds) |" in text  # mean and ddof=1 std of 0.6, 0.7
    assert "](transfer/transfer.png)" in text and (tmp_path / "transfer/transfer.png").is_file()
    dest = tmp_path / "published" / "results"
    published = compare.publish(str(tmp_path), str(dest), METRICS, ["hard"])
    compare_main._add_transfer_section(str(tmp_path), published, publish_to=str(dest))
    assert (dest / "transfer" / "transfer.json").is_file()
    assert "](results/transfer/transfer.png)" in pathlib.Path(published).read_text()


def test_publish_copies_finished_runs_and_writes_the_report_beside_them(tmp_path):
    work = tmp_path / "work"
    hard = fake_run(work / "runs", "hard", {"sst2": {"accuracy": 0.9}},
                    facts={"trainable_params": 5e6, "wall_s": 60.0},
                    events=[{"step": 10, "eval/sst2/accuracy": 0.8}])
    (hard / "checkpoints").mkdir()
    (hard / "checkpoints" / "big.bin").write_bytes(b"x" * 100)
    (work / "runs" / "soft").mkdir()  # unfinished: not published
    (work / "runs" / "soft" / "metrics.jsonl").write_text("")
    fake_run(work / "reference", "sst2", {"sst2": {"accuracy": 0.88}}, extra={"wall_s": 30.0})
    dest = tmp_path / "docs" / "results"
    dest.mkdir(parents=True)
    (dest / "notes.md").write_text("Made by `python -m mtl_jax.compare ...`.\n")
    path = compare.publish(str(work), str(dest), {"sst2": "accuracy"}, ["hard", "soft"])
    assert path == str(tmp_path / "docs" / "results.md")
    assert sorted(p.name for p in (dest / "runs").iterdir()) == ["hard"]
    assert sorted(p.name for p in (dest / "runs" / "hard").iterdir()) == [
        "compare.json", "metrics.jsonl", "results.json", "results.md"]
    assert (dest / "reference" / "sst2" / "results.json").exists()
    text = pathlib.Path(path).read_text()
    assert text.index("Made by `python -m mtl_jax.compare") < text.index("| hard | 90.00 |")
    assert "| HF PyTorch single-task (reference) | 88.00 |" in text
    assert "![metric by setup](results/metrics_by_setup.png)" in text
    assert (dest / compare.BAR_PLOT).read_bytes()[:4] == b"\x89PNG"
    # The published copy alone reproduces the same report.
    shutil.rmtree(work)
    assert pathlib.Path(compare.publish(str(tmp_path / "nowhere"), str(dest), {"sst2": "accuracy"},
                                        ["hard"])).read_text() == text
    with pytest.raises(UserError, match="no finished run"):
        compare.publish(str(tmp_path / "nowhere"), str(tmp_path / "empty"), {"sst2": "accuracy"})


def test_reference_schedule_is_mtl_jax_linear_schedule():
    import numpy as np

    from mtl_jax.training import optim

    total, lr = 95, 5e-5
    torch_factor = hf_reference_module().linear_warmup_decay(total, 0.1)
    ours = optim.SCHEDULES.get("linear")(lr, total, int(0.1 * total))
    # The torch LambdaLR factor at scheduler step s is applied to update s + 1; optax's count is s.
    np.testing.assert_allclose([lr * torch_factor(s) for s in range(total + 3)],
                               [float(ours(s)) for s in range(total + 3)], rtol=1e-6, atol=1e-12)


@pytest.mark.slow  # trains MiniLM in PyTorch
def test_reference_script_trains_writes_results_and_resumes(shared_data, minilm_path, tmp_path):
    """bench/hf_reference.py on the real MiniLM, 2 steps of RTE, CoNLL-2003, COPA and SQuAD (tiny
    data caps)."""
    cmd = [sys.executable, "bench/hf_reference.py", f"--workdir={tmp_path}",
           "--tasks=rte,conll2003,copa,squad", "--tiny_data", "--max_steps=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for task, metric in (("rte", "accuracy"), ("conll2003", "f1"), ("copa", "accuracy"),
                         ("squad", "f1")):
        results = json.loads((tmp_path / "reference" / task / "results.json").read_text())
        assert results["final_step"] == 2 and 0.0 <= results["final"][task][metric] <= 1.0
        assert results["trainable_params"] > 22_000_000  # the whole MiniLM + head trains
    module = hf_reference_module()
    # 2 steps are not the protocol's
    assert not module.finished(str(tmp_path / "reference" / "rte"))
    results = json.loads((tmp_path / "reference" / "rte" / "results.json").read_text())
    results["final_step"] = results["protocol_steps"]
    (tmp_path / "reference" / "rte" / "results.json").write_text(json.dumps(results))
    assert module.finished(str(tmp_path / "reference" / "rte"))
