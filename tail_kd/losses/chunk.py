"""What the passes over one chunk of tokens read, as named per-token structures.

A chunk is c valid token positions. This rank holds the slice [c, V_r] of their logits (the whole
vocabulary on one process, a contiguous row range in a vocab-parallel group); every per-token
number here ([c] tensors) is already combined over all slices (`vocab_parallel.VocabShards`).
Notation of docs/METHOD.md: t and s are the teacher's and the student's logits, T_K the teacher's
top-K tokens (every token whose teacher logit is >= the K-th largest), the tail everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .vocab_parallel import VocabShards

__all__ = ["Normalisers", "Targets", "ChunkSequences", "Chunk", "RegionCoefficients"]


@dataclass(frozen=True)
class Normalisers:
    """Log-partition functions per token [c], over the whole vocabulary and over the tail:

        log Z_T = logsumexp_j t_j        log Z_T,tail = logsumexp_{j not in T_K} t_j
        log Z_S = logsumexp_j s_j        log Z_S,tail = logsumexp_{j not in T_K} s_j
        alpha_T = Z_T,tail / Z_T         alpha_S = Z_S,tail / Z_S

    Without a top-K the tail is the whole vocabulary (alpha = 1). A token with an empty tail (K >= V,
    or ties at the K-th value) has alpha = 0; its tail normalisers are then set to the full ones,
    which only keeps the arithmetic finite (alpha = 0 zeroes every tail term). Without a teacher
    only `student` is set.
    """

    student: Tensor
    teacher: Tensor | None = None
    student_tail: Tensor | None = None
    teacher_tail: Tensor | None = None
    has_tail: Tensor | None = None

    @classmethod
    def from_logsumexps(
        cls, teacher: Tensor, student: Tensor, teacher_tail: Tensor, student_tail: Tensor
    ) -> Normalisers:
        """From the four log-sum-exps over the whole vocabulary (tails -inf where empty)."""
        has_tail = torch.isfinite(teacher_tail) & torch.isfinite(student_tail)
        return cls(
            student=student,
            teacher=teacher,
            student_tail=torch.where(has_tail, student_tail, student),
            teacher_tail=torch.where(has_tail, teacher_tail, teacher),
            has_tail=has_tail,
        )

    @property
    def log_alpha_t(self) -> Tensor:
        return self.teacher_tail - self.teacher

    @property
    def log_alpha_s(self) -> Tensor:
        return self.student_tail - self.student

    @property
    def alpha_t(self) -> Tensor:
        """Teacher tail mass [c] (0 where the tail is empty)."""
        return torch.where(self.has_tail, self.log_alpha_t.exp(), 0.0)

    @property
    def alpha_s(self) -> Tensor:
        """Student mass on the teacher's tail [c] (0 where the tail is empty)."""
        return torch.where(self.has_tail, self.log_alpha_s.exp(), 0.0)


@dataclass(frozen=True)
class Targets:
    """The chunk's target tokens y on this rank's slice: the one-hot part of CE's gradient,
    `- ce_weight [j = y]`, belongs to the rank that owns y."""

    column: Tensor  # y's column in this slice [c] (clamped into the slice where not owned)
    owned: Tensor  # whether this rank holds y [c]
    ce_weight: float

    @classmethod
    def on_slice(cls, labels: Tensor, shards: VocabShards, ce_weight: float) -> Targets:
        """Global token ids [c] -> their place in this rank's slice."""
        column, owned = shards.local_labels(labels)
        return cls(column, owned, ce_weight)

    def one_hot_weight(self, dtype: torch.dtype) -> Tensor:
        """ce_weight where this rank owns y, else 0 [c]."""
        return self.ce_weight * self.owned.to(dtype)


@dataclass(frozen=True)
class ChunkSequences:
    """Which sequence each token of the chunk belongs to, for TAD's sequence normalisation.

    A chunk holds whole sequences, except a sequence longer than a chunk, whose mean teacher
    tail mass a teacher-only pre-pass computed before any chunk (`prepass_mean`, NaN for the
    others).
    """

    ids: Tensor  # the sequence of each token [c]
    tokens: Tensor  # valid tokens per sequence [B]
    prepass_mean: Tensor  # mean alpha_T of long sequences [B], NaN elsewhere

    def mean_tail_mass(self, alpha_t: Tensor) -> Tensor:
        """mean_{t' in seq(t)} alpha_T(t') for each token t [c]: from the pre-pass, or from this
        chunk, which then holds all of the sequence's valid tokens."""
        sums = torch.zeros_like(self.prepass_mean).index_add_(0, self.ids, alpha_t)
        in_chunk = sums / self.tokens.clamp_min(1)
        return torch.where(self.prepass_mean.isnan(), in_chunk, self.prepass_mean)[self.ids]


@dataclass(frozen=True)
class Chunk:
    """One chunk's raw logits on this rank's slice, and the per-token numbers every pass reads."""

    student: Tensor  # s [c, V_r], in the weights' dtype (bf16 on GPU): passes upcast as they read
    teacher: Tensor | None  # t [c, V_r], None for CE without a teacher
    # The teacher's K-th largest logit over the whole vocabulary [c]; None without a top-K.
    threshold: Tensor | None
    norm: Normalisers
    targets: Targets
    sequences: ChunkSequences | None  # only for TAD's sequence normalisation
    shards: VocabShards
    dtype: torch.dtype  # of the math: float32 (float64 for float64 weights)

    def top(self) -> Tensor | None:
        """T_K on this slice [c, V_r] (None without a top-K: everything is tail)."""
        if self.threshold is None:
            return None
        return self.teacher.to(self.dtype) >= self.threshold.unsqueeze(-1)


@dataclass(frozen=True)
class RegionCoefficients:
    """A logit gradient of the form A r^s_j - B r_j, with (A, B) per token [c] and per region:

        r_j = p_j on T_K,  p~_j = p_j / alpha_T on the tail     (teacher, relative to its region)
        r^s_j = q_j on T_K,  q~_j = q_j / alpha_S on the tail   (student)

    `kernels.split_kl_pass` forms it (minus CE's one-hot part) in the pass that sums the terms.
    """

    top_a: Tensor
    top_b: Tensor
    tail_a: Tensor
    tail_b: Tensor
