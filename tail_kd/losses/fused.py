"""The fused distillation loss: lm_head matmuls + CE + divergence in token chunks, optionally
vocab-parallel.

`fused_distillation_loss` takes final hidden states and lm_head weights instead of logits. It walks
over the valid tokens in chunks of at most `chunk_size`; for each chunk it computes both models'
logits, the per-token loss terms and, in the same pass, the gradient of the loss with respect to
the student's logits (`divergences.py`), which it turns at once into gradients for the student's
hidden states and lm_head weight. Peak extra memory is a few [chunk, V] float32 buffers plus one
weight-sized gradient, whatever the number of tokens; [tokens, V] logits never exist.

One chunk, on this rank's vocabulary slice (`_chunk`):

    s = h_S W_S^T, t = h_T W_T^T                 the logits [c, V_r], in the weights' dtype
    thr = K-th largest t over the vocabulary     T_K = {j : t_j >= thr}            (one top-K)
    log Z_T, log Z_S, log Z_T,tail, log Z_S,tail over the vocabulary             (`Normalisers`)
    CE = log Z_S - s_y
    divergence, KL(p || q), dL/ds                                                  (`Divergence`)
    grad h_S += dL/ds W_S,   grad W_S += dL/ds^T h_S

TAD's sequence normalisation needs mean alpha_T over each sequence before any gradient of that
sequence can be formed. Chunks therefore hold whole sequences; only a sequence with more than
`chunk_size` valid tokens is split, and for it a teacher-only pre-pass computes the mean first
(one extra teacher lm_head matmul for those tokens).

Vocab-parallel mode (`group`): every rank passes the same hidden states and labels and its own
contiguous row shard of both weights; the per-token numbers above cross the group through
`VocabShards` (a few numbers per token, as in Megatron-LM's vocab-parallel cross-entropy), the
hidden-state gradient is all-reduced, and each rank keeps its rows' weight gradient.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels
from .chunk import Chunk, ChunkSequences, Normalisers, Targets
from .dense import validate_tad_args
from .divergences import DIVERGENCES, Divergence, make_divergence
from .logits import IDENTITY, LogitTransform
from .terms import IGNORE_INDEX, LOSS_TERMS, DistillationLossOutput, LossTerms
from .vocab_parallel import VocabShards

__all__ = ["fused_distillation_loss", "LossSpec", "CompileFallbackWarning"]


@dataclass(frozen=True)
class LossSpec:
    """The settings of one loss: which divergence, the teacher's top-K, the CE weight, chunking."""

    divergence: Divergence
    top_k: int | None  # required by TAD; for the others it only adds the tail-mass diagnostics
    ce_weight: float
    chunk_size: int
    compile: bool
    static_shapes: bool = False  # compiled graphs specialised to each chunk length
    student_transform: LogitTransform = IDENTITY  # the models' post-processing of their logits
    teacher_transform: LogitTransform = IDENTITY

    @property
    def uses_teacher(self) -> bool:
        return self.divergence.needs_teacher or self.top_k is not None

    @classmethod
    def create(
        cls,
        divergence: str,
        *,
        k: int | None,
        beta: float,
        normalize: bool,
        ce_weight: float,
        chunk_size: int,
        compile: bool,
        static_shapes: bool = False,
        student_transform: LogitTransform = IDENTITY,
        teacher_transform: LogitTransform = IDENTITY,
    ) -> LossSpec:
        """Check the settings (a ValueError names the argument) and bind them."""
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if divergence == "tad" or k is not None:
            validate_tad_args(k, beta)
        if ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {ce_weight!r}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
        return cls(
            divergence=make_divergence(divergence, beta=beta, normalize=normalize),
            top_k=k,
            ce_weight=float(ce_weight),
            chunk_size=int(chunk_size),
            compile=bool(compile),
            static_shapes=bool(static_shapes),
            student_transform=student_transform,
            teacher_transform=teacher_transform,
        )


