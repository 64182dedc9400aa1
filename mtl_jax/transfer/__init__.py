"""Few-shot transfer: fine-tune starting points on k-shot subsets of new tasks (usage:
``__main__.py``; the protocol: ``configs/transfer.py``).

Modules (each imports only those above it; the launcher and plotting helpers are compare's):
  plan.py      the command-line lists, Start, Cell, plan_cells, check_starts (each --from read
               and mapped, dry, before any cell runs), TrainSizes, budget, each cell's overrides
               and command, the protocol text; the directory layout (cells/, transfer.json)
  plots.py     the PNG plot (matplotlib, imported only when drawing)
  report.py    the tables of DIR/report.md from transfer.json, write_report, publish
  driver.py    run_transfer: recorded cells' settings checked, each cell launched (compare's
               launch_job), recorded, its checkpoints deleted
  __main__.py  the absl command line
"""
# The public names, re-exported so that `from mtl_jax import transfer; transfer.X` works.
from mtl_jax.transfer.driver import load_record, run_transfer  # noqa: F401
from mtl_jax.transfer.plan import (  # noqa: F401
    ALL, CELL_FACTS, CELL_LOG, CELLS_DIR, PRETRAINED, RECORD, Cell, Start, TrainSizes, budget,
    cell_overrides, check_starts, child_command, parse_seeds, parse_shots, parse_start,
    parse_starts, parse_tasks, plan_cells, protocol_text)
from mtl_jax.transfer.plots import TRANSFER_PLOT, plot_transfer, transfer_figure  # noqa: F401
from mtl_jax.transfer.report import (  # noqa: F401
    REPORT, group, plot_series, publish, read_record, summary, task_table, write_report)
