"""Loop parts that need no model: preemption flag, metrics writer, early stopping, FLOPs/MFU,
results files. Expected numbers are computed by hand in the comments."""
import json
import os
import signal
import struct
import types

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs.base import get_base_config
from mtl_jax.errors import UserError
from mtl_jax.training import flops
from mtl_jax.training.early_stopping import EarlyStopping, select_metric
from mtl_jax.training.metrics_writer import MetricsWriter, flatten_metrics, read_metrics
from mtl_jax.training.preemption import PreemptionGuard
from mtl_jax.training.results import write_results

# --- preemption ------------------------------------------------------------------------------


def test_sigterm_sets_the_flag_and_previous_handler_comes_back():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.received == signal.SIGTERM
        assert guard.should_stop()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_second_sigint_interrupts_a_stuck_run():
    previous = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


# --- metrics writer --------------------------------------------------------------------------


def read_tfrecords(path):
    """Events of a TensorBoard file (TFRecord: u64 length, u32 crc, data, u32 crc)."""
    events = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event()
            event.ParseFromString(f.read(length))
            f.read(4)
            events.append(event)
    return events


def tb_events(workdir):
    folder = os.path.join(workdir, "tensorboard")
    return [e for name in sorted(os.listdir(folder))
            for e in read_tfrecords(os.path.join(folder, name))]


def test_flatten_metrics_namespaces_and_converts_to_python_floats():
    flat = flatten_metrics({"train": {"loss": jnp.float32(0.5), "loss/sst2": np.float64(0.25)},
                            "eval": {"sst2": {"accuracy": np.int64(1)}}})
    assert flat == {"train/loss": 0.5, "train/loss/sst2": 0.25, "eval/sst2/accuracy": 1.0}
    assert all(type(v) is float for v in flat.values())


def test_metrics_jsonl_and_tensorboard_content(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True) as writer:
        writer.write(10, {"train/loss": jnp.asarray(0.75), "train/loss/sst2": np.float32(0.5)})
        writer.write(20, {"eval": {"sst2": {"accuracy": 0.875}}})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "train/loss": 0.75, "train/loss/sst2": 0.5},
        {"step": 20, "eval/sst2/accuracy": 0.875}]
    scalars = [(e.step, v.tag, round(v.simple_value, 6))
               for e in tb_events(str(tmp_path)) for v in e.summary.value]
    assert scalars == [(10, "train/loss", 0.75), (10, "train/loss/sst2", 0.5),
                       (20, "eval/sst2/accuracy", 0.875)]


def test_resume_drops_events_after_the_restored_step(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True) as writer:
        for step in (10, 20, 30):
            writer.write(step, {"train/loss": step / 100})
            writer.write(step, {"eval/rte/accuracy": step / 40})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "train/lo')  # torn line of a killed run
    # The run restarts from the checkpoint at step 20: steps 30, 40 are logged again.
    with MetricsWriter(str(tmp_path), resume_step=20, enabled=True) as writer:
        writer.write(30, {"train/loss": 0.33})
    events = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert events == [{"step": 10, "train/loss": 0.1}, {"step": 10, "eval/rte/accuracy": 0.25},
                      {"step": 20, "train/loss": 0.2}, {"step": 20, "eval/rte/accuracy": 0.5},
                      {"step": 30, "train/loss": 0.33}]
    # TensorBoard: one file per writer, each starting with a purge marker: the fresh start's at
    # step 0 (drops whatever an earlier run left), the resumed one's at 21 (TB drops the first
    # file's later steps). The first file is kept even when both open within the same second.
    starts = [e.step for e in tb_events(str(tmp_path))
              if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [0, 21]
    assert len(os.listdir(tmp_path / "tensorboard")) == 2


def test_fresh_start_in_an_old_workdir_clears_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "train/loss": 1.0}\n')
    with MetricsWriter(str(tmp_path), resume_step=None, enabled=True, tensorboard=False) as w:
        w.write(1, {"train/loss": 2.0})
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "train/loss": 2.0}]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "run"), enabled=False)
    assert writer.write(1, {"a": 1}) == {"a": 1.0}
    assert not (tmp_path / "run").exists()


# --- early stopping --------------------------------------------------------------------------


