"""The fused distillation loss: lm_head matmuls + CE + TAD in token chunks, optionally vocab-parallel.

`fused_tad_loss` takes final hidden states and lm_head weights instead of logits. It walks over the
valid tokens in chunks of at most `chunk_size`, computes both models' logits for the chunk, the
per-token loss terms and, in the same pass, the gradient of the loss with respect to the student
logits, which it immediately turns into gradients for the student hidden states and lm_head weight.
Peak extra memory is a few [chunk, V] float32 buffers plus one weight-sized gradient, whatever the
number of tokens; [tokens, V] logits never exist.

Per-token quantities (notation of `dense.py`; r is a probability vector "relative to its region"):

    on T_K:      r_i = p_i,  r^s_i = q_i
    on the tail: r_i = p~_i = p_i / alpha_T,  r^s_i = q~_i = q_i / alpha_S

    D1 = sum_{T_K} r_i log(r_i / r^s_i) + alpha_T log(alpha_T / alpha_S)
    D2 = sum_{tail} r_i log(r_i / r^s_i)
    L_DIV = D1 + omega * D2,   omega = beta * alpha_T [/ mean_seq alpha_T]    (omega = alpha_T: KL)

so one elementwise pass r * (log r - log r^s), split by region, gives D1 and D2 together.
Gradient of ce_weight * CE + L_DIV with respect to a student logit z_j (METHOD.md, with
w = omega / alpha_T; lambda = 1 for a divergence, 0 for CE only):

    j in T_K:   (lambda + ce_weight) q_j - lambda p_j                         - ce_weight [j = y]
    j in tail:  ((lambda + ce_weight) alpha_S - lambda alpha_T + omega) q~_j - omega p~_j - ce_weight [j = y]

Reverse KL, KL(q || p), has gradient q_j (log q_j - log p_j - KL(q || p)).

Sequence-level normalisation needs mean alpha_T over each sequence before any gradient of that
sequence can be formed. Chunks therefore hold whole sequences; only a sequence with more than
`chunk_size` valid tokens is split, and for it a teacher-only pre-pass computes the mean first
(one extra teacher lm_head matmul for those tokens).

Vocab-parallel mode (`group`): every rank passes the same hidden states and labels and its own
contiguous row shard of both weights; the per-token reductions above cross the group through
`VocabShards`, the hidden-state gradient is all-reduced, and each rank keeps its rows' weight
gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .dense import validate_tad_args
from . import kernels
from .vocab_parallel import VocabShards

__all__ = ["fused_tad_loss", "TADLossOutput", "DIVERGENCES", "IGNORE_INDEX"]

DIVERGENCES = ("tad", "forward_kl", "reverse_kl", "none")
IGNORE_INDEX = -100
_STATS = ("ce", "divergence", "kl_to_teacher", "teacher_tail_mass", "student_tail_mass")


@dataclass
class TADLossOutput:
    """The loss and its parts, each a mean over the valid tokens of the batch.

    `loss` is differentiable; the rest are detached. Tail masses are NaN when no top-K was taken
    (`divergence="forward_kl"`/`"reverse_kl"`/`"none"` without `k`); teacher terms are NaN when no
    teacher was used.
    """

    loss: Tensor
    ce: Tensor
    divergence: Tensor
    kl_to_teacher: Tensor
    teacher_tail_mass: Tensor
    student_tail_mass: Tensor
    num_tokens: int

    @property
    def student_topk_mass(self) -> Tensor:
        """Q: the student's probability mass on the teacher's top-K tokens."""
        return 1.0 - self.student_tail_mass


@dataclass(frozen=True)
class _Spec:
    divergence: str
    k: int | None
    beta: float
    normalize: bool
    ce_weight: float
    chunk_size: int
    compile: bool

    @property
    def uses_teacher(self) -> bool:
        return self.divergence != "none" or self.k is not None

    @property
    def whole_sequences(self) -> bool:
        return self.divergence == "tad" and self.normalize


def fused_tad_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    labels: Tensor,
    *,
    k: int | None,
    beta: float = 1.0,
    normalize: bool = True,
    ce_weight: float = 1.0,
    divergence: str = "tad",
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = 1024,
    compile: bool = False,
) -> TADLossOutput:
    """Mean over valid tokens of ce_weight * CE + L_DIV, from hidden states and lm_head weights.

    Args:
        student_hidden: [B, T, Hs] final student hidden states (any float dtype; math in float32).
        student_weight: [V_r, Hs] student lm_head rows (all rows, or this rank's shard).
        teacher_hidden: [B, T, Ht] final teacher hidden states (None only for CE without `k`).
        teacher_weight: [V_r, Ht] teacher lm_head rows, the same token range as `student_weight`.
        labels: [B, T] next-token targets aligned with positions; -100 = no loss at that position.
        k: the teacher's top-K (required for "tad"; for the other divergences it only enables the
            tail-mass diagnostics, at the cost of a top-K per token).
        beta: the tail weight of TAD. normalize: divide it by the sequence's mean teacher tail mass.
        ce_weight: weight of the student's cross-entropy on `labels`.
        divergence: "tad", "forward_kl" (vanilla KD), "reverse_kl" or "none" (CE only).
        vocab_size: rows with global index >= vocab_size are padding, excluded from both softmaxes.
        group: vocab-parallel process group (each rank passes its contiguous row shard, rank order).
        chunk_size: tokens per chunk; peak extra memory is a few chunk_size x V_r float32 buffers.
        compile: torch.compile each chunk's work (the elementwise passes of `kernels.py` and the
            per-token arithmetic around them): fewer passes over memory, no float32 intermediates,
            fewer kernel launches; the first call of each configuration pays the compilation.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "tad" or k is not None:
        validate_tad_args(k, beta)
    if ce_weight < 0:
        raise ValueError(f"ce_weight must be >= 0, got {ce_weight!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
    spec = _Spec(divergence, k, float(beta), normalize, float(ce_weight), int(chunk_size), bool(compile))
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, spec)
    if not torch.is_grad_enabled():  # evaluation: no in-pass gradients either
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
    info: dict = {}  # filled by forward with host-side facts (no extra device sync)
    loss, stats = _FusedDistillationLoss.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, spec, vocab_size, group, info
    )
    return TADLossOutput(loss, *stats.unbind(), num_tokens=info["num_tokens"])


