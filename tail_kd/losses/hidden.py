"""Hidden-state alignment: a cosine loss between the student's and the teacher's hidden states.

The paper's continued pre-training adds it to CE + TAD. For the aligned layer pairs (i, j) in M
(teacher hidden state i, student hidden state j), teacher states h_t in R^{H_T}, student states
s_t in R^{H_S}, a map P_ij: R^{H_S} -> R^{H_T} (the identity when the widths agree, else a learned
linear projection) and the N positions t the distillation loss scores (labels[t + 1] != -100):

    L_hid = 1/|M| sum_{(i,j) in M} 1/N sum_t [1 - cos(P_ij s_t, h_t)]
    cos(a, b) = a . b / (max(|a|, eps) max(|b|, eps))

in float32 at least, whatever the models' precision. The training loss is then
ce_weight * CE + divergence + hidden_weight * L_hid, and training logs the mean cosine
1 - L_hid as `train/hidden_cosine`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["EPS", "mean_cosine", "hidden_alignment_loss"]

EPS = 1e-8  # floor of a norm: a zero state has cosine 0 with anything


def mean_cosine(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    """1/N sum_t cos(student_t, teacher_t) over the N positions where `valid` ([B, T] bool) is
    true; `student` and `teacher` are [B, T, H] (already mapped to the same width). 0 when N = 0."""
    dtype = torch.promote_types(student.dtype, torch.float32)  # bf16 -> float32; float64 stays
    a, b = student.to(dtype), teacher.to(dtype)
    norms = a.norm(dim=-1).clamp_min(EPS) * b.norm(dim=-1).clamp_min(EPS)
    cosine = (a * b).sum(-1) / norms
    return torch.where(valid, cosine, 0.0).sum() / valid.sum().clamp_min(1)


def hidden_alignment_loss(
    student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], valid: Tensor
) -> tuple[Tensor, Tensor]:
    """(L_hid, its mean cosine 1 - L_hid detached) over aligned pairs of [B, T, H_T] states, the
    student's already projected (module docstring)."""
    cosines = [
        mean_cosine(s, t, valid) for s, t in zip(student_states, teacher_states, strict=True)
    ]
    cosine = torch.stack(cosines).mean()
    return 1.0 - cosine, cosine.detach()
