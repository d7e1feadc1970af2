"""The dense per-token divergences against an independent float64 NumPy implementation."""

import numpy as np
import pytest
import torch

from tail_kd.losses import forward_kl, reverse_kl, tad_divergence


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def numpy_tad(s_logits, t_logits, mask, k, beta, normalize):
    """docs/METHOD.md's equations, token by token: top-K by sorting, the tail by complement."""
    s, t, mask = (np.asarray(x, dtype=np.float64) for x in (s_logits, t_logits, mask))
    batch, length, vocab = s.shape
    d1 = np.zeros((batch, length))
    d2 = np.zeros((batch, length))
    alpha = np.zeros((batch, length))
    for b in range(batch):
        for i in range(length):
            p, q = _softmax(t[b, i]), _softmax(s[b, i])
            kth = np.sort(p)[::-1][min(k, vocab) - 1]
            top = p >= kth
            a_t, a_s = p[~top].sum(), q[~top].sum()
            d1[b, i] = np.sum(p[top] * np.log(p[top] / q[top]))
            if top.all():
                continue
            d1[b, i] += a_t * np.log(a_t / a_s)
            pt, qt = p[~top] / a_t, q[~top] / a_s
            d2[b, i] = np.sum(pt * np.log(pt / qt))
            alpha[b, i] = a_t
    weight = beta * alpha
    if normalize:
        mean = (alpha * mask).sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1)
        weight = np.divide(
            weight, mean, out=np.zeros_like(weight), where=mean > 0
        )  # no tails: no term
    return np.where(mask > 0, d1 + weight * d2, 0.0)


def numpy_kl(a_logits, b_logits):
    """KL(softmax(a) || softmax(b)) per token."""
    a, b = np.asarray(a_logits, np.float64), np.asarray(b_logits, np.float64)
    out = np.zeros(a.shape[:-1])
    for idx in np.ndindex(*a.shape[:-1]):
        pa, pb = _softmax(a[idx]), _softmax(b[idx])
        out[idx] = np.sum(pa * np.log(pa / pb))
    return out


def _inputs(batch=2, length=6, vocab=40, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * scale
    t = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * scale
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :2] = False  # a masked prompt
    mask[-1, -1] = False  # padding
    return s, t, mask


@pytest.mark.parametrize("k", [1, 5, 39, 40, 100])
@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_tad_matches_numpy(k, beta, normalize):
    s, t, mask = _inputs()
    ours = tad_divergence(s, t, mask, k=k, beta=beta, normalize=normalize)
    ref = numpy_tad(s, t, mask, k, beta, normalize)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_kl_baselines_match_numpy():
    s, t, mask = _inputs()
    np.testing.assert_allclose(
        forward_kl(s, t, mask).numpy(), numpy_kl(t, s) * mask.numpy(), atol=1e-12
    )
    np.testing.assert_allclose(
        reverse_kl(s, t, mask).numpy(), numpy_kl(s, t) * mask.numpy(), atol=1e-12
    )


@pytest.mark.parametrize("k", [1, 3, 10])
def test_unnormalised_beta_one_is_forward_kl(k):
    s, t, mask = _inputs(seed=1)
    tad = tad_divergence(s, t, mask, k=k, beta=1.0, normalize=False)
    torch.testing.assert_close(tad, forward_kl(s, t, mask), rtol=1e-12, atol=1e-12)
    # ...and with the normalisation beta = 1 is not plain KL.
    normalised = tad_divergence(s, t, mask, k=k, beta=1.0, normalize=True)
    assert not torch.allclose(normalised, forward_kl(s, t, mask))


def test_float32_inputs_give_float32_close_to_float64():
    s, t, mask = _inputs(seed=2)
    out32 = tad_divergence(s.float(), t.float(), mask, k=5, beta=2.0)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(
        out32.double(), tad_divergence(s, t, mask, k=5, beta=2.0), rtol=1e-4, atol=1e-5
    )
    bf16 = tad_divergence(s.bfloat16(), t.bfloat16(), mask, k=5, beta=2.0)
    assert bf16.dtype == torch.float32


@pytest.mark.parametrize("fn", ["tad", "tad_unnormalised", "forward_kl", "reverse_kl"])
def test_gradcheck(fn):
    s, t, mask = _inputs(batch=2, length=3, vocab=9, seed=3, scale=1.0)
    s.requires_grad_(True)
    funcs = {
        "tad": lambda x: tad_divergence(x, t, mask, k=3, beta=2.0),
        "tad_unnormalised": lambda x: tad_divergence(x, t, mask, k=2, beta=0.5, normalize=False),
        "forward_kl": lambda x: forward_kl(x, t, mask),
        "reverse_kl": lambda x: reverse_kl(x, t, mask),
    }
    assert torch.autograd.gradcheck(funcs[fn], (s,))


def test_gradient_matches_method_formula():
    """docs/METHOD.md: dL/dz_j = q_j - p_j on T_K and (q_j - p_j) + (w - 1)(q_j aT/aS - p_j) on the tail."""
    s, t, mask = _inputs(batch=1, length=5, vocab=30, seed=4)
    mask[:] = True
    k, beta = 4, 2.0
    s.requires_grad_(True)
    tad_divergence(s, t, mask, k=k, beta=beta, normalize=True).sum().backward()
    p, q = t.softmax(-1), s.detach().softmax(-1)
    top = t >= t.topk(k, -1).values[..., -1:]
    a_t = (p * ~top).sum(-1, keepdim=True)
    a_s = (q * ~top).sum(-1, keepdim=True)
    w = beta / a_t.mean()
    expected = torch.where(top, q - p, (q - p) + (w - 1) * (q * a_t / a_s - p))
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-12)


def test_peaked_teacher_ties_and_empty_tail_stay_finite():
    s, t, mask = _inputs(batch=2, length=4, vocab=12, seed=5)
    t[0, 0] = -1e4
    t[0, 0, 3] = 1e4  # tail mass exactly 0 in floating point
    t[0, 1] = 0.0  # all tied: the whole vocabulary is "top" at every K
    t[1, :, :6] = 5.0  # ties across the K-th value
    s[1, 2] = -1e4
    s[1, 2, 0] = 1e4  # student puts ~no mass on the tail
    s.requires_grad_(True)
    for k in (1, 3, 12, 50):
        for normalize in (True, False):
            out = tad_divergence(s, t, mask, k=k, beta=2.0, normalize=normalize)
            (grad,) = torch.autograd.grad(out.sum(), s)
            assert torch.isfinite(out).all() and torch.isfinite(grad).all(), (k, normalize)
            assert (out[mask] > -1e-9).all()
    # A tied row has an empty tail: L_DIV = D1 = KL there.
    out = tad_divergence(s, t, mask, k=1, beta=2.0)
    torch.testing.assert_close(out[0, 1], forward_kl(s, t, mask)[0, 1])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0, "beta": 1.0}, "k"),
        ({"k": -2, "beta": 1.0}, "k"),
        ({"k": 2.5, "beta": 1.0}, "k"),
        ({"k": 3, "beta": -0.1}, "beta"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    s, t, mask = _inputs()
    with pytest.raises(ValueError, match=rf"^{name} must"):
        tad_divergence(s, t, mask, **kwargs)


def test_shape_mismatch_is_reported():
    s, t, mask = _inputs()
    with pytest.raises(ValueError, match="same"):
        tad_divergence(s, t[..., :-1], mask, k=2, beta=1.0)
    with pytest.raises(ValueError, match="mask"):
        forward_kl(s, t, mask[:, :-1])
