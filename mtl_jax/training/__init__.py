"""Optimizer, task weighting, the jitted train/eval steps, sharding, and the training loop."""