def _check_inputs(s_hidden, s_weight, t_hidden, t_weight, labels, spec: _Spec) -> None:
    if s_hidden.dim() != 3 or labels.shape != s_hidden.shape[:2]:
        raise ValueError(
            f"student_hidden must be [B, T, H] and labels [B, T]; got {tuple(s_hidden.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if s_weight.dim() != 2 or s_weight.shape[1] != s_hidden.shape[2]:
        raise ValueError(
            f"student_weight {tuple(s_weight.shape)} must be [V, {s_hidden.shape[2]}] (lm_head rows)"
        )
    if not spec.uses_teacher:
        return
    if t_hidden is None or t_weight is None:
        raise ValueError(f"divergence={spec.divergence!r} needs teacher_hidden and teacher_weight")
    if t_hidden.shape[:2] != s_hidden.shape[:2]:
        raise ValueError(
            f"teacher_hidden {tuple(t_hidden.shape)} and student_hidden {tuple(s_hidden.shape)} "
            "must agree in [B, T]"
        )
    if t_weight.dim() != 2 or t_weight.shape[1] != t_hidden.shape[2]:
        raise ValueError(
            f"teacher_weight {tuple(t_weight.shape)} must be [V, {t_hidden.shape[2]}] (lm_head rows)"
        )


class _FusedDistillationLoss(torch.autograd.Function):
    """Forward computes the loss and all gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, labels, spec: _Spec, vocab_size, group, info):
        shards = VocabShards(s_weight.shape[0], vocab_size, group)
        if spec.uses_teacher:
            t_shards = VocabShards(t_weight.shape[0], vocab_size, group)
            if (t_shards.offset, t_shards.kept) != (shards.offset, shards.kept):
                raise ValueError(
                    "teacher_weight and student_weight must hold the same token rows on each rank: "
                    f"student rows [{shards.offset}, {shards.offset + shards.kept}), teacher rows "
                    f"[{t_shards.offset}, {t_shards.offset + t_shards.kept}); pass vocab_size to "
                    "drop padding rows"
                )
        batch, seq_len, _ = s_hidden.shape
        flat_labels = labels.reshape(-1)
        valid = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        targets = flat_labels.index_select(0, valid)
        info["num_tokens"] = valid.numel()
        if ((targets < 0) | (targets >= shards.vocab_size)).any():
            raise ValueError(
                f"labels must lie in [0, {shards.vocab_size}) or be {IGNORE_INDEX}; got values in "
                f"[{int(targets.min())}, {int(targets.max())}]"
            )
        # The matmuls run in the weights' dtype (bf16 on GPU); everything after them in float32
        # (float64 for float64 weights, which the tests use). Hidden rows are gathered chunk by
        # chunk, and the hidden-state gradient goes straight into its full-size result, so no
        # [tokens, H] copy exists beside the caller's tensors.
        s_rows = _Rows(s_hidden, s_weight.dtype)
        s_w = s_weight[: shards.kept]
        t_rows = t_w = None
        if spec.uses_teacher:
            t_rows = _Rows(t_hidden, t_weight.dtype)
            t_w = t_weight[: shards.kept]
        seq_ids = valid // seq_len
        scale = 1.0 / max(valid.numel(), 1)

        want_grad_h, want_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(s_rows.flat) if want_grad_h else None
        grad_w = torch.zeros_like(s_weight) if want_grad_w else None
        sums = torch.zeros(len(_STATS), dtype=_math_dtype(s_weight), device=s_hidden.device)

        chunk_terms = _compiled(_chunk) if spec.compile else _chunk
        # Valid tokens per sequence, counted once: the chunk loop then never waits for the device
        seq_tokens = torch.bincount(seq_ids, minlength=batch) if spec.whole_sequences else None
        chunks, long_seqs = _plan_chunks(seq_tokens, valid.numel(), spec)
        seq_mean_alpha = sums.new_full((batch,), float("nan"))
        if long_seqs:
            _teacher_prepass(t_rows, t_w, valid, seq_ids, seq_tokens, long_seqs, seq_mean_alpha, spec, shards)

        for start, end in chunks:
            rows = valid[start:end]
            s_h = s_rows[rows]
            terms, grad_logits = chunk_terms(
                s_h, s_w, None if t_rows is None else t_rows[rows], t_w,
                targets[start:end], seq_ids[start:end], seq_tokens, seq_mean_alpha, spec, shards,
                want_grad=want_grad_h or want_grad_w,
            )
            sums[: terms.shape[1]] += terms.sum(0)
            if grad_logits is None:
                continue
            if want_grad_h:
                grad_h.index_copy_(0, rows, shards.sum_(grad_logits @ s_w).mul_(scale).to(grad_h.dtype))
            if want_grad_w:
                grad_w[: shards.kept].addmm_(grad_logits.T, s_h)

        stats = sums * scale
        if not spec.uses_teacher:
            stats[1:] = float("nan")
        elif spec.k is None:
            stats[3:] = float("nan")
        if spec.divergence == "none":
            stats[1] = 0.0
        loss = stats[0] * spec.ce_weight + stats[1]
        if want_grad_h:
            ctx.grad_h = grad_h.view_as(s_hidden)
        if want_grad_w:
            ctx.grad_w = grad_w.mul_(scale)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        # In place: the gradients were made for this call alone (no double backward).
        grad_h = getattr(ctx, "grad_h", None)
        grad_w = getattr(ctx, "grad_w", None)
        for grad in (grad_h, grad_w):
            if grad is not None:
                grad.mul_(grad_loss.to(grad.dtype))
        return grad_h, grad_w, None, None, None, None, None, None, None


class _Rows:
    """Rows of hidden states [B, T, H] by flat position, in the matmul dtype, gathered on demand."""

    def __init__(self, hidden: Tensor, dtype: torch.dtype):
        self.flat = hidden.reshape(-1, hidden.shape[-1])
        self.dtype = dtype

    def __getitem__(self, positions: Tensor) -> Tensor:
        return self.flat.index_select(0, positions).to(self.dtype)


def _plan_chunks(seq_tokens: Tensor | None, n: int, spec: _Spec) -> tuple[list[tuple[int, int]], list[int]]:
    """Token ranges [start, end) over the n valid tokens, and the sequences needing a pre-pass.

    Without sequence-level normalisation (seq_tokens None), plain ranges of chunk_size tokens.
    With it, each chunk holds whole sequences (seq_tokens: valid tokens per sequence); a sequence
    longer than chunk_size is split and listed as long.
    """
    size = spec.chunk_size
    if seq_tokens is None:
        return [(s, min(s + size, n)) for s in range(0, n, size)], []
    chunks, long_seqs = [], []
    pos = chunk_start = 0
    for seq, count in enumerate(seq_tokens.tolist()):
        if count > size:
            if pos > chunk_start:
                chunks.append((chunk_start, pos))
            chunks += [(s, min(s + size, pos + count)) for s in range(pos, pos + count, size)]
            long_seqs.append(seq)
            chunk_start = pos + count
        elif pos + count - chunk_start > size:
            chunks.append((chunk_start, pos))
            chunk_start = pos
        pos += count
    if pos > chunk_start:
        chunks.append((chunk_start, pos))
    return chunks, long_seqs


@functools.cache
def _compiled(fn):
    """fn through torch.compile, as one graph: around the matmuls and the top-K, a chunk's
    elementwise passes and per-token arithmetic fuse into a few loops whose float32
    intermediates never exist in memory (dynamic shapes: chunks differ in length). Collectives
    of vocab-parallel groups split the graph where they sit."""
    return torch.compile(fn, dynamic=True)


def _math_dtype(weight: Tensor) -> torch.dtype:
    """float32, or float64 for float64 weights (the tests' exact comparisons)."""
    return torch.promote_types(weight.dtype, torch.float32)


def _kth_largest(t: Tensor, k: int | None, shards: VocabShards, dtype: torch.dtype) -> Tensor:
    """The teacher's K-th largest logit per token [c]; +inf ("T_K is empty") when k is None."""
    if k is None:
        return torch.full(t.shape[:1], float("inf"), dtype=dtype, device=t.device)
    return shards.kth_largest(t, k).to(dtype)


def _teacher_prepass(t_rows, t_w, valid, seq_ids, seq_tokens, long_seqs, seq_mean_alpha, spec: _Spec, shards):
    """Fill seq_mean_alpha[s] = mean teacher tail mass over long sequence s (teacher only)."""
    dtype = seq_mean_alpha.dtype
    long_ids = torch.tensor(long_seqs, device=seq_ids.device)
    index = torch.isin(seq_ids, long_ids).nonzero().squeeze(1)
    sums = torch.zeros_like(seq_mean_alpha)
    tail_mass = _compiled(_teacher_tail_mass) if spec.compile else _teacher_tail_mass
    for start in range(0, index.numel(), spec.chunk_size):
        rows = index[start : start + spec.chunk_size]
        sums.index_add_(0, seq_ids[rows], tail_mass(t_rows[valid[rows]], t_w, spec.k, shards, dtype))
    seq_mean_alpha[long_ids] = sums[long_ids] / seq_tokens[long_ids]


def _teacher_tail_mass(t_h, t_w, k: int, shards: VocabShards, dtype: torch.dtype) -> Tensor:
    """alpha_T = exp(log Z_T,tail - log Z_T) per token [c], from the teacher alone."""
    t = t_h @ t_w.T
    norm = shards.logsumexp(kernels.normalisers(t, t, _kth_largest(t, k, shards, dtype), dtype, True))
    return (norm[:, 2] - norm[:, 0]).exp()


def _sequence_mean_alpha(alpha_t, seq_ids, seq_tokens, seq_mean_alpha) -> Tensor:
    """Per-token mean teacher tail mass of its sequence: from the pre-pass, else from this chunk,
    which then holds all of the sequence's seq_tokens valid tokens."""
    sums = torch.zeros_like(seq_mean_alpha).index_add_(0, seq_ids, alpha_t)
    in_chunk = sums / seq_tokens.clamp_min(1)
    return torch.where(seq_mean_alpha.isnan(), in_chunk, seq_mean_alpha)[seq_ids]


def _chunk(s_h, s_w, t_h, t_w, targets, seq_ids, seq_tokens, seq_mean_alpha, spec: _Spec, shards, want_grad):
    """Loss terms [c, len(_STATS)] and gradient w.r.t. the local student logits [c, V_r] (or None)."""
    dtype = _math_dtype(s_w)
    s = s_h @ s_w.T  # raw logits in the weights' dtype; the kernels upcast as they read
    local_y, owned = shards.local_labels(targets)
    label_logit = shards.sum_(_pick(s, local_y, owned).to(dtype))
    ce_owned = spec.ce_weight * owned.to(dtype)  # the one-hot part of the CE gradient, where owned
    grad_args = (local_y, ce_owned, dtype, s_w.dtype)

    if not spec.uses_teacher:  # CE only: gradient ce_weight * (q - onehot(y))
        s_lse = shards.logsumexp(kernels.logsumexp(s, dtype).unsqueeze(1)).squeeze(1)
        grad = kernels.softmax_grad(s, s_lse, spec.ce_weight, *grad_args) if want_grad else None
        return (s_lse - label_logit).unsqueeze(1), grad

    t = t_h @ t_w.T
    thr = _kth_largest(t, spec.k, shards, dtype)
    # (log Z_T, log Z_S, log Z_T,tail, log Z_S,tail), combined over the vocabulary shards
    norm = shards.logsumexp(kernels.normalisers(t, s, thr, dtype, spec.k is not None))
    ce = norm[:, 1] - label_logit
    log_alpha_t, log_alpha_s = norm[:, 2] - norm[:, 0], norm[:, 3] - norm[:, 1]
    alpha_t, alpha_s = log_alpha_t.exp(), log_alpha_s.exp()
    has_tail = torch.isfinite(norm[:, 2]) & torch.isfinite(norm[:, 3])
    # No tail token (K >= V, or ties): normalise the empty tail by log Z instead of -inf, which
    # only keeps the arithmetic finite; alpha = 0 there zeroes every tail term.
    norm[:, 2:] = torch.where(has_tail.unsqueeze(1), norm[:, 2:], norm[:, :2])

    if spec.divergence == "reverse_kl":
        rkl, fkl = shards.sum_(torch.stack(kernels.reverse_kl_terms(t, s, norm, dtype), 1)).unbind(1)
        terms = torch.stack([ce, rkl, fkl, alpha_t, alpha_s], dim=1)
        grad = kernels.reverse_kl_grad(t, s, norm, rkl, spec.ce_weight, *grad_args) if want_grad else None
        return terms, grad

    if spec.divergence == "tad":
        omega = spec.beta * alpha_t
        if spec.normalize:
            mean = _sequence_mean_alpha(alpha_t, seq_ids, seq_tokens, seq_mean_alpha)
            omega = omega / mean.clamp_min(torch.finfo(mean.dtype).tiny)
    elif spec.divergence == "forward_kl":
        omega = alpha_t
    else:  # "none": the teacher only feeds the diagnostics
        omega = torch.zeros_like(alpha_t)
    kd = 0.0 if spec.divergence == "none" else 1.0
    a_top = torch.full_like(omega, kd + spec.ce_weight)
    coef = torch.stack([a_top, torch.full_like(omega, kd), a_top * alpha_s - kd * alpha_t + omega, omega], 1)
    top_sum, tail_sum, grad = kernels.tad_terms(t, s, thr, norm, coef, *grad_args, want_grad)
    top_sum, d2 = shards.sum_(torch.stack([top_sum, tail_sum], 1)).unbind(1)

    bucket = torch.where(has_tail, alpha_t * (log_alpha_t - log_alpha_s), 0.0)
    d1 = top_sum + bucket  # without a top-K everything is "tail": alpha = 1, D1 = 0, D2 = KL
    terms = torch.stack([ce, d1 + omega * d2, d1 + alpha_t * d2, alpha_t, alpha_s], dim=1)
    return terms, grad


def _pick(logits: Tensor, local_y: Tensor, owned: Tensor) -> Tensor:
    """logits[i, y_i] where this rank owns y_i, else 0 [c] (a shard of padding rows owns none)."""
    if logits.shape[1] == 0:
        return logits.new_zeros(logits.shape[0])
    return logits.gather(1, local_y.unsqueeze(1)).squeeze(1) * owned
