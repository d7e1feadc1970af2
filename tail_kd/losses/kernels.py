"""Elementwise passes over one chunk of logits [c, V_r]: pure functions, optionally torch.compile'd.

Each function reads the raw logits of a chunk (any float dtype; math in float32 or float64) and
returns per-token partial results for this rank's vocabulary slice. Cross-rank combination happens
between them, in `fused.py`, which is why they are split where they are. Compiled, each function
becomes one or two fused loops over the chunk, and the float32 intermediates never exist in memory.

Notation of `fused.py`: T_K = {j : t_j >= thr} (thr = the teacher's K-th largest logit, +inf for
"no top-K"), log Z = logsumexp over V, log Z_tail = logsumexp over the tail, and

    log r_j   = t_j - (log Z_T if j in T_K else log Z_T,tail)      (log p_j on T_K, log p~_j on the tail)
    log r^s_j = s_j - (log Z_S if j in T_K else log Z_S,tail)
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["Kernels"]


def logsumexp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """log Z over this slice [c]."""
    return x.to(dtype).logsumexp(-1)


def tail_logsumexp(t: Tensor, s: Tensor, thr: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """log Z_T,tail and log Z_S,tail over this slice [c] (-inf where the slice has no tail token)."""
    t, s = t.to(dtype), s.to(dtype)
    top = t >= thr.unsqueeze(-1)
    return t.masked_fill(top, float("-inf")).logsumexp(-1), s.masked_fill(top, float("-inf")).logsumexp(-1)


def tad_terms(t, s, thr, t_norm, s_norm, coef, dtype: torch.dtype, want_grad: bool):
    """Sums of r log(r / r^s) over T_K and over the tail [c], and the logit gradient [c, V_r].

    t_norm, s_norm: [c, 2] = (log Z, log Z_tail) of teacher and student.
    coef: [c, 4] = (A_top, B_top, A_tail, B_tail); the gradient is A r^s - B r, region by region.
    """
    t, s = t.to(dtype), s.to(dtype)
    top = t >= thr.unsqueeze(-1)
    log_r = t - torch.where(top, t_norm[:, :1], t_norm[:, 1:])
    log_rs = s - torch.where(top, s_norm[:, :1], s_norm[:, 1:])
    r = log_r.exp()
    pointwise = r * (log_r - log_rs)
    top_sum = torch.where(top, pointwise, 0.0).sum(-1)
    tail_sum = torch.where(top, 0.0, pointwise).sum(-1)
    if not want_grad:
        return top_sum, tail_sum, None
    a = torch.where(top, coef[:, 0:1], coef[:, 2:3])
    b = torch.where(top, coef[:, 1:2], coef[:, 3:4])
    return top_sum, tail_sum, a * log_rs.exp() - b * r


def reverse_kl_terms(t, s, lse, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """sum q log(q/p) and sum p log(p/q) over this slice [c]; lse: [c, 2] = (log Z_T, log Z_S)."""
    log_p = t.to(dtype) - lse[:, :1]
    log_q = s.to(dtype) - lse[:, 1:]
    log_ratio = log_q - log_p
    return (log_q.exp() * log_ratio).sum(-1), -(log_p.exp() * log_ratio).sum(-1)


def reverse_kl_grad(t, s, lse, rkl, ce_weight: float, dtype: torch.dtype) -> Tensor:
    """q_j (log q_j - log p_j - KL(q||p)) + ce_weight q_j  [c, V_r] (the one-hot part comes later)."""
    log_p = t.to(dtype) - lse[:, :1]
    log_q = s.to(dtype) - lse[:, 1:]
    return log_q.exp() * (log_q - log_p - rkl.unsqueeze(-1) + ce_weight)


def softmax_grad(s, s_lse, ce_weight: float, dtype: torch.dtype) -> Tensor:
    """ce_weight q_j [c, V_r]: the CE gradient without its one-hot part."""
    return ce_weight * (s.to(dtype) - s_lse.unsqueeze(-1)).exp()


class Kernels:
    """The functions above, eager or compiled (dynamic shapes: chunks differ in length)."""

    _NAMES = ("logsumexp", "tail_logsumexp", "tad_terms", "reverse_kl_terms", "reverse_kl_grad",
              "softmax_grad")

    def __init__(self, compiled: bool):
        for name in self._NAMES:
            fn = globals()[name]
            setattr(self, name, _compiled(name) if compiled else fn)


@functools.cache
def _compiled(name: str):
    return torch.compile(globals()[name], dynamic=True)