def fused_distillation_loss(
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
    group: dist.ProcessGroup | None = None,
    chunk_size: int = 1024,
    compile: bool = False,
    static_shapes: bool = False,
    student_transform: LogitTransform = IDENTITY,
    teacher_transform: LogitTransform = IDENTITY,
) -> DistillationLossOutput:
    """Mean over valid tokens of ce_weight * CE + divergence, from hidden states and lm_head weights.

    Args:
        student_hidden: [B, T, Hs] final student hidden states (any float dtype; math in float32).
        student_weight: [V_r, Hs] student lm_head rows (all rows, or this rank's shard).
        teacher_hidden: [B, T, Ht] final teacher hidden states (None only for CE without `k`).
        teacher_weight: [V_r, Ht] teacher lm_head rows, the same token range as `student_weight`.
        labels: [B, T] next-token targets aligned with positions; -100 = no loss at that position.
            On the host (a CPU tensor beside CUDA hidden states: the loader's batch, before its
            copy) the bookkeeping of the valid tokens needs no device synchronisation; on the
            device it costs three (the valid positions, the label check, the chunk plan).
        divergence: "tad", "forward_kl" (vanilla KD), "reverse_kl" or "none" (CE only).
        k: the teacher's top-K (required for "tad"; for the other divergences it only enables the
            tail-mass diagnostics, at the cost of a top-K per token).
        beta: the tail weight of TAD. normalize: divide it by the sequence's mean teacher tail mass.
        ce_weight: weight of the student's cross-entropy on `labels`.
        vocab_size: rows with global index >= vocab_size are padding, excluded from both softmaxes.
        group: vocab-parallel process group (each rank passes its contiguous row shard, rank order).
        chunk_size: tokens per chunk; peak extra memory is a few chunk_size x V_r float32 buffers.
        compile: torch.compile each chunk's work (both matmuls, the top-K, the elementwise passes
            and the per-token arithmetic between them) as one graph: fewer passes over memory, no
            float32 intermediates, fewer kernel launches; the first call of each configuration
            pays the compilation.
        static_shapes: with `compile`, one graph per chunk length, specialised to it, instead of
            one graph for every length (dynamic shapes). For inputs whose lengths repeat from call
            to call, as packed data's do (every position has a label, so every micro-batch splits
            into the same chunks: whole ones and one remainder): each length compiles once. Not
            for lengths that vary (labels masked on prompts), which would compile again and
            again.
        student_transform, teacher_transform: what each model does to its lm_head's output
            before the softmax (a scale, a soft cap: `logits.LogitTransform`); applied to each
            chunk, with its derivative in the gradient.
    """
    spec = LossSpec.create(
        divergence,
        k=k,
        beta=beta,
        normalize=normalize,
        ce_weight=ce_weight,
        chunk_size=chunk_size,
        compile=compile,
        static_shapes=static_shapes,
        student_transform=student_transform,
        teacher_transform=teacher_transform,
    )
    _check_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, spec)
    shards = VocabShards(student_weight.shape[0], vocab_size, group, student_weight.device)
    if spec.uses_teacher:
        shards.check_same_rows(teacher_weight.shape[0], vocab_size, "teacher_weight")
    tokens = ValidTokens.from_labels(labels, shards, student_hidden.device)
    if not torch.is_grad_enabled():  # evaluation: no in-pass gradients either
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
    call = _Call(spec, shards, tokens)
    loss, means = _FusedDistillationLoss.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, call
    )
    return DistillationLossOutput(loss, LossTerms.unstack(means), tokens.count)


def _check_shapes(s_hidden, s_weight, t_hidden, t_weight, labels, spec: LossSpec) -> None:
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
        raise ValueError(
            f"divergence={spec.divergence.name!r} needs teacher_hidden and teacher_weight"
        )
    if t_hidden.shape[:2] != s_hidden.shape[:2]:
        raise ValueError(
            f"teacher_hidden {tuple(t_hidden.shape)} and student_hidden {tuple(s_hidden.shape)} "
            "must agree in [B, T]"
        )
    if t_weight.dim() != 2 or t_weight.shape[1] != t_hidden.shape[2]:
        raise ValueError(
            f"teacher_weight {tuple(t_weight.shape)} must be [V, {t_hidden.shape[2]}] (lm_head rows)"
        )


@dataclass(frozen=True)
class ValidTokens:
    """The batch's valid positions (label != -100), flattened, with their targets and sequences:
    tensors on the compute device, and the valid tokens per sequence also as host numbers (the
    chunk plan reads them)."""

    positions: Tensor  # flat index b * T + t of each valid position [n]
    targets: Tensor  # its label [n]
    sequence_ids: Tensor  # its sequence b [n]
    per_sequence: Tensor  # valid tokens per sequence [B]
    counts: tuple[int, ...]  # the same, on the host

    @property
    def count(self) -> int:
        return sum(self.counts)

    @classmethod
    def from_labels(cls, labels: Tensor, shards: VocabShards, device: torch.device) -> ValidTokens:
        """Worked out where `labels` lie (on the host: no device synchronisation), then sent to
        `device` without blocking. ValueError if a label lies outside the vocabulary (and is not
        -100)."""
        batch, seq_len = labels.shape
        flat = labels.reshape(-1)
        positions = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        targets = flat.index_select(0, positions)
        if ((targets < 0) | (targets >= shards.vocab_size)).any():
            raise ValueError(
                f"labels must lie in [0, {shards.vocab_size}) or be {IGNORE_INDEX}; got values in "
                f"[{int(targets.min())}, {int(targets.max())}]"
            )
        sequence_ids = positions // seq_len
        per_sequence = torch.bincount(sequence_ids, minlength=batch)
        moved = (_to(x, device) for x in (positions, targets, sequence_ids, per_sequence))
        return cls(*moved, tuple(per_sequence.tolist()))