def run_evals(stopper, values, every=100):
    """Feeds one value per evaluation; returns (state, step at which it stopped or None)."""
    for i, value in enumerate(values, start=1):
        stopper = stopper.update(i * every, value)
        if stopper.should_stop:
            return stopper, i * every
    return stopper, None


VALUES = [0.50, 0.60, 0.60, 0.55, 0.70, 0.65, 0.64, 0.80]


def test_early_stopping_patience_two_stops_at_fourth_evaluation():
    # 0.50 best; 0.60 best; 0.60 tie = no improvement (1); 0.55 (2) -> stop at eval 4.
    stopper, stopped_at = run_evals(EarlyStopping("rte/accuracy", patience=2), VALUES)
    assert stopped_at == 400
    assert (stopper.best_value, stopper.best_step) == (0.60, 200)


def test_early_stopping_patience_three_never_stops_and_tracks_best():
    # 0.55 (2 bad), 0.70 best at 500, 0.65 (1), 0.64 (2), 0.80 best at 800.
    stopper, stopped_at = run_evals(EarlyStopping("mean", patience=3), VALUES)
    assert stopped_at is None
    assert (stopper.best_value, stopper.best_step) == (0.8, 800)
    assert stopper.evals_without_improvement == 0


def test_early_stopping_min_delta_and_min_mode():
    # min_delta 0.05: 0.54 is not > 0.55 (1 bad); 0.56 > 0.55 best at 300; 0.58 not > 0.61 (1).
    stopper, stopped_at = run_evals(EarlyStopping(patience=2, min_delta=0.05),
                                    [0.5, 0.54, 0.56, 0.58])
    assert stopped_at is None and (stopper.best_value, stopper.best_step) == (0.56, 300)
    # min mode on a loss: 1.0 best, 0.8 best, 0.9 (1), nan (2) -> stop at eval 4.
    stopper, stopped_at = run_evals(EarlyStopping(patience=2, mode="min"),
                                    [1.0, 0.8, 0.9, float("nan")])
    assert stopped_at == 400 and stopper.best_value == 0.8


def test_patience_zero_never_stops():
    stopper, stopped_at = run_evals(EarlyStopping(patience=0), [0.9, 0.1, 0.1, 0.1, 0.1])
    assert stopped_at is None and stopper.evals_without_improvement == 4


def test_early_stopping_state_round_trips_through_json():
    config = get_base_config()
    config.train.early_stopping_patience = 2
    stopper, _ = run_evals(EarlyStopping.from_config(config), VALUES[:3])
    saved = json.loads(json.dumps(stopper.state_dict()))
    resumed = EarlyStopping.from_config(config).restore(saved)
    assert resumed == stopper
    assert resumed.update(400, 0.55).should_stop  # continues the count: 2 without improvement


def test_select_metric_one_task_or_mean_of_primary_metrics():
    evals = {"sst2": {"accuracy": 0.9, "f1": 0.8}, "cola": {"mcc": 0.4, "accuracy": 0.7}}
    primary = {"sst2": "accuracy", "cola": "mcc"}
    assert select_metric(evals, "cola/accuracy") == 0.7
    assert select_metric(evals, "mean", primary) == pytest.approx((0.9 + 0.4) / 2)
    with pytest.raises(UserError, match="valid: mean, cola/accuracy, cola/mcc, sst2/accuracy"):
        select_metric(evals, "rte/accuracy")
    with pytest.raises(UserError, match="no primary metric known for task"):
        select_metric(evals, "mean", {"sst2": "accuracy"})


# --- FLOPs / MFU -----------------------------------------------------------------------------


def test_flops_formula_by_hand():
    # N=1000, L=2, d=32, s=16: 6*1000 + 12*2*32*16 = 6000 + 12288 = 18288 per token.
    assert flops.train_flops_per_token(1000, 2, 32, 16) == 18288
    assert flops.forward_flops_per_token(1000, 2, 32, 16) == 6096  # 2*1000 + 4*2*32*16
    assert flops.train_flops_per_example(1000, 2, 32, 16) == 16 * 18288


