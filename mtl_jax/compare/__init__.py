"""The comparison of single-task, multi-task and PEFT training (usage: ``__main__.py``).

Modules (each imports only those above it):
  plan.py      Setup, the setup kinds, plan, parse_sweep, protocol_metrics, each setup's config,
               command and trainable parameters; the directory layout (runs/, compare.json)
  plots.py     the PNG plots (matplotlib, imported only when drawing)
  report.py    RunSummary, load_run, combine, collect_rows, table, write_report, publish
  driver.py    subprocess_launcher, Stopped, run_comparison, the launch records
  __main__.py  the absl command line
"""
# The public names, re-exported so that `from mtl_jax import compare; compare.X` works.
from mtl_jax.compare.driver import (  # noqa: F401
    Stopped, record_launch, run_comparison, subprocess_launcher)
from mtl_jax.compare.plan import (  # noqa: F401
    RUN_FACTS, RUNS_DIR, SETUP_KINDS, SINGLE_COMBINED, Setup, child_command, mean_metric,
    merged_overrides, parse_sweep, plan, protocol_metrics, setup_config, trainable_params,
    with_tasks)
from mtl_jax.compare.plots import (  # noqa: F401
    BAR_PLOT, CURVE_PLOT, PROGRESS_PLOT, curve_series, plot_bars, plot_curves)
from mtl_jax.compare.report import (  # noqa: F401
    NOTES, REFERENCE_DIR, REFERENCE_ROW, REPORT, RunSummary, collect_rows, combine, load_run,
    publish, table, write_report)
