"""Elementwise passes over one chunk of logits [c, V_r]: pure functions.

Each function reads the raw logits of a chunk (any float dtype; math in float32 or float64) and
returns per-token partial results for this rank's vocabulary slice. Cross-rank combination happens
between them, in `fused.py`, which is why they are split where they are. With `compile=True`,
`fused.py` compiles them together with the rest of a chunk's arithmetic: each becomes one or two
fused loops over the chunk, and the float32 intermediates never exist in memory.

Notation of `fused.py`: T_K = {j : t_j >= thr} (thr = the teacher's K-th largest logit, +inf for
"no top-K"), log Z = logsumexp over V, log Z_tail = logsumexp over the tail, and

    log r_j   = t_j - (log Z_T if j in T_K else log Z_T,tail)      (log p_j on T_K, log p~_j on the tail)
    log r^s_j = s_j - (log Z_S if j in T_K else log Z_S,tail)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalisers", "tad_terms", "reverse_kl_terms", "reverse_kl_grad", "softmax_grad", "logsumexp"]


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


def normalisers(t: Tensor, s: Tensor, thr: Tensor, dtype: torch.dtype, with_tail: bool) -> Tensor:
    """[c, 4] = (log Z_T, log Z_S, log Z_T,tail, log Z_S,tail) over this slice.

    Without a top-K (with_tail=False) the tail is the whole vocabulary. Compiled, this reads the
    chunk twice (maxima, then sums) and takes one exp per logit.
    """
    if t.shape[-1] == 0:  # a vocabulary shard made only of padding rows
        return t.new_full((t.shape[0], 4), float("-inf"), dtype=dtype)
    t, s = t.to(dtype), s.to(dtype)
    if not with_tail:
        lse = [t.logsumexp(-1), s.logsumexp(-1)]
        return torch.stack(lse * 2, 1)
    top = t >= thr.unsqueeze(-1)
    (t_lse, t_tail), (s_lse, s_tail) = _region_logsumexps(t, top), _region_logsumexps(s, top)
    return torch.stack([t_lse, s_lse, t_tail, s_tail], 1)


def _minus_onehot(grad: Tensor, target: Tensor, ce_owned: Tensor) -> Tensor:
    """grad - ce_weight [j = y] on the rank owning y; ce_owned [c] = ce_weight or 0."""
    cols = torch.arange(grad.shape[-1], device=grad.device)
    return grad - torch.where(cols == target.unsqueeze(-1), ce_owned.unsqueeze(-1), 0.0)


def tad_terms(t, s, thr, norm, coef, target, ce_owned, dtype: torch.dtype, grad_dtype, want_grad: bool):
    """Sums of r log(r / r^s) over T_K and over the tail [c], and the logit gradient [c, V_r].

    norm: [c, 4] from `normalisers`. coef: [c, 4] = (A_top, B_top, A_tail, B_tail); the gradient is
    A r^s - B r, region by region, minus the one-hot part of the CE gradient, cast to grad_dtype.
    """
    t, s = t.to(dtype), s.to(dtype)
    top = t >= thr.unsqueeze(-1)
    log_r = t - torch.where(top, norm[:, 0:1], norm[:, 2:3])
    log_rs = s - torch.where(top, norm[:, 1:2], norm[:, 3:4])
    r = log_r.exp()
    pointwise = r * (log_r - log_rs)
    top_sum = torch.where(top, pointwise, 0.0).sum(-1)
    tail_sum = torch.where(top, 0.0, pointwise).sum(-1)
    if not want_grad:
        return top_sum, tail_sum, None
    a = torch.where(top, coef[:, 0:1], coef[:, 2:3])
    b = torch.where(top, coef[:, 1:2], coef[:, 3:4])
    grad = _minus_onehot(a * log_rs.exp() - b * r, target, ce_owned)
    return top_sum, tail_sum, grad.to(grad_dtype)


def reverse_kl_terms(t, s, norm, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """sum q log(q/p) and sum p log(p/q) over this slice [c]; norm [c, 4] from `normalisers`."""
    log_p = t.to(dtype) - norm[:, 0:1]
    log_q = s.to(dtype) - norm[:, 1:2]
    log_ratio = log_q - log_p
    return (log_q.exp() * log_ratio).sum(-1), -(log_p.exp() * log_ratio).sum(-1)


def reverse_kl_grad(t, s, norm, rkl, ce_weight: float, target, ce_owned, dtype, grad_dtype) -> Tensor:
    """q_j (log q_j - log p_j - KL(q||p)) + ce_weight (q_j - [j = y])  [c, V_r]."""
    log_p = t.to(dtype) - norm[:, 0:1]
    log_q = s.to(dtype) - norm[:, 1:2]
    grad = log_q.exp() * (log_q - log_p - rkl.unsqueeze(-1) + ce_weight)
    return _minus_onehot(grad, target, ce_owned).to(grad_dtype)


def softmax_grad(s, s_lse, ce_weight: float, target, ce_owned, dtype, grad_dtype) -> Tensor:
    """ce_weight (q_j - [j = y])  [c, V_r]: the gradient of CE alone."""
    grad = ce_weight * (s.to(dtype) - s_lse.unsqueeze(-1)).exp()
    return _minus_onehot(grad, target, ce_owned).to(grad_dtype)


def logsumexp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """log Z over this slice [c]."""
    return x.to(dtype).logsumexp(-1)
