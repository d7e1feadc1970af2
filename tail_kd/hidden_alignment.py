"""Which hidden states are aligned, and the projections that map the student's onto the teacher's.

`loss.hidden_weight` > 0 adds the cosine loss of tail_kd/losses/hidden.py. `loss.hidden_layers`
lists [teacher, student] pairs of hidden-state indices as Hugging Face's `output_hidden_states`
numbers them: 0 the embeddings, n the output of decoder layer n, the last (= the number of
layers) the final state after the last norm, the one the lm_head reads; negative indices count
from the end. [] aligns the two final states. A student derived from the teacher keeps layers
`tail_kd.models.teacher_layer_indices` of it: pair each kept teacher layer with its copy.

`HiddenAlignment` is a module of the student's training engine (StudentWithLoss.align): its
projections (one per pair, only when the widths differ) are trained with the student, partitioned
by ZeRO-3 and saved in its checkpoints, and left out of the exported student.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from tail_kd.config import LossConfig, RecipeError
from tail_kd.losses import IGNORE_INDEX
from tail_kd.losses.hidden import hidden_alignment_loss

__all__ = ["aligned_pairs", "hidden_states_at", "HiddenAlignment"]


def aligned_pairs(
    loss: LossConfig, teacher_layers: int, student_layers: int
) -> list[tuple[int, int]]:
    """`loss.hidden_layers` as non-negative (teacher, student) indices, [(final, final)] when
    empty; RecipeError naming the field for an index a model does not have."""
    pairs = loss.hidden_layers or [(-1, -1)]
    resolved = []
    for teacher_index, student_index in pairs:
        indices = []
        for index, layers, who in (
            (teacher_index, teacher_layers, "teacher"),
            (student_index, student_layers, "student"),
        ):
            if not -(layers + 1) <= index <= layers:
                raise RecipeError(
                    f"loss.hidden_layers: [{teacher_index}, {student_index}]: the {who} has "
                    f"{layers} layers, so hidden states 0 (embeddings) to {layers} (final), or "
                    f"-{layers + 1} to -1"
                )
            indices.append(index % (layers + 1))
        resolved.append((indices[0], indices[1]))
    return resolved


def hidden_states_at(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, indices: Sequence[int]
) -> tuple[Tensor, ...]:
    """The backbone's hidden states at `indices` (module docstring's numbering), [B, T, H] each;
    only the final one unless others are asked for."""
    final = model.config.num_hidden_layers
    every = any(index != final for index in indices)
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=every,
    )
    states = out.hidden_states if every else {final: out.last_hidden_state}
    return tuple(states[index] for index in indices)


class HiddenAlignment(nn.Module):
    """L_hid of tail_kd/losses/hidden.py for `pairs` of (teacher, student) hidden-state
    indices, with a learned linear map student width -> teacher width per pair when they
    differ."""

    def __init__(self, pairs: Sequence[tuple[int, int]], student_width: int, teacher_width: int):
        super().__init__()
        self.teacher_indices = tuple(t for t, _ in pairs)
        self.student_indices = tuple(s for _, s in pairs)
        self.projections = (
            nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in pairs)
            if student_width != teacher_width
            else None
        )

    def forward(
        self, student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(L_hid, mean cosine) over the positions the distillation loss scores: state t where
        labels[t + 1] is a token (`labels` [B, T], aligned with the inputs)."""
        if self.projections is not None:
            student_states = [p(s) for p, s in zip(self.projections, student_states, strict=True)]
        valid = labels[:, 1:] != IGNORE_INDEX
        return hidden_alignment_loss(
            [s[:, :-1] for s in student_states], [t[:, :-1] for t in teacher_states], valid
        )