def _to(x: Tensor, device: torch.device) -> Tensor:
    """`x` on `device`; from the host to a GPU through pinned memory, without blocking."""
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


@dataclass(frozen=True)
class _Call:
    """What one call of the loss knows besides the differentiable inputs."""

    spec: LossSpec
    shards: VocabShards
    tokens: ValidTokens


class _Rows:
    """One model's final hidden states [B, T, H], rows gathered by flat position on demand in the
    matmul dtype, and its lm_head rows that are real tokens."""

    def __init__(self, hidden: Tensor, weight: Tensor, shards: VocabShards):
        self.flat = hidden.reshape(-1, hidden.shape[-1])
        self.weight = weight[: shards.kept]

    def __getitem__(self, positions: Tensor) -> Tensor:
        return self.flat.index_select(0, positions).to(self.weight.dtype)


@dataclass(frozen=True)
class _ChunkInputs:
    """What `_chunk` reads of one chunk of c valid tokens."""

    student_hidden: Tensor  # [c, Hs]
    student_weight: Tensor  # [V_kept, Hs]
    teacher_hidden: Tensor | None  # [c, Ht]
    teacher_weight: Tensor | None  # [V_kept, Ht]
    targets: Tensor  # global token ids [c]
    sequences: ChunkSequences | None


