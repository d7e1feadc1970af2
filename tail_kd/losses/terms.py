"""What a distillation loss returns: the loss, its named terms, and the label convention.

Every loss of this package (the fused one, the dense reference) and everything that reports on
one (the trainer, TensorBoard, the skip diagnostics) reads the terms by these names:

    ce                 -log q(y): the student's cross-entropy on the data's next token
    divergence         the distillation term: L_DIV of TAD, KL(p || q), KL(q || p), or 0 (CE only)
    kl_to_teacher      KL(p || q), whatever the objective (a diagnostic)
    teacher_tail_mass  alpha_T = 1 - P: teacher mass outside its own top-K
    student_tail_mass  alpha_S = 1 - Q: student mass on the same tokens

(notation of docs/METHOD.md). The loss is `ce_weight * ce + divergence`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "LOSS_TERMS",
    "LOSS_SCALARS",
    "STEP_SCALARS",
    "LossInputs",
    "LossTerms",
    "DistillationLossOutput",
]

IGNORE_INDEX = -100  # a label that takes no loss (prompt, padding): the Hugging Face convention


class LossInputs(NamedTuple):
    """The five tensor inputs of a distillation loss, in its argument order."""

    student_hidden: Tensor  # [B, T, Hs] final hidden states
    student_weight: Tensor  # [V_r, Hs] lm_head rows
    teacher_hidden: Tensor | None  # [B, T, Ht]
    teacher_weight: Tensor | None  # [V_r, Ht]
    labels: Tensor  # [B, T] next-token targets, -100 = none


@dataclass
class LossTerms:
    """The terms of the module docstring: per token ([c] each) or means over tokens (scalars)."""

    ce: Tensor
    divergence: Tensor
    kl_to_teacher: Tensor
    teacher_tail_mass: Tensor
    student_tail_mass: Tensor

    @property
    def student_topk_mass(self) -> Tensor:
        """Q: the student's probability mass on the teacher's top-K tokens."""
        return 1.0 - self.student_tail_mass

    def as_dict(self) -> dict[str, Tensor]:
        """name -> tensor, with `student_topk_mass` too (what training logs)."""
        terms = {name: getattr(self, name) for name in LOSS_TERMS}
        return {**terms, "student_topk_mass": self.student_topk_mass}

    def stack(self) -> Tensor:
        """The terms as one tensor, fields along the last dimension (for one sum, one collective)."""
        return torch.stack([getattr(self, name) for name in LOSS_TERMS], dim=-1)

    @classmethod
    def unstack(cls, stacked: Tensor) -> LossTerms:
        """Inverse of `stack`."""
        return cls(*stacked.unbind(-1))

    def without(self, *names: str) -> LossTerms:
        """These terms set to NaN: quantities a loss did not compute (no teacher, no top-K)."""
        return dataclasses.replace(self, **{n: torch.full_like(self.ce, math.nan) for n in names})


# The field names, in the order `stack` uses.
LOSS_TERMS = tuple(f.name for f in dataclasses.fields(LossTerms))
# The scalars a loss output reports (`DistillationLossOutput.scalars`).
LOSS_SCALARS = ("loss", *LOSS_TERMS, "student_topk_mass")
# What a training forward reports (tail_kd.distiller.StudentWithLoss) and training logs: those,
# and the mean cosine of the hidden-state alignment (tail_kd/losses/hidden.py; NaN when off).
STEP_SCALARS = (*LOSS_SCALARS, "hidden_cosine")


@dataclass
class DistillationLossOutput:
    """A loss over a batch: `loss` (differentiable), its `terms` as means over the valid tokens
    (detached; NaN where not computed: teacher terms without a teacher, tail masses without a
    top-K), and `num_tokens`, the number of valid tokens."""

    loss: Tensor
    terms: LossTerms
    num_tokens: int

    def scalars(self) -> dict[str, Tensor]:
        """LOSS_SCALARS by name: the loss, the terms and the student's top-K mass."""
        return {"loss": self.loss, **self.terms.as_dict()}
