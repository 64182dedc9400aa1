"""Single-task vs multi-task vs PEFT on the same tasks and budget, and the report comparing them.

  python -m mtl_jax.compare --config=configs/compare.py[:tiny] --workdir=DIR \
      [--config.KEY=VALUE ...] [--sweep='optim.lr=3e-5,5e-5' ...] [--report_only | --publish=DEST]

Each setup is its own run directory ``DIR/runs/<setup>``, trained by ``python -m mtl_jax.main`` in
a subprocess (isolated, and resumable on its own: the job restarts from its latest checkpoint).
Running the command again resumes the comparison: a setup whose results.json exists is skipped, a
half-done one is relaunched (and resumes); SIGTERM or Ctrl-C stops the driver once the running
job has saved a checkpoint (its time still counted). Then ``DIR/report.md`` and its PNG plots are
written, from each run's results.json / metrics.jsonl only (plus ``DIR/reference/<task>/`` from
bench/hf_reference.py when present). ``--publish=docs/results`` copies the finished runs' small
files (no checkpoints) into ``docs/results/`` and writes ``docs/results.md`` from them: the report
in the repo, reproducible from what it commits, and the seed of a comparison resumed elsewhere.

Setups (``compare.setups``): ``single`` (one single-task run per task), ``hard``, ``soft``,
``prefix``, ``adapters``, ``lora``; each ``--sweep=KEY=V1,V2`` value adds one setup on top of
``compare.sweep_base``. Knowledge transfer: ``<X>_ft`` (e.g. ``hard_ft``) fine-tunes each task
from setup X's final params, the row ``X → fine-tune``; ``reptile``, ``fomaml`` (meta-learning,
``compare.meta``) and ``meta_weights`` (``weighting.name=meta``, ``compare.meta_weights``) are
multi-task setups like hard. A few-shot study run with ``python -m mtl_jax.transfer
--workdir=DIR/transfer`` becomes the report's last section (and is published with it).
``--config.*`` overrides given here go to every run.
"""
from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from mtl_jax import cli
from mtl_jax.compare.driver import run_comparison
from mtl_jax.compare.plan import plan, protocol_metrics
from mtl_jax.compare.report import REPORT, publish, write_report
from mtl_jax.errors import UserError, user_errors
from mtl_jax.transfer import plan as transfer_plan
from mtl_jax.transfer import report as transfer_report

TRANSFER_DIR = "transfer"  # DIR/transfer: a few-shot transfer study, reported with the rows

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/compare.py[:tiny,tasks=a+b,epochs=N]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Comparison directory (runs/<setup>, report.md, plots).")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "KEY=V1,V2: one more setup per value (on compare.sweep_base).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only (re)write report.md and the plots from DIR.")
_PUBLISH = flags.DEFINE_string(
    "publish", None, "DEST: copy the finished runs' results (no checkpoints) from DIR to DEST/ and "
    "write the report as DEST.md, e.g. --publish=docs/results.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    with user_errors(verbose=_VERBOSE.value):
        config = _CONFIG.value
        if "compare" not in config:
            raise UserError("the config has no compare section; use "
                            "--config=configs/compare.py[:tiny]")
        if not _WORKDIR.value:
            raise UserError("--workdir is not set; pass --workdir=DIR (the comparison's runs and "
                            "report)")
        order = [s.name for s in plan(config, _SWEEP.value)]
        if _PUBLISH.value:
            path = publish(_WORKDIR.value, _PUBLISH.value, protocol_metrics(config), order)
            _add_transfer_section(_WORKDIR.value, path, publish_to=_PUBLISH.value)
            print(f"[compare] wrote {path}")
            return
        if _REPORT_ONLY.value:
            path = write_report(_WORKDIR.value, protocol_metrics(config), order)
            _add_transfer_section(_WORKDIR.value, path)
            print(f"[compare] wrote {path}")
            return
        _compare(config)


def _add_transfer_section(workdir: str, report_path: str, publish_to: str | None = None) -> None:
    """A few-shot transfer study in ``DIR/transfer`` (``python -m mtl_jax.transfer
    --workdir=DIR/transfer``) becomes the report's last section; published beside the runs."""
    study = os.path.join(workdir, TRANSFER_DIR)
    if not os.path.isfile(os.path.join(study, transfer_plan.RECORD)):
        return
    if publish_to:
        transfer_report.publish(study, os.path.join(publish_to, TRANSFER_DIR))
        study = os.path.join(publish_to, TRANSFER_DIR)
    text = transfer_report.section(study, os.path.dirname(os.path.abspath(report_path)))
    with open(report_path, "a", encoding="utf-8") as f:
        f.write("\n" + text + "\n")


def _compare(config) -> None:
    """Runs the setups not finished yet, then says where the report is (or which setups failed)."""
    config_flag = flags.FLAGS[_CONFIG.name]
    # compare.* steers this driver only; the training jobs get every other override.
    user = {k: v for k, v in config_flags.get_override_values(config_flag).items()
            if not k.startswith("compare.")}
    config_file = config_flags.get_config_filename(config_flag)  # "path.py:arg" -> "path.py"
    if ".py:" in config_file:
        config_file = config_file.split(".py:", 1)[0] + ".py"
    statuses = run_comparison(config, config_file, _WORKDIR.value, user, _SWEEP.value)
    if any(s.startswith("stopped") for s in statuses.values()):
        return  # like a training job stopped by a signal: exit 0, the log line says how to resume
    report = os.path.join(os.path.abspath(_WORKDIR.value), REPORT)
    _add_transfer_section(_WORKDIR.value, report)
    print(f"[compare] wrote {report}")
    failed = [n for n, s in statuses.items() if s.startswith("failed")]
    if failed:
        raise UserError(f"setup(s) {', '.join(failed)} failed (see DIR/runs/<setup>/compare.log); "
                        f"fix the cause and rerun the same command to resume")


if __name__ == "__main__":
    cli.run(main)
