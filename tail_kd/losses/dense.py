"""Per-token divergences on full logits: the readable reference.

Everything here materialises [B, T, V] probabilities and is differentiated by autograd. It is the
specification the fused loss (`fused.py`) is tested against, and the loss of choice for small
vocabularies or debugging (`dense_distillation_loss`, the trainer's `--reference-loss`). Notation
follows docs/METHOD.md, for one position t:

    p, q     teacher and student next-token distributions (softmax of the logits)
    T_K      the teacher's top-K tokens: every token whose teacher logit is >= the K-th largest
             (with distinct logits exactly K tokens; ties at the K-th value are all kept)
    alpha_T  = sum_{i not in T_K} p_i          teacher tail mass
    alpha_S  = sum_{i not in T_K} q_i          student mass on the teacher's tail
    p~, q~   the tails renormalised: p~_i = p_i / alpha_T, q~_i = q_i / alpha_S  (i not in T_K)

    D1 = sum_{i in T_K} p_i log(p_i / q_i) + alpha_T log(alpha_T / alpha_S)   (K+1 categories)
    D2 = sum_{i not in T_K} p~_i log(p~_i / q~_i)                              (the tails)
    KL(p || q) = D1 + alpha_T * D2                                            (exact identity)

The tail-aware divergence (the paper's Eq. 3) re-weights the tail term:

    L_DIV(t) = D1(t) + beta * alpha_T(t) / mean_t'(alpha_T(t')) * D2(t)       (normalize=True)
    L_DIV(t) = D1(t) + beta * alpha_T(t) * D2(t)                              (normalize=False)

where the mean runs over the valid positions t' of the same sequence. With normalize=False and
beta=1, L_DIV is exactly KL(p || q). A position whose tail is empty (K >= V) has alpha_T = 0 and
contributes no tail term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .logits import IDENTITY, LogitTransform
from .terms import IGNORE_INDEX, DistillationLossOutput, LossTerms

__all__ = [
    "kl_sum",
    "teacher_top_k_mask",
    "tail_weight",
    "tad_divergence",
    "forward_kl",
    "reverse_kl",
    "dense_distillation_loss",
]


def kl_sum(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_j p_j (log p_j - log q_j) over the last dimension, with 0 log 0 = 0.

    The one place KL is written: the dense functions here, the fused passes (on a vocabulary
    slice it is that slice's partial sum) and the evaluation metrics call it.
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def validate_tad_args(k: int | None, beta: float) -> None:
    """Raise a ValueError naming the argument when K or beta is impossible."""
    if k is None or isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer (the teacher's top-K), got {k!r}")
    if not beta >= 0:  # also rejects NaN
        raise ValueError(f"beta must be >= 0 (the tail weight), got {beta!r}")


def teacher_top_k_mask(teacher_logits: Tensor, k: int) -> Tensor:
    """Boolean mask of T_K: logits >= the K-th largest logit of the position (K >= V: all tokens)."""
    k = min(k, teacher_logits.shape[-1])
    kth_largest = teacher_logits.topk(k, dim=-1).values[..., -1:]
    return teacher_logits >= kth_largest


def tail_weight(alpha_t: Tensor, mask: Tensor, beta: float, normalize: bool) -> Tensor:
    """The factor in front of D2: beta * alpha_T, divided by the sequence's mean alpha_T if normalize.

    alpha_t, mask: [B, T]. The mean runs over the valid positions of each sequence (a row). Written
    as beta * alpha_T / mean so that it stays bounded (<= beta * #valid) however small the mean is.
    """
    weight = beta * alpha_t
    if normalize:
        valid = mask.to(alpha_t.dtype)
        count = valid.sum(-1, keepdim=True).clamp_min(1)
        mean = (alpha_t * valid).sum(-1, keepdim=True) / count
        weight = weight / mean.clamp_min(torch.finfo(alpha_t.dtype).tiny)
    return weight


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_shapes(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same [B, T, V] shape"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask {tuple(mask.shape)} must be [B, T] = {tuple(student_logits.shape[:-1])}"
        )


def tad_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    k: int,
    beta: float,
    normalize: bool = True,
) -> Tensor:
    """Per-token tail-aware divergence L_DIV [B, T] (0 where mask is False). See the module docstring.

    Math runs in float32 (float64 when given float64).
    """
    validate_tad_args(k, beta)
    _check_shapes(student_logits, teacher_logits, mask)
    dtype = _compute_dtype(teacher_logits)
    log_p = teacher_logits.to(dtype).log_softmax(-1)
    log_q = student_logits.to(dtype).log_softmax(-1)
    top = teacher_top_k_mask(teacher_logits, k)
    has_tail = ~top.all(-1)

    # Tail masses in log space: log alpha = logsumexp over the tail of log p (resp. log q). A row
    # with an empty tail (K >= V, or ties) takes the logsumexp of zeros instead of -inf entries, so
    # that neither the value nor the gradient turns NaN; alpha_T = 0 there zeroes the tail terms.
    fill = torch.where(has_tail, float("-inf"), 0.0).to(dtype).unsqueeze(-1)
    safe_log_alpha_t = torch.where(top, fill, log_p).logsumexp(-1)
    safe_log_alpha_s = torch.where(top, fill, log_q).logsumexp(-1)
    alpha_t = torch.where(has_tail, safe_log_alpha_t.exp(), 0.0)

    # D1: the K top tokens one by one, plus the tail bucket.
    p = log_p.exp()
    d1_top = torch.where(top, p * (log_p - log_q), 0.0).sum(-1)
    d1_bucket = alpha_t * (safe_log_alpha_t - safe_log_alpha_s)

    # D2: KL between the renormalised tails. T_K entries are set to log 1 - log 1 = 0 before the
    # exp (not after), so that a huge p_i / alpha_T on T_K cannot overflow into the gradient.
    log_p_tilde = torch.where(top, 0.0, log_p - safe_log_alpha_t.unsqueeze(-1))
    log_q_tilde = torch.where(top, 0.0, log_q - safe_log_alpha_s.unsqueeze(-1))
    d2 = (log_p_tilde.exp() * (log_p_tilde - log_q_tilde)).sum(-1)

    divergence = d1_top + d1_bucket + tail_weight(alpha_t, mask, beta, normalize) * d2
    return torch.where(mask, divergence, 0.0)


def _kl(p_logits: Tensor, q_logits: Tensor, mask: Tensor) -> Tensor:
    """Per-token KL(softmax(p_logits) || softmax(q_logits)) [B, T], 0 where mask is False."""
    dtype = _compute_dtype(p_logits)
    log_p = p_logits.to(dtype).log_softmax(-1)
    log_q = q_logits.to(dtype).log_softmax(-1)
    return torch.where(mask, kl_sum(log_p, log_q), 0.0)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Per-token KL(p || q) = sum_i p_i log(p_i / q_i) [B, T] (0 where mask is False)."""
    _check_shapes(student_logits, teacher_logits, mask)
    return _kl(teacher_logits, student_logits, mask)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Per-token KL(q || p) = sum_i q_i log(q_i / p_i) [B, T] (0 where mask is False)."""
    _check_shapes(student_logits, teacher_logits, mask)
    return _kl(student_logits, teacher_logits, mask)


def dense_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    labels: Tensor,
    *,
    divergence: str = "tad",
    k: int | None = None,
    beta: float = 1.0,
    normalize: bool = True,
    ce_weight: float = 1.0,
    vocab_size: int | None = None,
    student_transform: LogitTransform = IDENTITY,
    teacher_transform: LogitTransform = IDENTITY,
) -> DistillationLossOutput:
    """What `fused_distillation_loss` computes (same arguments, same output), from full logits
    with the per-token functions above and autograd: the reference it is tested against.

    Logits are made in the inputs' dtype (as the fused loss's matmuls are), everything after in
    float32, or float64 for float64 inputs (the transforms too). Rows from `vocab_size` on are
    padding, left out.
    """
    dtype = _compute_dtype(student_hidden)
    labels = labels.to(student_hidden.device)  # the fused loss also takes host labels
    mask = labels != IGNORE_INDEX
    s_logits = student_transform((student_hidden @ student_weight[:vocab_size].T).to(dtype))
    t_logits = None
    if teacher_hidden is not None:
        t_logits = teacher_transform((teacher_hidden @ teacher_weight[:vocab_size].T).to(dtype))
    ce = F.cross_entropy(
        s_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(labels)
    if divergence == "tad":
        per_token = tad_divergence(s_logits, t_logits, mask, k=k, beta=beta, normalize=normalize)
    elif divergence == "forward_kl":
        per_token = forward_kl(s_logits, t_logits, mask)
    elif divergence == "reverse_kl":
        per_token = reverse_kl(s_logits, t_logits, mask)
    else:
        per_token = torch.zeros_like(ce)
    num_tokens = int(mask.sum())
    loss = (torch.where(mask, ce_weight * ce + per_token, 0.0)).sum() / max(num_tokens, 1)
    nan = torch.full_like(ce, float("nan"))
    kl = nan if t_logits is None else forward_kl(s_logits, t_logits, mask)
    alpha_t = alpha_s = nan
    if t_logits is not None and k is not None:
        tail = ~teacher_top_k_mask(t_logits, k)
        alpha_t = (t_logits.softmax(-1) * tail).sum(-1)
        alpha_s = (s_logits.softmax(-1) * tail).sum(-1)
    per_position = LossTerms(ce, per_token, kl, alpha_t, alpha_s).stack().detach()  # [B, T, 5]
    means = torch.where(mask.unsqueeze(-1), per_position, 0.0).sum((0, 1)) / max(num_tokens, 1)
    return DistillationLossOutput(loss, LossTerms.unstack(means), num_tokens)
