"""The fused chunked loss against the dense reference: values, gradients, edge cases, errors."""

import pytest
import torch
import torch.nn.functional as F

from tail_kd.losses import IGNORE_INDEX, forward_kl, fused_tad_loss, reverse_kl, tad_divergence


def make_batch(batch=3, length=11, hs=16, ht=24, rows=37, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(batch, length, hs, generator=g, dtype=dtype)
    t_hidden = torch.randn(batch, length, ht, generator=g, dtype=dtype)
    s_weight = torch.randn(rows, hs, generator=g, dtype=dtype) * scale
    t_weight = torch.randn(rows, ht, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, rows, (batch, length), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    return s_hidden, s_weight, t_hidden, t_weight, labels


def dense_reference(s_hidden, s_weight, t_hidden, t_weight, labels, *, k, beta, normalize, ce_weight,
                    divergence, vocab_size=None):
    """Full logits + the dense divergences + cross-entropy, differentiated by autograd."""
    v = vocab_size or s_weight.shape[0]
    s_logits = s_hidden @ s_weight[:v].T
    t_logits = t_hidden @ t_weight[:v].T
    mask = labels != IGNORE_INDEX
    ce = F.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    if divergence == "tad":
        div = tad_divergence(s_logits, t_logits, mask, k=k, beta=beta, normalize=normalize)
    elif divergence == "forward_kl":
        div = forward_kl(s_logits, t_logits, mask)
    elif divergence == "reverse_kl":
        div = reverse_kl(s_logits, t_logits, mask)
    else:
        div = torch.zeros_like(ce)
    return ((ce_weight * ce + div) * mask).sum() / mask.sum().clamp_min(1)


def loss_and_grads(fn, s_hidden, s_weight, *rest, **kwargs):
    s_hidden = s_hidden.detach().clone().requires_grad_(True)
    s_weight = s_weight.detach().clone().requires_grad_(True)
    out = fn(s_hidden, s_weight, *rest, **kwargs)
    loss = out if torch.is_tensor(out) else out.loss
    loss.backward()
    return loss.detach(), s_hidden.grad, s_weight.grad


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


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['divergence']}-k{c['k']}-b{c['beta']}-n{c['normalize']}")
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("ce_weight", [1.0, 0.0])
def test_fused_matches_dense(case, chunk_size, ce_weight):
    batch = make_batch()
    ref = loss_and_grads(dense_reference, *batch, ce_weight=ce_weight, **case)
    ours = loss_and_grads(fused_tad_loss, *batch, ce_weight=ce_weight, chunk_size=chunk_size, **case)
    for a, b, name in zip(ours, ref, ("loss", "grad student_hidden", "grad student_weight")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("divergence", ["tad", "forward_kl", "reverse_kl"])
def test_padded_vocabulary_rows_are_excluded(divergence):
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch(rows=40)
    vocab_size = 33
    labels = labels.clamp(max=vocab_size - 1)
    kwargs = dict(k=4, beta=2.0, normalize=True, ce_weight=1.0, divergence=divergence, vocab_size=vocab_size)
    ref = loss_and_grads(dense_reference, s_hidden, s_weight, t_hidden, t_weight, labels, **kwargs)
    ours = loss_and_grads(fused_tad_loss, s_hidden, s_weight, t_hidden, t_weight, labels, chunk_size=5, **kwargs)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[2][:vocab_size], ref[2][:vocab_size], rtol=1e-10, atol=1e-12)
    assert (ours[2][vocab_size:] == 0).all()


def test_diagnostics_are_means_over_valid_tokens():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch()
    out = fused_tad_loss(s_hidden, s_weight, t_hidden, t_weight, labels, k=5, beta=2.0, chunk_size=4)
    mask = labels != IGNORE_INDEX
    s_logits, t_logits = s_hidden @ s_weight.T, t_hidden @ t_weight.T
    p, q = t_logits.softmax(-1), s_logits.softmax(-1)
    top = t_logits >= t_logits.topk(5, -1).values[..., -1:]
    torch.testing.assert_close(out.teacher_tail_mass, (p * ~top).sum(-1)[mask].mean())
    torch.testing.assert_close(out.student_tail_mass, (q * ~top).sum(-1)[mask].mean())
    torch.testing.assert_close(out.student_topk_mass, (q * top).sum(-1)[mask].mean())
    torch.testing.assert_close(out.kl_to_teacher, forward_kl(s_logits, t_logits, mask)[mask].mean())
    torch.testing.assert_close(
        out.divergence, tad_divergence(s_logits, t_logits, mask, k=5, beta=2.0)[mask].mean()
    )
    ce = F.cross_entropy(s_logits[mask], labels[mask])
    torch.testing.assert_close(out.ce, ce)
    assert out.num_tokens == int(mask.sum())


def test_long_sequences_use_the_teacher_prepass_and_stay_exact():
    """Sequences longer than the chunk are split; their normaliser comes from a teacher pre-pass."""
    batch = make_batch(batch=2, length=30)
    kwargs = dict(k=3, beta=2.0, normalize=True, ce_weight=1.0, divergence="tad")
    ref = loss_and_grads(dense_reference, *batch, **kwargs)
    for chunk_size in (5, 26, 27):  # every sequence long / only one long / none
        ours = loss_and_grads(fused_tad_loss, *batch, chunk_size=chunk_size, **kwargs)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_inputs_are_as_accurate_as_a_bf16_dense_loss():
    """bf16 logits carry ~3 significant digits; the fused loss must not lose more than autograd does."""
    batch64 = make_batch(hs=32, ht=32, rows=300, seed=3)
    batch16 = tuple(x.bfloat16() if x.is_floating_point() else x for x in batch64)
    kwargs = dict(k=10, beta=2.0, normalize=True, ce_weight=1.0, divergence="tad")
    exact = loss_and_grads(dense_reference, *(x.double() if x.is_floating_point() else x for x in batch16), **kwargs)
    dense16 = loss_and_grads(dense_reference, *batch16, **kwargs)
    ours = loss_and_grads(fused_tad_loss, *batch16, chunk_size=8, **kwargs)
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
        ref = loss_and_grads(dense_reference, s_hidden, s_weight, t_hidden, t_weight, labels, k=k, **kwargs)
        ours = loss_and_grads(fused_tad_loss, s_hidden, s_weight, t_hidden, t_weight, labels, k=k, chunk_size=6, **kwargs)
        for a, b in zip(ours, ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_batch_without_valid_positions_gives_zero():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch()
    labels[:] = IGNORE_INDEX
    loss, grad_h, grad_w = loss_and_grads(fused_tad_loss, s_hidden, s_weight, t_hidden, t_weight, labels, k=5, beta=2.0)
    assert loss == 0 and (grad_h == 0).all() and (grad_w == 0).all()


def test_no_gradient_work_in_eval_mode():
    batch = make_batch()
    with torch.no_grad():
        out = fused_tad_loss(*batch, k=5, beta=2.0)
    assert not out.loss.requires_grad and torch.isfinite(out.loss)


def test_backward_scales_with_the_upstream_gradient():
    batch = make_batch()
    _, g_h, g_w = loss_and_grads(lambda *a, **kw: 3.0 * fused_tad_loss(*a, **kw).loss, *batch, k=5, beta=2.0)
    _, r_h, r_w = loss_and_grads(fused_tad_loss, *batch, k=5, beta=2.0)
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
        fused_tad_loss(*make_batch(), **kwargs)


def test_bad_shapes_and_labels_are_named():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch()
    with pytest.raises(ValueError, match="student_weight"):
        fused_tad_loss(s_hidden, s_weight[:, :-1], t_hidden, t_weight, labels, k=3, beta=1.0)
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_tad_loss(s_hidden, s_weight, t_hidden[:, :-1], t_weight, labels, k=3, beta=1.0)
    with pytest.raises(ValueError, match="same token rows"):
        fused_tad_loss(s_hidden, s_weight, t_hidden, t_weight[:-1], labels, k=3, beta=1.0)
    labels[2, 0] = s_weight.shape[0]
    with pytest.raises(ValueError, match="labels must lie in"):
        fused_tad_loss(s_hidden, s_weight, t_hidden, t_weight, labels, k=3, beta=1.0)


@pytest.mark.parametrize("divergence, k", [("tad", 5), ("forward_kl", None), ("reverse_kl", 3), ("none", None)])
def test_compiled_kernels_match_eager(divergence, k):
    batch = make_batch(dtype=torch.float32)
    kwargs = dict(k=k, beta=2.0, divergence=divergence, chunk_size=7)
    eager = loss_and_grads(fused_tad_loss, *batch, **kwargs)
    compiled = loss_and_grads(fused_tad_loss, *batch, compile=True, **kwargs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
