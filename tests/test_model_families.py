"""The loss against each model family's own logits: tiny random models of Llama, Qwen2, Gemma-2
(logit soft-capping), Phi-3, Cohere (logit scale) and Granite (logit scaling), built offline."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from helpers import FAMILIES, tiny_family_model
from tail_kd.exit_status import UsageError
from tail_kd.losses import (
    IGNORE_INDEX,
    dense_distillation_loss,
    fused_distillation_loss,
    tad_divergence,
)
from tail_kd.models import check_logits_reproduced, head_logits, logit_transform

LOSS = dict(divergence="tad", k=5, beta=2.0, normalize=True, ce_weight=1.0)


def _batch(vocab_size=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    return ids, labels


def _loss_from_logits(s_logits, t_logits, labels):
    """CE + TAD from full logits (the models' own), mean over valid positions."""
    s_logits, t_logits, labels = s_logits[:, :-1], t_logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    ce = F.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), reduction="none")
    tad = tad_divergence(s_logits, t_logits, mask, k=5, beta=2.0, normalize=True)
    return torch.where(mask, ce.view_as(mask) + tad, 0.0).sum() / mask.sum()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_loss_reproduces_each_familys_own_logits(family):
    teacher, student = tiny_family_model(family, seed=0), tiny_family_model(family, seed=1)
    ids, labels = _batch()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits.double()
        s_logits = student(input_ids=ids).logits.double()
        t_hidden = teacher.base_model(input_ids=ids).last_hidden_state.double()
        s_hidden = student.base_model(input_ids=ids).last_hidden_state.double()
    assert t_logits.abs().max() > 5  # large enough for a missed post-processing to show
    check_logits_reproduced(teacher, "teacher")
    torch.testing.assert_close(head_logits(student, s_hidden.float()), s_logits.float())

    inputs = (
        s_hidden[:, :-1].clone().requires_grad_(),
        student.lm_head.weight.detach().double().clone().requires_grad_(),
        t_hidden[:, :-1],
        teacher.lm_head.weight.detach().double(),
        labels[:, 1:],
    )
    transforms = dict(
        student_transform=logit_transform(student.config),
        teacher_transform=logit_transform(teacher.config),
    )
    fused = fused_distillation_loss(*inputs, chunk_size=5, **LOSS, **transforms)
    expected = _loss_from_logits(s_logits, t_logits, labels)
    torch.testing.assert_close(fused.loss, expected, rtol=1e-6, atol=1e-6)
    # Gradients: the fused loss's hand-made ones against autograd through the same transforms.
    dense = dense_distillation_loss(*inputs, **LOSS, **transforms)
    ours = torch.autograd.grad(fused.loss, inputs[:2])
    reference = torch.autograd.grad(dense.loss, inputs[:2])
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    if not logit_transform(teacher.config).is_identity:  # the transform is what makes it right
        plain = fused_distillation_loss(*inputs, chunk_size=5, **LOSS)
        assert abs(float(plain.loss.detach()) - float(expected)) > 1e-2


def test_a_family_with_unknown_logit_post_processing_is_refused():
    class DoublesItsLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = DoublesItsLogits(tiny_family_model("llama", seed=0).config).eval()
    with pytest.raises(UsageError, match="the teacher .DoublesItsLogits. computes its logits"):
        check_logits_reproduced(model, "teacher")
