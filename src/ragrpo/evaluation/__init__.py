"""Evaluation: base against tuned on held-out prompts (`evaluate`, with the training curves), on a
from-index run's held-out documents (`from_index`), and gold answers and their scoring (`gold`)."""
