"""The distillation terms, one small object each: its per-token value and its logit gradient.

Each divergence turns a `Chunk` (logits on this rank's vocabulary slice, per-token normalisers,
targets) into a `DivergenceTerms`: its value per token, KL(p || q) per token as a diagnostic, and
the gradient of `ce_weight * CE + divergence` with respect to the student's logits on the slice.
The gradient is formed in the same pass as the value, from the hand-derived formulas below
(docs/METHOD.md derives them), never by autograd.

    CrossEntropyOnly   "none"        no divergence: grad = ce_weight (q - onehot(y))
    ForwardKL          "forward_kl"  KL(p || q) = D1 + alpha_T D2       (vanilla KD)
    TailAware          "tad"         D1 + omega D2, omega = beta alpha_T [/ mean_seq alpha_T]
    ReverseKL          "reverse_kl"  KL(q || p)

Forward KL and TAD differ only in omega, the weight of D2; with w = omega / alpha_T their gradient
is, region by region (r, r^s as in `chunk.RegionCoefficients`),

    j in T_K:   (1 + ce_weight) q_j - p_j                                     - ce_weight [j = y]
    j in tail:  ((1 + ce_weight) alpha_S - alpha_T + omega) q~_j - omega p~_j - ce_weight [j = y]

(for forward KL, omega = alpha_T and the tail line is (1 + ce_weight) q_j - p_j as on T_K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from . import kernels
from .chunk import Chunk, RegionCoefficients

__all__ = [
    "DIVERGENCES",
    "DivergenceTerms",
    "Divergence",
    "CrossEntropyOnly",
    "ForwardKL",
    "TailAware",
    "ReverseKL",
    "make_divergence",
]


@dataclass(frozen=True)
class DivergenceTerms:
    """A divergence on one chunk: value [c], KL(p || q) [c] (None without a teacher), and the
    gradient of ce_weight * CE + value w.r.t. the slice's student logits [c, V_r] (or None)."""

    value: Tensor
    kl_to_teacher: Tensor | None
    logit_grad: Tensor | None


class Divergence:
    """The interface: a name, what the divergence needs, and `terms` on a chunk."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    needs_top_k: ClassVar[bool] = False

    @property
    def sequence_normalised(self) -> bool:
        """Whether a token's term needs its whole sequence (the chunks then hold whole ones)."""
        return False

    def terms(self, chunk: Chunk, want_grad: bool) -> DivergenceTerms:
        raise NotImplementedError


def _split_kl(
    chunk: Chunk, coefficients: RegionCoefficients | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(D1, D2, logit gradient) of the chunk, D1 and D2 over the whole vocabulary:

        D1 = sum_{T_K} p log(p / q) + alpha_T log(alpha_T / alpha_S),   D2 = sum_{tail} p~ log(p~ / q~)

    (without a top-K everything is tail: alpha = 1, D1 = 0 and D2 = KL(p || q)).
    """
    top_sum, tail_sum, grad = kernels.split_kl_pass(chunk, coefficients)
    top_sum, d2 = chunk.shards.sum_(torch.stack([top_sum, tail_sum], 1)).unbind(1)
    norm = chunk.norm
    bucket = torch.where(norm.has_tail, norm.alpha_t * (norm.log_alpha_t - norm.log_alpha_s), 0.0)
    return top_sum + bucket, d2, grad


@dataclass(frozen=True)
class CrossEntropyOnly(Divergence):
    """No distillation term. With a teacher (a top-K for the tail-mass diagnostics) its KL to the
    student is still measured, in a pass without gradient."""

    name: ClassVar[str] = "none"
    needs_teacher: ClassVar[bool] = False

    def terms(self, chunk: Chunk, want_grad: bool) -> DivergenceTerms:
        kl = None
        if chunk.teacher is not None:
            d1, d2, _ = _split_kl(chunk, None)
            kl = d1 + chunk.norm.alpha_t * d2
        grad = kernels.softmax_grad(chunk) if want_grad else None
        return DivergenceTerms(torch.zeros_like(chunk.norm.student), kl, grad)


class _TailWeighted(Divergence):
    """D1 + omega D2: forward KL and TAD, which differ only in `tail_weight` (omega)."""

    def tail_weight(self, chunk: Chunk) -> Tensor:
        raise NotImplementedError

    def terms(self, chunk: Chunk, want_grad: bool) -> DivergenceTerms:
        norm = chunk.norm
        alpha_t, alpha_s = norm.alpha_t, norm.alpha_s
        omega = self.tail_weight(chunk)
        coefficients = None
        if want_grad:
            a_top = torch.full_like(omega, 1.0 + chunk.targets.ce_weight)
            coefficients = RegionCoefficients(
                top_a=a_top,
                top_b=torch.ones_like(omega),
                tail_a=a_top * alpha_s - alpha_t + omega,
                tail_b=omega,
            )
        d1, d2, grad = _split_kl(chunk, coefficients)
        return DivergenceTerms(d1 + omega * d2, d1 + alpha_t * d2, grad)


@dataclass(frozen=True)
class ForwardKL(_TailWeighted):
    """Vanilla KD: KL(p || q) = D1 + alpha_T D2."""

    name: ClassVar[str] = "forward_kl"

    def tail_weight(self, chunk: Chunk) -> Tensor:
        return chunk.norm.alpha_t


@dataclass(frozen=True)
class TailAware(_TailWeighted):
    """TAD (the paper's Eq. 3): D1 + omega D2 with

        omega = beta alpha_T / mean_{t' in seq} alpha_T(t')    (normalize)
        omega = beta alpha_T                                  (not normalize; beta = 1: KL)

    written as a quotient so that it stays bounded (<= beta x valid tokens) however small the mean.
    """

    name: ClassVar[str] = "tad"
    needs_top_k: ClassVar[bool] = True
    beta: float
    normalize: bool

    @property
    def sequence_normalised(self) -> bool:
        return self.normalize

    def tail_weight(self, chunk: Chunk) -> Tensor:
        omega = self.beta * chunk.norm.alpha_t
        if not self.normalize:
            return omega
        mean = chunk.sequences.mean_tail_mass(chunk.norm.alpha_t)
        return omega / mean.clamp_min(torch.finfo(mean.dtype).tiny)


@dataclass(frozen=True)
class ReverseKL(Divergence):
    """KL(q || p), whose gradient is q_j (log q_j - log p_j - KL(q || p)): it needs the whole
    vocabulary's KL before any gradient, so two passes (sums, then gradient)."""

    name: ClassVar[str] = "reverse_kl"

    def terms(self, chunk: Chunk, want_grad: bool) -> DivergenceTerms:
        sums = torch.stack(kernels.reverse_kl_sums(chunk), 1)
        reverse, forward = chunk.shards.sum_(sums).unbind(1)
        grad = kernels.reverse_kl_grad(chunk, reverse) if want_grad else None
        return DivergenceTerms(reverse, forward, grad)


DIVERGENCES = tuple(d.name for d in (TailAware, ForwardKL, ReverseKL, CrossEntropyOnly))


def make_divergence(name: str, *, beta: float = 1.0, normalize: bool = True) -> Divergence:
    """The divergence called `name` (one of DIVERGENCES)."""
    if name == "tad":
        return TailAware(float(beta), bool(normalize))
    if name == "forward_kl":
        return ForwardKL()
    if name == "reverse_kl":
        return ReverseKL()
    if name == "none":
        return CrossEntropyOnly()
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {name!r}")
