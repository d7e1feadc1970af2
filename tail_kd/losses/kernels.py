"""Elementwise passes over one chunk of logits [c, V_r]: pure functions of a `Chunk`.

Each pass reads a chunk's raw logits (any float dtype; the math runs in `chunk.dtype`) and returns
per-token partial results for this rank's vocabulary slice; cross-rank combination happens between
passes, in `fused.py` and `divergences.py`, which is why they are split where they are. With
`compile=True` the whole chunk is one torch.compile graph: each pass becomes one or two fused loops
over the chunk, and the float32 intermediates never exist in memory.

Notation (docs/METHOD.md, `chunk.Normalisers`): for a token j of the slice,

    log r_j   = t_j - (log Z_T if j in T_K else log Z_T,tail)     log p_j on T_K, log p~_j on the tail
    log r^s_j = s_j - (log Z_S if j in T_K else log Z_S,tail)     log q_j on T_K, log q~_j on the tail
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunk import Chunk, RegionCoefficients, Targets
from .dense import kl_sum

__all__ = [
    "logsumexp",
    "normalisers",
    "split_kl_pass",
    "reverse_kl_sums",
    "reverse_kl_grad",
    "softmax_grad",
    "pick",
]


def logsumexp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """log Z over this slice [c]."""
    return x.to(dtype).logsumexp(-1)


def _region(top: Tensor | None, on_top: Tensor, on_tail: Tensor) -> Tensor:
    """`on_top` on T_K and `on_tail` on the tail (everything is tail without a top-K)."""
    return on_tail if top is None else torch.where(top, on_top, on_tail)


def _region_logsumexps(x: Tensor, top: Tensor) -> tuple[Tensor, Tensor]:
    """(logsumexp over the row, logsumexp over the tail) [c], with one exp per entry.

    Each region is shifted by its own maximum, m (the row's) and m_tail (the tail's), so a tail
    is exact however far below the top-K it lies: the sequence normalisation gives even a 1e-300
    tail full weight. An entry's exp e = exp(x - its region's shift) serves both sums:
    sum_V e^(x - m) = sum_top e + e^(m_tail - m) sum_tail e.   (-inf where the tail is empty)
    """
    m = x.amax(-1, keepdim=True)
    m_tail = torch.where(top, float("-inf"), x).amax(-1, keepdim=True)
    m_tail = torch.where(torch.isfinite(m_tail), m_tail, m)  # empty tail: any finite shift will do
    e = (x - torch.where(top, m, m_tail)).exp()
    z_top = torch.where(top, e, 0.0).sum(-1, keepdim=True)
    z_tail = torch.where(top, 0.0, e).sum(-1, keepdim=True)
    lse = (z_top + z_tail * (m_tail - m).exp()).log() + m
    return lse.squeeze(-1), (z_tail.log() + m_tail).squeeze(-1)


def normalisers(
    teacher: Tensor, student: Tensor, threshold: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """This slice's (log Z_T, log Z_S, log Z_T,tail, log Z_S,tail), stacked [c, 4] for one
    collective (`chunk.Normalisers.from_logsumexps` names the combined columns).

    Without a top-K (threshold None) the tail is the whole vocabulary. Compiled, this reads the
    chunk twice (maxima, then sums) and takes one exp per logit.
    """
    if teacher.shape[-1] == 0:  # a vocabulary shard made only of padding rows
        return teacher.new_full((teacher.shape[0], 4), float("-inf"), dtype=dtype)
    t, s = teacher.to(dtype), student.to(dtype)
    if threshold is None:
        t_lse, s_lse = t.logsumexp(-1), s.logsumexp(-1)
        return torch.stack([t_lse, s_lse, t_lse, s_lse], 1)
    top = t >= threshold.unsqueeze(-1)
    (t_lse, t_tail), (s_lse, s_tail) = _region_logsumexps(t, top), _region_logsumexps(s, top)
    return torch.stack([t_lse, s_lse, t_tail, s_tail], 1)


def _minus_one_hot(grad: Tensor, chunk: Chunk) -> Tensor:
    """grad - ce_weight [j = y] on the rank owning y, cast to the logits' dtype."""
    targets = chunk.targets
    cols = torch.arange(grad.shape[-1], device=grad.device)
    one_hot = cols == targets.column.unsqueeze(-1)
    weight = targets.one_hot_weight(chunk.dtype).unsqueeze(-1)
    return (grad - torch.where(one_hot, weight, 0.0)).to(chunk.student.dtype)


