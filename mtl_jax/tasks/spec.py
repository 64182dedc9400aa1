"""What the model needs to know about a task, independent of where its data comes from."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task as the model sees it.

    ``index`` is the task's position in the run (its ``task_id`` in batches and the row of any
    per-task parameter stack); ``num_labels`` is 1 for regression and 2 (start/end) for
    extractive QA.
    """

    name: str
    # sequence_classification | sequence_regression | token_classification | extractive_qa |
    # multiple_choice (num_labels = its number of choices)
    type: str
    num_labels: int
    index: int
    label_names: tuple[str, ...] = ()
