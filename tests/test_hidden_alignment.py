"""The hidden-state alignment (tail_kd/losses/hidden.py, tail_kd/hidden_alignment.py) against
torch's own cosine similarity in float64, written out per position, and finite differences.
Training with it on 2 ranks is checked in tests/test_train.py."""

import pytest
import torch
import torch.nn.functional as F

from tail_kd.config import LossConfig, RecipeError, load_recipe
from tail_kd.hidden_alignment import HiddenAlignment, aligned_pairs, hidden_states_at
from tail_kd.losses.hidden import mean_cosine

from helpers import FAMILIES, RECIPE, tiny_family_model


def _reference(student_states, teacher_states, projections, labels) -> torch.Tensor:
    """L_hid position by position: 1 - mean over pairs of the mean over scored positions t
    (labels[t + 1] != -100) of torch's cosine similarity of (W s_t, h_t)."""
    per_pair = []
    for s, h, w in zip(student_states, teacher_states, projections, strict=True):
        cosines = [
            F.cosine_similarity(s[b, t] @ w.T, h[b, t], dim=0)
            for b in range(labels.shape[0])
            for t in range(labels.shape[1] - 1)
            if labels[b, t + 1] != -100
        ]
        per_pair.append(torch.stack(cosines).mean())
    return 1 - torch.stack(per_pair).mean()


def _states(batch=3, length=7, width=5, pairs=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, length, width, generator=generator, dtype=torch.float64)
        for _ in range(pairs)
    ]


def test_mean_cosine_is_torch_cosine_similarity_over_the_valid_positions():
    a, b = _states(pairs=2)
    valid = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    expected = F.cosine_similarity(a, b, dim=-1)[valid].mean()
    torch.testing.assert_close(mean_cosine(a, b, valid), expected, rtol=1e-12, atol=1e-12)
    # a zero state has cosine 0 (no NaN), and no valid position gives 0
    a[0, 0] = 0
    assert mean_cosine(a[:1, :1], b[:1, :1], torch.ones(1, 1, dtype=torch.bool)).item() == 0
    assert mean_cosine(a, b, torch.zeros_like(valid)).item() == 0


def test_alignment_with_projections_matches_the_reference_and_its_gradients():
    """Student width 4 -> teacher width 6: the module's loss and its gradients (student states
    and both projections) equal those of the position-by-position reference."""
    torch.manual_seed(0)
    align = HiddenAlignment([(1, 1), (3, 2)], student_width=4, teacher_width=6).double()
    students = [s.requires_grad_() for s in _states(width=4, seed=2)]
    teachers = _states(width=6, seed=3)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    loss, cosine = align(students, teachers, labels)
    weights = [p.weight for p in align.projections]
    grads = torch.autograd.grad(loss, [*students, *weights])
    copies = [s.detach().clone().requires_grad_() for s in students]
    weight_copies = [w.detach().clone().requires_grad_() for w in weights]
    expected = _reference(copies, teachers, weight_copies, labels)
    expected_grads = torch.autograd.grad(expected, [*copies, *weight_copies])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cosine, 1 - expected.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_alignment_gradients_pass_finite_differences():
    align = HiddenAlignment([(2, 1)], student_width=3, teacher_width=5).double()
    (student,) = _states(batch=2, length=4, width=3, pairs=1, seed=4)
    (teacher,) = _states(batch=2, length=4, width=5, pairs=1, seed=5)
    labels = torch.tensor([[-100, 1, 2, 3], [4, 5, -100, -100]])
    weight = align.projections[0].weight.detach().clone()
    assert torch.autograd.gradcheck(
        lambda s, w: 1 - mean_cosine(s[:, :-1] @ w.T, teacher[:, :-1], labels[:, 1:] != -100),
        (student.requires_grad_(), weight.requires_grad_()),
    )
    # the module computes that very function
    torch.testing.assert_close(
        align([student], [teacher], labels)[0],
        1 - mean_cosine(student[:, :-1] @ weight.T, teacher[:, :-1], labels[:, 1:] != -100),
    )


def test_equal_widths_need_no_projection():
    align = HiddenAlignment([(4, 2)], student_width=8, teacher_width=8)
    assert align.projections is None and not list(align.parameters())


def test_layer_pairs_are_resolved_and_checked():
    assert aligned_pairs(LossConfig(), 24, 12) == [(24, 12)]  # [] = the final states
    assert aligned_pairs(LossConfig(hidden_layers=[(6, 3), (-1, -1), (0, 0)]), 24, 12) == [
        (6, 3),
        (24, 12),
        (0, 0),
    ]
    with pytest.raises(RecipeError, match=r"loss.hidden_layers: \[6, 13\]: the student has 12"):
        aligned_pairs(LossConfig(hidden_layers=[(6, 13)]), 24, 12)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_state_indices_are_those_of_output_hidden_states(family):
    """In every family the loss knows: index n is `output_hidden_states`' n-th entry, and the
    last (the number of layers) the final state, the one the lm_head reads."""
    model = tiny_family_model(family, seed=0)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        every = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        (final,) = hidden_states_at(model, ids, mask, (2,))  # the final one alone: no others
        states = hidden_states_at(model, ids, mask, (0, 1, 2))
    torch.testing.assert_close(final, every.last_hidden_state)
    for index, state in enumerate(states):
        torch.testing.assert_close(state, every.hidden_states[index])


def test_hidden_alignment_needs_a_teacher():
    with pytest.raises(RecipeError, match="loss.hidden_weight: aligns the student's hidden"):
        load_recipe(
            RECIPE,
            [
                "teacher=null",
                "student.init=config",
                "student.path=s",
                "loss.divergence=none",
                "loss.hidden_weight=0.5",
            ],
        )
