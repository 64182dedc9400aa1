"""Metrics (a registry), QA post-processing and evaluation reports."""