def split_kl_pass(
    chunk: Chunk, coefficients: RegionCoefficients | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """sum_{T_K} r log(r / r^s), sum_{tail} r log(r / r^s) [c] over this slice, and, given the
    `coefficients`, the logit gradient A r^s - B r - ce_weight [j = y]  [c, V_r] in the same pass.

    The first sum is D1 without its tail bucket, the second D2 (docs/METHOD.md).
    """
    norm, top = chunk.norm, chunk.top()
    t, s = chunk.teacher.to(chunk.dtype), chunk.student.to(chunk.dtype)

    def column(x: Tensor) -> Tensor:
        return x.unsqueeze(-1)

    log_r = t - _region(top, column(norm.teacher), column(norm.teacher_tail))
    log_rs = s - _region(top, column(norm.student), column(norm.student_tail))
    r = log_r.exp()
    pointwise = r * (log_r - log_rs)
    if top is None:
        top_sum, tail_sum = torch.zeros_like(norm.student), pointwise.sum(-1)
    else:
        top_sum = torch.where(top, pointwise, 0.0).sum(-1)
        tail_sum = torch.where(top, 0.0, pointwise).sum(-1)
    if coefficients is None:
        return top_sum, tail_sum, None
    c = coefficients
    a = _region(top, column(c.top_a), column(c.tail_a))
    b = _region(top, column(c.top_b), column(c.tail_b))
    return top_sum, tail_sum, _minus_one_hot(a * log_rs.exp() - b * r, chunk)


def _log_probs(chunk: Chunk) -> tuple[Tensor, Tensor]:
    """(log p, log q) on this slice [c, V_r]."""
    log_p = chunk.teacher.to(chunk.dtype) - chunk.norm.teacher.unsqueeze(-1)
    log_q = chunk.student.to(chunk.dtype) - chunk.norm.student.unsqueeze(-1)
    return log_p, log_q


def reverse_kl_sums(chunk: Chunk) -> tuple[Tensor, Tensor]:
    """sum q log(q / p) and sum p log(p / q) over this slice [c]."""
    log_p, log_q = _log_probs(chunk)
    return kl_sum(log_q, log_p), kl_sum(log_p, log_q)


def reverse_kl_grad(chunk: Chunk, reverse_kl: Tensor) -> Tensor:
    """q_j (log q_j - log p_j - KL(q || p)) + ce_weight (q_j - [j = y])  [c, V_r];
    `reverse_kl` [c] is KL(q || p) over the whole vocabulary."""
    log_p, log_q = _log_probs(chunk)
    grad = log_q.exp() * (log_q - log_p - reverse_kl.unsqueeze(-1) + chunk.targets.ce_weight)
    return _minus_one_hot(grad, chunk)


def softmax_grad(chunk: Chunk) -> Tensor:
    """ce_weight (q_j - [j = y])  [c, V_r]: the gradient of CE alone."""
    log_q = chunk.student.to(chunk.dtype) - chunk.norm.student.unsqueeze(-1)
    return _minus_one_hot(chunk.targets.ce_weight * log_q.exp(), chunk)


def pick(logits: Tensor, targets: Targets) -> Tensor:
    """logits[i, y_i] where this rank owns y_i, else 0 [c] (a slice of padding rows owns none)."""
    if logits.shape[1] == 0:
        return logits.new_zeros(logits.shape[0])
    return logits.gather(1, targets.column.unsqueeze(1)).squeeze(1) * targets.owned
