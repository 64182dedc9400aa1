"""Flax encoders (BERT, T5), PEFT layers, task heads and the multi-task model."""