def test_non_embedding_params_by_path_and_by_labels():
    params = {
        "embeddings": {"word_embeddings": {"embedding": np.zeros((100, 32))},  # 3200
                       "position_embeddings": {"embedding": np.zeros((16, 32))},  # 512
                       "LayerNorm": {"scale": np.zeros(32), "bias": np.zeros(32)}},  # 64
        "encoder": {"layer_0": {"query": {"kernel": np.zeros((32, 32)), "bias": np.zeros(32)}}},
        "heads": {"sst2": {"kernel": np.zeros((32, 2)), "bias": np.zeros(2)}},
    }
    # 32*32 + 32 + 32*2 + 2 = 1122
    assert flops.non_embedding_params(params) == 1122
    labels = {"embeddings": {"word_embeddings": {"embedding": "embeddings"},
                             "position_embeddings": {"embedding": "embeddings"},
                             "LayerNorm": {"scale": "embeddings", "bias": "embeddings"}},
              "encoder": {"layer_0": {"query": {"kernel": "encoder", "bias": "encoder"}}},
              "heads": {"sst2": {"kernel": "heads/sst2", "bias": "heads/sst2"}}}
    assert flops.non_embedding_params(params, labels) == 1122
    assert flops.non_embedding_params({"shared": {"embedding": np.zeros((10, 4))},
                                       "encoder": {"w": np.zeros((4, 4))}}) == 16


def fake_device(platform, kind):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("platform, kind, peak", [
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12), ("gpu", "NVIDIA H200", 989e12),
    ("gpu", "NVIDIA A100-SXM4-80GB", 312e12), ("tpu", "TPU v4", 275e12),
    ("tpu", "TPU v5 lite", 197e12), ("tpu", "TPU v5p", 459e12), ("cpu", "cpu", None),
    ("gpu", "NVIDIA GeForce RTX 3090", None)])
def test_device_peak_table(platform, kind, peak):
    assert flops.device_peak_flops(fake_device(platform, kind)) == peak


def test_mfu_by_hand_and_omitted_without_peak():
    # 1000 examples/s * 292608 FLOPs = 2.92608e8 FLOPs/s over 8 * 989e12 = 7.912e15.
    value = flops.mfu(1000.0, 292608.0, 989e12, 8)
    assert value == pytest.approx(2.92608e8 / 7.912e15, rel=1e-12)
    assert flops.mfu(1000.0, 292608.0, None, 8) is None
    assert flops.device_peak_flops() is None  # the test machine is CPU


# --- results ---------------------------------------------------------------------------------


def test_results_json_and_markdown(tmp_path):
    final = {"sst2": {"accuracy": 0.9, "f1": 0.88}, "conll2003": {"f1": 0.5}}
    best = {"sst2": {"accuracy": 0.92, "f1": 0.9}, "conll2003": {"f1": 0.55}}
    report = "              precision    recall  f1-score   support\n         PER       0.60"
    json_path, md_path = write_results(str(tmp_path), final, final_step=300, best=best,
                                       best_step=200, reports={"conll2003": report},
                                       extra={"selection_metric": "mean"})
    record = json.loads(open(json_path).read())
    assert record == {"final_step": 300, "best_step": 200, "final": final, "best": best,
                      "selection_metric": "mean"}
    assert open(md_path).read() == "\n".join([
        "# Results", "",
        "## conll2003", "",
        "| metric | final (step 300) | best (step 200) |", "| --- | ---: | ---: |",
        "| f1 | 0.5000 | 0.5500 |", "",
        "```", report, "```", "",
        "## sst2", "",
        "| metric | final (step 300) | best (step 200) |", "| --- | ---: | ---: |",
        "| accuracy | 0.9000 | 0.9200 |", "| f1 | 0.8800 | 0.9000 |", ""])


def test_log_lines_start_their_own_line_under_a_live_progress_bar(capsys):
    """An eval/status line printed while the tqdm bar is drawn must not be glued to the bar."""
    import sys

    import tqdm

    from mtl_jax.training import loop

    bar = tqdm.tqdm(total=10, file=sys.stderr, disable=False, mininterval=0)
    bar.update(3)
    loop._say("step 3 eval: sst2/accuracy=0.5000")
    bar.close()
    err = capsys.readouterr().err
    before = err[:err.index("step 3 eval")]
    assert before.endswith(("\r", "\n")), repr(before[-40:])
    assert "step 3 eval: sst2/accuracy=0.5000\n" in err
