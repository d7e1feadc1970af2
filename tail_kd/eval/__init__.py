"""Evaluation: held-out token metrics (CE, perplexity, top-1 accuracy, ECE, Full-ECE, KL to the
teacher) and maths accuracy, for `tail-kd eval`, the study (tools/study.py) and the trainer.

- `metrics`: the metric definitions, accumulated chunk by chunk (plain torch).
- `maths`: answer extraction, exact match, batched greedy generation on held-out problems.
- `evaluate`: models, data, the report, TensorBoard; the `tail-kd eval` command.
"""

from tail_kd.eval.maths import extract_answer, held_out_problems, is_correct, maths_accuracy
from tail_kd.eval.metrics import NUM_BINS, CalibrationBins, TokenMetrics, score_hidden_states

__all__ = [
    "NUM_BINS",
    "CalibrationBins",
    "TokenMetrics",
    "score_hidden_states",
    "extract_answer",
    "is_correct",
    "held_out_problems",
    "maths_accuracy",
]
