"""Helpers shared by test modules."""

from __future__ import annotations

import torch

from tail_kd.losses import IGNORE_INDEX


# ---------------------------------------------------------------------------------------------
# Loss inputs
# ---------------------------------------------------------------------------------------------


def make_batch(batch=3, length=11, hs=16, ht=24, rows=37, seed=0, dtype=torch.float64, scale=1.0):
    """(student hidden, student lm_head, teacher hidden, teacher lm_head, labels) with a masked
    prompt in sequence 0 and padding at the end of sequence 1."""
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(batch, length, hs, generator=g, dtype=dtype)
    t_hidden = torch.randn(batch, length, ht, generator=g, dtype=dtype)
    s_weight = torch.randn(rows, hs, generator=g, dtype=dtype) * scale
    t_weight = torch.randn(rows, ht, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, rows, (batch, length), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    return s_hidden, s_weight, t_hidden, t_weight, labels


def loss_and_grads(fn, s_hidden, s_weight, *rest, **kwargs):
    """(loss, grad of the student hidden states, grad of the student lm_head) of one loss call;
    `fn` returns a `DistillationLossOutput` or a scalar tensor."""
    s_hidden = s_hidden.detach().clone().requires_grad_(True)
    s_weight = s_weight.detach().clone().requires_grad_(True)
    out = fn(s_hidden, s_weight, *rest, **kwargs)
    loss = out if torch.is_tensor(out) else out.loss
    loss.backward()
    return loss.detach(), s_hidden.grad, s_weight.grad
