"""Weights in and out: Hugging Face conversion and orbax training checkpoints."""
