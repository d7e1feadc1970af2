"""The distillation loss core: math only (no DeepSpeed, no transformers).

- `terms`: what a loss returns (`DistillationLossOutput`, named `LossTerms`) and the label convention.
- `dense`: per-token divergences on full logits and `dense_distillation_loss`, the readable reference.
- `fused`: `fused_distillation_loss`, chunked and optionally vocab-parallel, from hidden states and
  lm_head weights.
- `divergences`: one object per divergence: its per-token value and logit gradient.
- `chunk`, `kernels`: the named per-chunk structures and the elementwise passes over a chunk.
- `vocab_parallel`: per-token reductions across vocabulary shards.
- `logits`: what a model does to its lm_head's output (a scale, a soft cap), with its derivative.
- `hidden`: the cosine loss aligning the student's hidden states with the teacher's.

The equations are in docs/METHOD.md and, next to the code implementing them, in the docstrings.
"""

from .dense import (
    dense_distillation_loss,
    forward_kl,
    kl_sum,
    reverse_kl,
    tad_divergence,
    teacher_top_k_mask,
)
from .divergences import DIVERGENCES
from .fused import fused_distillation_loss
from .logits import IDENTITY, LogitTransform
from .terms import (
    IGNORE_INDEX,
    LOSS_SCALARS,
    LOSS_TERMS,
    STEP_SCALARS,
    DistillationLossOutput,
    LossInputs,
    LossTerms,
)

__all__ = [
    "fused_distillation_loss",
    "dense_distillation_loss",
    "DistillationLossOutput",
    "LossInputs",
    "LossTerms",
    "LogitTransform",
    "IDENTITY",
    "LOSS_TERMS",
    "LOSS_SCALARS",
    "STEP_SCALARS",
    "DIVERGENCES",
    "IGNORE_INDEX",
    "tad_divergence",
    "forward_kl",
    "reverse_kl",
    "kl_sum",
    "teacher_top_k_mask",
]
