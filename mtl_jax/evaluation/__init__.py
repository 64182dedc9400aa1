"""Metrics (a registry), QA post-processing and evaluation reports."""
from mtl_jax.evaluation.evaluate import evaluate_task, namespaced  # noqa: F401
from mtl_jax.evaluation.metrics import METRICS, compute_metrics  # noqa: F401
