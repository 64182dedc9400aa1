"""Few-shot transfer: how well does a starting point learn a new task from k examples per class?

  python -m mtl_jax.transfer --config=configs/transfer.py[:tiny] --workdir=DIR \
      [--task=cb,trec] [--from=[LABEL=]DIR[:best|latest|STEP],...] [--shots=16,64,256,all] \
      [--seeds=0,1,2] [--all_seeds] [--config.KEY=VALUE ...] [--report_only | --publish=DEST]

Cells: every task x starting point (always ``pretrained``, the plain encoder; plus each --from
run, through ``model.init_from``; its label defaults to the directory's name) x k x seed; ``all``
(the whole train split) runs with the first seed only unless --all_seeds. Each cell is its own
run directory ``DIR/cells/<task>/<start>/k<k>_s<seed>``, trained by ``python -m mtl_jax.main`` in
a subprocess (its log: transfer.log there). When it finishes, its result goes into
``DIR/transfer.json`` (atomically) and its checkpoints are deleted. Running the command again
resumes: recorded cells are skipped, a half-done one is relaunched (and resumes from its
checkpoint); a recorded or half-done cell made with other settings (config arg, overrides, --from
source, step budget) is refused before anything runs, and so is a --from source that does not fit
the cells' model (read and mapped, dry, first). SIGTERM or Ctrl-C stops the study once the running
job has saved. Then ``DIR/report.md`` and ``DIR/transfer.png`` (the metric against the number of
train examples) are written from transfer.json alone.
``--publish=docs/transfer`` copies transfer.json, the report, its plot and each cell's small files
there; ``cp docs/transfer/transfer.json DIR2/`` seeds a study that continues elsewhere.
``--config.*`` overrides given here go to every cell's run (``tasks.<t>.*`` only to t's cells).
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mtl_jax import cli
from mtl_jax.errors import UserError, user_errors
from mtl_jax.transfer import driver, plan, report

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/transfer.py[:tiny,tasks=a+b,data_dir=PATH]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Study directory (cells/, transfer.json, report.md, plot).")
_TASK = flags.DEFINE_string("task", "",
                            "Comma-separated tasks; empty: every task of transfer.metrics.")
_FROM = flags.DEFINE_list("from", [], "Starting points besides pretrained: "
                          "[LABEL=]DIR[:best|latest|STEP], comma-separated.")
_SHOTS = flags.DEFINE_string("shots", "16,64,256,all", "k values (examples per class) or all.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Seeds of each k (init, data order, subset).")
_ALL_SEEDS = flags.DEFINE_bool("all_seeds", False, "Run k=all with every seed (default: first).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only (re)write report.md and the plot from DIR/transfer.json.")
_PUBLISH = flags.DEFINE_string(
    "publish", None, "DEST: copy transfer.json, the report, its plot and each cell's results "
    "(no checkpoints) from DIR to DEST, e.g. --publish=docs/transfer.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    with user_errors(verbose=_VERBOSE.value):
        config = _CONFIG.value
        if "transfer" not in config:
            raise UserError("the config has no transfer section; use "
                            "--config=configs/transfer.py[:tiny]")
        if not _WORKDIR.value:
            raise UserError("--workdir is not set; pass --workdir=DIR (the study's cells and "
                            "report)")
        cells, starts = _cells(config)  # bad lists are refused before anything runs
        if _PUBLISH.value:
            print(f"[transfer] wrote {report.publish(_WORKDIR.value, _PUBLISH.value)}")
            return
        if _REPORT_ONLY.value:
            print(f"[transfer] wrote {report.write_report(_WORKDIR.value)}")
            return
        _quiet_library_logs()
        plan.check_starts(config, starts, cells[0].task)
        statuses = driver.run_transfer(config, _config_file(), _WORKDIR.value, cells,
                                       _user_overrides())
        _finish(statuses)


def _cells(config) -> tuple[list, list]:
    tasks = plan.parse_tasks(_TASK.value, config)
    shots, seeds = plan.parse_shots(_SHOTS.value), plan.parse_seeds(_SEEDS.value)
    starts = plan.parse_starts(_FROM.value)
    return plan.plan_cells(tasks, starts, shots, seeds, _ALL_SEEDS.value), starts


def _quiet_library_logs() -> None:
    """As a training job: orbax logs every checkpoint read (check_starts reads each --from) at
    INFO, and a failed one with a traceback that init_from reports in one line itself."""
    from absl import logging as absl_logging

    from mtl_jax.training import runner

    absl_logging.set_verbosity(absl_logging.WARNING)
    if not _VERBOSE.value:
        runner.quiet_library_logs()


def _config_file() -> str:
    name = config_flags.get_config_filename(flags.FLAGS[_CONFIG.name])
    return name.split(".py:", 1)[0] + ".py" if ".py:" in name else name


def _user_overrides() -> dict:
    """The --config.* overrides (the cells get them; transfer.* steers this driver only)."""
    values = config_flags.get_override_values(flags.FLAGS[_CONFIG.name])
    return {k: v for k, v in values.items() if not k.startswith("transfer.")}


def _finish(statuses: dict) -> None:
    """Exit 0 when stopped by a signal (like a training job; the log says how to resume) or
    done; a failed cell is one error line (exit 2)."""
    if any(s.startswith("stopped") for s in statuses.values()):
        return
    failed = [n for n, s in statuses.items() if s.startswith("failed")]
    if failed:
        raise UserError(f"cell(s) {', '.join(failed)} failed (see DIR/cells/<cell>/transfer.log); "
                        f"fix the cause and rerun the same command to resume")


if __name__ == "__main__":
    cli.run(main)
