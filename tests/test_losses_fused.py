"""The fused chunked loss against the dense reference: values, gradients, edge cases, errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import loss_and_grads, make_batch
from tail_kd.losses import (
    IGNORE_INDEX,
    LOSS_TERMS,
    dense_distillation_loss,
    forward_kl,
    fused_distillation_loss,
    tad_divergence,
)


CASES = [
    dict(divergence="tad", k=5, beta=2.0, normalize=True),
    dict(divergence="tad", k=1, beta=0.5, normalize=True),
    dict(divergence="tad", k=10, beta=5.0, normalize=False),
    dict(divergence="tad", k=100, beta=2.0, normalize=True),  # K >= V: empty tails
    dict(divergence="forward_kl", k=None, beta=1.0, normalize=True),
    dict(divergence="forward_kl", k=5, beta=1.0, normalize=True),
    dict(divergence="reverse_kl", k=None, beta=1.0, normalize=True),
    dict(divergence="none", k=None, beta=1.0, normalize=True),
    dict(divergence="none", k=3, beta=1.0, normalize=True),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c['divergence']}-k{c['k']}-b{c['beta']}-n{c['normalize']}"
)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("ce_weight", [1.0, 0.0])
def test_fused_matches_dense(case, chunk_size, ce_weight):
    batch = make_batch()
    ref = loss_and_grads(dense_distillation_loss, *batch, ce_weight=ce_weight, **case)
    ours = loss_and_grads(
        fused_distillation_loss, *batch, ce_weight=ce_weight, chunk_size=chunk_size, **case
    )
    for a, b, name in zip(ours, ref, ("loss", "grad student_hidden", "grad student_weight")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("divergence", ["tad", "forward_kl", "reverse_kl"])
def test_padded_vocabulary_rows_are_excluded(divergence):
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch(rows=40)
    vocab_size = 33
    labels = labels.clamp(max=vocab_size - 1)
    kwargs = dict(
        k=4, beta=2.0, normalize=True, ce_weight=1.0, divergence=divergence, vocab_size=vocab_size
    )
    ref = loss_and_grads(
        dense_distillation_loss, s_hidden, s_weight, t_hidden, t_weight, labels, **kwargs
    )
    ours = loss_and_grads(
        fused_distillation_loss,
        s_hidden,
        s_weight,
        t_hidden,
        t_weight,
        labels,
        chunk_size=5,
        **kwargs,
    )
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[2][:vocab_size], ref[2][:vocab_size], rtol=1e-10, atol=1e-12)
    assert (ours[2][vocab_size:] == 0).all()


def test_diagnostics_are_means_over_valid_tokens():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch()
    out = fused_distillation_loss(
        s_hidden, s_weight, t_hidden, t_weight, labels, k=5, beta=2.0, chunk_size=4
    )
    mask = labels != IGNORE_INDEX
    s_logits, t_logits = s_hidden @ s_weight.T, t_hidden @ t_weight.T
    p, q = t_logits.softmax(-1), s_logits.softmax(-1)
    top = t_logits >= t_logits.topk(5, -1).values[..., -1:]
    torch.testing.assert_close(out.terms.teacher_tail_mass, (p * ~top).sum(-1)[mask].mean())
    torch.testing.assert_close(out.terms.student_tail_mass, (q * ~top).sum(-1)[mask].mean())
    torch.testing.assert_close(out.terms.student_topk_mass, (q * top).sum(-1)[mask].mean())
    torch.testing.assert_close(
        out.terms.kl_to_teacher, forward_kl(s_logits, t_logits, mask)[mask].mean()
    )
    torch.testing.assert_close(
        out.terms.divergence, tad_divergence(s_logits, t_logits, mask, k=5, beta=2.0)[mask].mean()
    )
    ce = F.cross_entropy(s_logits[mask], labels[mask])
    torch.testing.assert_close(out.terms.ce, ce)
    assert out.num_tokens == int(mask.sum())


def test_long_sequences_use_the_teacher_prepass_and_stay_exact():
    """Sequences longer than the chunk are split; their normaliser comes from a teacher pre-pass."""
    batch = make_batch(batch=2, length=30)
    kwargs = dict(k=3, beta=2.0, normalize=True, ce_weight=1.0, divergence="tad")
    ref = loss_and_grads(dense_distillation_loss, *batch, **kwargs)
    for chunk_size in (5, 26, 27):  # every sequence long / only one long / none
        ours = loss_and_grads(fused_distillation_loss, *batch, chunk_size=chunk_size, **kwargs)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_inputs_are_as_accurate_as_a_bf16_dense_loss():
    """bf16 logits carry ~3 significant digits; the fused loss must not lose more than autograd does."""
    batch64 = make_batch(hs=32, ht=32, rows=300, seed=3)
    batch16 = tuple(x.bfloat16() if x.is_floating_point() else x for x in batch64)
    kwargs = dict(k=10, beta=2.0, normalize=True, ce_weight=1.0, divergence="tad")
    exact = loss_and_grads(
        dense_distillation_loss,
        *(x.double() if x.is_floating_point() else x for x in batch16),
        **kwargs,
    )
    dense16 = loss_and_grads(dense_distillation_loss, *batch16, **kwargs)
    ours = loss_and_grads(fused_distillation_loss, *batch16, chunk_size=8, **kwargs)
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16

    def error(a, b):
        return float((a.double() - b).norm() / b.norm())

    for i, name in enumerate(("loss", "grad student_hidden", "grad student_weight")):
        assert error(ours[i], exact[i]) <= 1.5 * error(dense16[i], exact[i]) + 1e-3, name


def test_extreme_teachers_and_ties_stay_finite_and_exact():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch(rows=20, seed=4)
    t_weight[7] = t_weight[7] * 1e3  # some teacher rows dominate: tail mass ~ 0
    t_weight[8] = t_weight[9]  # exactly tied teacher logits
    s_weight[2] = s_weight[2] * 1e3
    kwargs = dict(beta=2.0, normalize=True, ce_weight=1.0, divergence="tad")
    for k in (1, 2, 9, 19, 20, 50):
        ref = loss_and_grads(
            dense_distillation_loss, s_hidden, s_weight, t_hidden, t_weight, labels, k=k, **kwargs
        )
        ours = loss_and_grads(
            fused_distillation_loss,
            s_hidden,
            s_weight,
            t_hidden,
            t_weight,
            labels,
            k=k,
            chunk_size=6,
            **kwargs,
        )
        for a, b in zip(ours, ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_batch_without_valid_positions_gives_zero():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch()
    labels[:] = IGNORE_INDEX
    loss, grad_h, grad_w = loss_and_grads(
        fused_distillation_loss, s_hidden, s_weight, t_hidden, t_weight, labels, k=5, beta=2.0
    )
    assert loss == 0 and (grad_h == 0).all() and (grad_w == 0).all()


def test_no_gradient_work_in_eval_mode():
    batch = make_batch()
    with torch.no_grad():
        out = fused_distillation_loss(*batch, k=5, beta=2.0)
    assert not out.loss.requires_grad and torch.isfinite(out.loss)


def test_backward_scales_with_the_upstream_gradient():
    batch = make_batch()
    _, g_h, g_w = loss_and_grads(
        lambda *a, **kw: 3.0 * fused_distillation_loss(*a, **kw).loss, *batch, k=5, beta=2.0
    )
    _, r_h, r_w = loss_and_grads(fused_distillation_loss, *batch, k=5, beta=2.0)
    torch.testing.assert_close(g_h, 3.0 * r_h)
    torch.testing.assert_close(g_w, 3.0 * r_w)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(k=0, beta=1.0), "^k must"),
        (dict(k=None, beta=1.0), "^k must"),
        (dict(k=3, beta=-1.0), "^beta must"),
        (dict(k=3, beta=1.0, divergence="js"), "^divergence must"),
        (dict(k=3, beta=1.0, chunk_size=0), "^chunk_size must"),
        (dict(k=3, beta=1.0, ce_weight=-1.0), "^ce_weight must"),
        (dict(k=3, beta=1.0, vocab_size=99), "vocab_size=99 exceeds"),
    ],
)
def test_bad_arguments_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        fused_distillation_loss(*make_batch(), **kwargs)


def test_bad_shapes_and_labels_are_named():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch()
    with pytest.raises(ValueError, match="student_weight"):
        fused_distillation_loss(
            s_hidden, s_weight[:, :-1], t_hidden, t_weight, labels, k=3, beta=1.0
        )
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_distillation_loss(
            s_hidden, s_weight, t_hidden[:, :-1], t_weight, labels, k=3, beta=1.0
        )
    with pytest.raises(ValueError, match="same token rows"):
        fused_distillation_loss(s_hidden, s_weight, t_hidden, t_weight[:-1], labels, k=3, beta=1.0)
    labels[2, 0] = s_weight.shape[0]
    with pytest.raises(ValueError, match="labels must lie in"):
        fused_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, labels, k=3, beta=1.0)


@pytest.mark.parametrize(
    "divergence, k", [("tad", 5), ("forward_kl", None), ("reverse_kl", 3), ("none", None)]
)
def test_compiled_kernels_match_eager(divergence, k):
    batch = make_batch(dtype=torch.float32)
    kwargs = dict(k=k, beta=2.0, divergence=divergence, chunk_size=7)
    eager = loss_and_grads(fused_distillation_loss, *batch, **kwargs)
    compiled = loss_and_grads(fused_distillation_loss, *batch, compile=True, **kwargs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_static_shapes_compile_each_chunk_length_once():
    """What packed data get (`loss_function`): a graph per chunk length, here 7 and the last 5 of
    26 tokens, compiled on the first call only, with the eager results; the same batch again
    compiles nothing."""
    from torch._dynamo.utils import counters

    from tail_kd.losses.fused import _compiler_works

    torch._dynamo.reset()
    assert _compiler_works("cpu")  # its probe compiled (once per process) before we count
    batch = make_batch(dtype=torch.float32)
    kwargs = dict(k=None, divergence="forward_kl", chunk_size=7)
    eager = loss_and_grads(fused_distillation_loss, *batch, **kwargs)
    graphs = []
    for static_shapes in (True, True, False):
        before = counters["stats"]["unique_graphs"]
        compiled = loss_and_grads(
            fused_distillation_loss, *batch, compile=True, static_shapes=static_shapes, **kwargs
        )
        graphs.append(counters["stats"]["unique_graphs"] - before)
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert graphs == [2, 0, 1]  # dynamic shapes: one graph for both lengths


@pytest.mark.parametrize("divergence", ["tad", "forward_kl", "reverse_kl", "none"])
def test_dense_reference_matches_fused_loss_on_every_output(divergence):
    """The --reference-loss path and the fused loss agree on every output and gradient, padding
    rows included (both in float64: float64 tolerances)."""
    g = torch.Generator().manual_seed(0)
    b, t, hs, ht, rows, vocab = 2, 7, 8, 12, 40, 37  # 3 padding rows
    s_hidden = torch.randn(b, t, hs, generator=g, dtype=torch.float64, requires_grad=True)
    s_weight = torch.randn(rows, hs, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(b, t, ht, generator=g, dtype=torch.float64)
    t_weight = torch.randn(rows, ht, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[0, :2] = -100
    options = dict(
        k=5, beta=2.0, normalize=True, ce_weight=1.0, divergence=divergence, vocab_size=vocab
    )
    outputs = []
    for loss_fn in (fused_distillation_loss, dense_distillation_loss):
        out = loss_fn(s_hidden, s_weight, t_hidden, t_weight, labels, **options)
        grads = torch.autograd.grad(out.loss, (s_hidden, s_weight))
        outputs.append((out, grads))
    (fused, fused_grads), (dense, dense_grads) = outputs
    torch.testing.assert_close(fused.loss, dense.loss)
    for name in LOSS_TERMS:
        torch.testing.assert_close(getattr(fused.terms, name), getattr(dense.terms, name))
    assert fused.num_tokens == dense.num_tokens == b * t - 2
    for fused_grad, dense_grad in zip(fused_grads, dense_grads):
        torch.testing.assert_close(fused_grad, dense_grad)


NO_COMPILER = """
import sys, warnings, torch
import torch._inductor.config as config
config.cpp.cxx = ("/nonexistent/g++",)  # a node without a working C++ compiler
from helpers import loss_and_grads, make_batch
from tail_kd.losses import fused_distillation_loss
from tail_kd.losses.fused import CompileFallbackWarning
batch = make_batch(dtype=torch.float32, length=30)
kwargs = dict(k=5, beta=2.0, chunk_size=7)  # sequences longer than a chunk: the pre-pass too
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    compiled = loss_and_grads(fused_distillation_loss, *batch, compile=True, **kwargs)
eager = loss_and_grads(fused_distillation_loss, *batch, **kwargs)
assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
print(*[w.message for w in caught if w.category is CompileFallbackWarning], sep="\\n")
"""


def test_a_node_that_cannot_compile_falls_back_to_eager_with_one_warning(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # nothing cached
    proc = subprocess.run(
        [sys.executable, "-c", NO_COMPILER],
        cwd=Path(__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (warning,) = proc.stdout.strip().splitlines()
    assert "torch.compile does not work on this cpu node (InvalidCxxCompiler" in warning
    assert "Set --set loss.kernels=eager" in warning


def test_bf16_lm_head_gradient_is_as_accurate_in_many_chunks_as_in_one():
    """The weight gradient sums every chunk's contribution: a bf16 running sum loses the later,
    small ones (here 3x the error of one chunk at 128 chunks); a float32 one does not."""
    g = torch.Generator().manual_seed(0)
    s_hidden = 1.0 + 0.1 * torch.randn(4, 256, 16, generator=g)  # every position pulls one way
    t_hidden = torch.randn(4, 256, 16, generator=g)
    s_weight = 0.1 * torch.randn(64, 16, generator=g)
    t_weight = torch.randn(64, 16, generator=g)
    labels = torch.zeros(4, 256, dtype=torch.long)
    bf16 = [x.bfloat16() for x in (s_hidden, s_weight, t_hidden, t_weight)]
    kwargs = dict(k=5, beta=2.0, normalize=False, divergence="tad")
    exact = loss_and_grads(dense_distillation_loss, *(x.double() for x in bf16), labels, **kwargs)

    def weight_error(chunk_size):
        grad_w = loss_and_grads(
            fused_distillation_loss, *bf16, labels, chunk_size=chunk_size, **kwargs
        )[2]
        assert grad_w.dtype == torch.bfloat16
        return float((grad_w.double() - exact[2]).norm() / exact[2].norm())

    one_chunk = weight_error(1024)
    assert one_chunk < 5e-3  # bf16 rounding of the result itself
    assert weight_error(8) <= 1.2 * one_chunk
