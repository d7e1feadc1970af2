"""Evaluation: held-out token metrics (CE, perplexity, top-1 accuracy, ECE, Full-ECE, KL to the
teacher) and maths accuracy, for `tail-kd eval`, the study (tools/study.py) and the trainer.

- `metrics`: the metric definitions, accumulated chunk by chunk (plain torch).
- `maths`: answer extraction, exact match, batched greedy generation on held-out problems.
- `evaluate`: models, data, the report, TensorBoard; the `tail-kd eval` command.

This file imports nothing: `tail-kd eval` checks its arguments before transformers is imported.
"""