class _FusedDistillationLoss(torch.autograd.Function):
    """Forward computes the loss and all gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, call: _Call):
        spec, shards, tokens = call.spec, call.shards, call.tokens
        # The matmuls run in the weights' dtype (bf16 on GPU); everything after them in float32
        # (float64 for float64 weights, which the tests use). Hidden rows are gathered chunk by
        # chunk, and the hidden-state gradient goes straight into its full-size result, so no
        # [tokens, H] copy exists beside the caller's tensors.
        student = _Rows(s_hidden, s_weight, shards)
        teacher = _Rows(t_hidden, t_weight, shards) if spec.uses_teacher else None
        scale = 1.0 / max(tokens.count, 1)
        want_grad_h, want_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(student.flat) if want_grad_h else None
        # The lm_head gradient sums every chunk's: in float32, whatever the weights' dtype (a bf16
        # sum of many chunks loses the small ones).
        grad_w = torch.zeros_like(s_weight, dtype=_math_dtype(s_weight)) if want_grad_w else None
        sums = torch.zeros(len(LOSS_TERMS), dtype=_math_dtype(s_weight), device=s_hidden.device)

        chunk_fn = _chunk
        if spec.compile:
            chunk_fn = _compiled(_chunk, s_hidden.device.type, spec.static_shapes)
        sequences = None
        if spec.divergence.sequence_normalised:
            sequences = _SequenceState.create(tokens, sums.dtype)
        counts = None if sequences is None else tokens.counts
        chunks, long_seqs = _plan_chunks(counts, tokens.count, spec.chunk_size)
        if long_seqs:
            sequences.run_teacher_prepass(teacher, tokens, long_seqs, spec, shards)

        for start, end in chunks:
            rows = tokens.positions[start:end]
            s_h = student[rows]
            inputs = _ChunkInputs(
                student_hidden=s_h,
                student_weight=student.weight,
                teacher_hidden=None if teacher is None else teacher[rows],
                teacher_weight=None if teacher is None else teacher.weight,
                targets=tokens.targets[start:end],
                sequences=None if sequences is None else sequences.chunk(start, end),
            )
            chunk_sums, grad_logits = chunk_fn(inputs, spec, shards, want_grad_h or want_grad_w)
            sums += chunk_sums
            if grad_logits is None:
                continue
            if want_grad_h:
                grad_h_rows = shards.sum_(grad_logits @ student.weight).mul_(scale)
                grad_h.index_copy_(0, rows, grad_h_rows.to(grad_h.dtype))
            if want_grad_w:
                grad_w[: shards.kept] += grad_logits.T @ s_h

        terms = _mark_not_computed(LossTerms.unstack(sums * scale), spec)
        loss = terms.ce * spec.ce_weight + terms.divergence
        means = terms.stack()
        if want_grad_h:
            ctx.grad_h = grad_h.view_as(s_hidden)
        if want_grad_w:
            ctx.grad_w = grad_w.mul_(scale).to(s_weight.dtype)
        ctx.mark_non_differentiable(means)
        return loss, means

    @staticmethod
    def backward(ctx, grad_loss, _grad_means):
        # In place: the gradients were made for this call alone (no double backward).
        grad_h = getattr(ctx, "grad_h", None)
        grad_w = getattr(ctx, "grad_w", None)
        for grad in (grad_h, grad_w):
            if grad is not None:
                grad.mul_(grad_loss.to(grad.dtype))
        return grad_h, grad_w, None, None, None


def _mark_not_computed(terms: LossTerms, spec: LossSpec) -> LossTerms:
    """NaN for the terms this loss does not compute: the teacher's without a teacher, the tail
    masses without a top-K."""
    if not spec.uses_teacher:
        return terms.without("kl_to_teacher", "teacher_tail_mass", "student_tail_mass")
    if spec.top_k is None:
        return terms.without("teacher_tail_mass", "student_tail_mass")
    return terms


def _chunk(inputs: _ChunkInputs, spec: LossSpec, shards: VocabShards, want_grad: bool):
    """The summed loss terms of one chunk (`LossTerms.stack` order) and the gradient w.r.t. its
    student logits on this slice [c, V_r] (None without `want_grad`)."""
    dtype = _math_dtype(inputs.student_weight)
    # Logits in the weights' dtype (bf16 on GPU): the passes upcast as they read.
    s = _logits(inputs.student_hidden, inputs.student_weight, spec.student_transform)
    targets = Targets.on_slice(inputs.targets, shards, spec.ce_weight)
    label_logit = shards.sum_(kernels.pick(s, targets).to(dtype))
    t = threshold = None
    if spec.uses_teacher:
        t = _logits(inputs.teacher_hidden, inputs.teacher_weight, spec.teacher_transform)
        threshold = _kth_largest(t, spec.top_k, shards, dtype)
        local = kernels.normalisers(t, s, threshold, dtype)
        norm = Normalisers.from_logsumexps(*shards.logsumexp(local).unbind(1))
    else:
        log_z = shards.logsumexp(kernels.logsumexp(s, dtype).unsqueeze(1)).squeeze(1)
        norm = Normalisers(student=log_z)
    chunk = Chunk(s, t, threshold, norm, targets, inputs.sequences, shards, dtype)
    divergence = spec.divergence.terms(chunk, want_grad)
    ce = norm.student - label_logit
    zeros = torch.zeros_like(ce)
    terms = LossTerms(
        ce=ce,
        divergence=divergence.value,
        kl_to_teacher=zeros if divergence.kl_to_teacher is None else divergence.kl_to_teacher,
        teacher_tail_mass=zeros if t is None else norm.alpha_t,
        student_tail_mass=zeros if t is None else norm.alpha_s,
    )
    grad = divergence.logit_grad
    if grad is not None and not spec.student_transform.is_identity:
        # The gradient w.r.t. the lm_head's output: times the transform's derivative.
        grad = (grad.to(dtype) * spec.student_transform.derivative(s.to(dtype))).to(grad.dtype)
    return terms.stack().sum(0), grad


def _logits(hidden: Tensor, weight: Tensor, transform: LogitTransform) -> Tensor:
    """A chunk's logits on this slice [c, V_r]: the lm_head's output, post-processed as the model
    does it (in the math dtype, rounded back to the weights')."""
    z = hidden @ weight.T
    if transform.is_identity:
        return z
    return transform(z.to(_math_dtype(weight))).to(z.dtype)


def _kth_largest(teacher: Tensor, k: int | None, shards: VocabShards, dtype) -> Tensor | None:
    """The teacher's K-th largest logit over the vocabulary per token [c] (None without k)."""
    return None if k is None else shards.kth_largest(teacher, k).to(dtype)


class _SequenceState:
    """Per-sequence state of one call, for TAD's sequence normalisation (`ChunkSequences`)."""

    def __init__(self, ids: Tensor, tokens: Tensor, prepass_mean: Tensor):
        self.ids = ids  # [n]
        self.tokens = tokens  # valid tokens per sequence [B]
        self.prepass_mean = prepass_mean  # [B], NaN until the pre-pass fills a long sequence's

    @classmethod
    def create(cls, tokens: ValidTokens, dtype: torch.dtype) -> _SequenceState:
        per_sequence = tokens.per_sequence
        nan = torch.full_like(per_sequence, float("nan"), dtype=dtype)
        return cls(tokens.sequence_ids, per_sequence, nan)

    def chunk(self, start: int, end: int) -> ChunkSequences:
        return ChunkSequences(self.ids[start:end], self.tokens, self.prepass_mean)

    def run_teacher_prepass(
        self,
        teacher: _Rows,
        tokens: ValidTokens,
        long_seqs: list[int],
        spec: LossSpec,
        shards: VocabShards,
    ) -> None:
        """Fill `prepass_mean` for the sequences too long for one chunk: mean alpha_T over each,
        from the teacher alone. A sequence's valid tokens are consecutive in the flat order: its
        range comes from the host counts."""
        starts = [0, *itertools.accumulate(tokens.counts)]
        sums = torch.zeros_like(self.prepass_mean)
        tail_mass = _teacher_tail_mass
        if spec.compile:
            tail_mass = _compiled(_teacher_tail_mass, self.ids.device.type, spec.static_shapes)
        for seq in long_seqs:
            for start in range(starts[seq], starts[seq + 1], spec.chunk_size):
                end = min(start + spec.chunk_size, starts[seq + 1])
                hidden = teacher[tokens.positions[start:end]]
                alpha_t = tail_mass(hidden, teacher.weight, spec, shards)
                sums.index_add_(0, self.ids[start:end], alpha_t)
        long_ids = _to(torch.tensor(long_seqs, device="cpu"), self.ids.device)
        self.prepass_mean[long_ids] = sums[long_ids] / self.tokens[long_ids]


def _teacher_tail_mass(hidden: Tensor, weight: Tensor, spec: LossSpec, shards: VocabShards):
    """alpha_T per token [c], from the teacher alone."""
    dtype = _math_dtype(weight)
    t = _logits(hidden, weight, spec.teacher_transform)
    threshold = _kth_largest(t, spec.top_k, shards, dtype)
    local = kernels.normalisers(t, t, threshold, dtype)
    return Normalisers.from_logsumexps(*shards.logsumexp(local).unbind(1)).alpha_t


def _plan_chunks(
    counts: tuple[int, ...] | None, n: int, size: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """Token ranges [start, end) over the n valid tokens, and the sequences needing a pre-pass.

    Without sequence normalisation (`counts` None), plain ranges of `size` tokens. With it, each
    chunk holds whole sequences (`counts`: valid tokens per sequence); a sequence longer than
    `size` is split and listed as long.
    """
    if counts is None:
        return [(s, min(s + size, n)) for s in range(0, n, size)], []
    chunks, long_seqs = [], []
    pos = chunk_start = 0
    for seq, count in enumerate(counts):
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


class CompileFallbackWarning(UserWarning):
    """torch.compile does not work on this machine: the loss runs eager."""


@functools.cache
def _compiled(fn, device_type: str, static_shapes: bool = False):
    """fn through torch.compile, as one graph: around the matmuls and the top-K, a chunk's
    elementwise passes and per-token arithmetic fuse into a few loops whose float32
    intermediates never exist in memory; with dynamic shapes (one graph for every chunk length),
    or `static_shapes` (a graph per length). Collectives of vocab-parallel groups split the graph
    where they sit. `fn` itself where compiling does not work (`_compiler_works`)."""
    if not _compiler_works(device_type):
        return fn
    return torch.compile(fn, dynamic=not static_shapes)


@functools.cache
def _compiler_works(device_type: str) -> bool:
    """Whether torch.compile works for `device_type` here; if not (no Triton on a GPU node, no C++
    compiler on a CPU one), one warning. Compiling a tiny function finds out before any chunk,
    and so any collective of a vocab-parallel group, has run."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    try:
        probe = torch.compile(lambda x: (x * 2).exp().sum(), dynamic=True)
        probe(torch.ones(8, device=device_type))
    except (BackendCompilerFailed, InductorError) as error:
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
        warnings.warn(
            f"torch.compile does not work on this {device_type} node ({first_line}); the loss "
            "runs eager (slower, same results). Set --set loss.kernels=eager to skip compiling.",
            CompileFallbackWarning,
            stacklevel=4,
        )
        return False
    return True


def _math_dtype(weight: Tensor) -> torch.dtype:
    """float32, or float64 for float64 weights (the tests' exact comparisons)."""
    return torch.promote_types(weight.dtype, torch.float32)
