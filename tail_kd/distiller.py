"""The two DeepSpeed engines of a distillation job and one distillation forward.

Teacher: a ZeRO-3 inference engine (`deepspeed.initialize` with no optimizer, as TRL's
`prepare_deepspeed` does), in eval mode with gradients off; its weights are sharded over all ranks.
Its forward returns hidden states only (`TeacherHiddenStates`): the final ones, and those the
hidden-state alignment needs. With `teacher.cached_states` those states come with each batch
instead (tail_kd/teacher_cache.py) and the engine holds the teacher's lm_head alone
(`TeacherHead`): no teacher forward. A recipe without a teacher (CE only) has none: no engine, no
forward, no lm_head, no teacher metrics.

Student: a training engine (ZeRO-3, or the stage `parallel.student_zero_stage` chose:
tail_kd/placement.py) around `StudentWithLoss`, whose forward runs the student's
backbone and then the loss on both models' final hidden states and lm_head weights, plus
`loss.hidden_weight` times the hidden-state alignment (tail_kd/hidden_alignment.py, whose
projections the engine trains with the student). The logits of the batch are never materialised
(with the fused loss). Where the loss gets the lm_head weights from is the head source's
business (tail_kd/heads.py: gathered whole, or row shards per rank).

This module imports DeepSpeed: import it after `tail_kd.distributed.init_distributed`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import deepspeed
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from tail_kd.config import DataConfig, LossConfig, Recipe
from tail_kd.deepspeed_config import student_config, teacher_config
from tail_kd.distributed import DistContext
from tail_kd.eval.metrics import TokenMetrics, score_hidden_states
from tail_kd.heads import HeadSource, LossFunction, lm_head, make_heads
from tail_kd.hidden_alignment import HiddenAlignment, aligned_pairs, hidden_states_at
from tail_kd.losses import (
    IDENTITY,
    LossInputs,
    dense_distillation_loss,
    fused_distillation_loss,
)
from tail_kd.models import head_logits, logit_transform
from tail_kd.pair import ModelPlan
from tail_kd.placement import Placement
from tail_kd.optim import lr_scheduler, weight_decay_groups
from tail_kd.teacher_cache import STATES_KEY, TeacherHead, state_indices

__all__ = [
    "loss_function",
    "TeacherHiddenStates",
    "teacher_engine",
    "StudentWithLoss",
    "Distiller",
]


def loss_function(
    loss: LossConfig, plan: ModelPlan, device: str, data: DataConfig, *, reference: bool = False
) -> LossFunction:
    """The recipe's loss as `fn(*LossInputs, group=None) -> DistillationLossOutput`: the fused
    loss (compiled on GPUs unless `loss.kernels` says otherwise), or with `reference=True` the
    dense reference (full [tokens, V] logits: for checking and debugging only). The models'
    vocabulary and logit post-processing come from their `plan`; the chunk size from
    `loss.chunk_tokens(data.seq_len)`. Packed data (`data.kind: pretrain`, a label at every
    position) split into the same chunks at every micro-batch: their compiled chunks get static
    shapes; question/answer data's vary, and get one dynamic-shape graph."""
    has_teacher = plan.teacher_config is not None
    options = dict(
        divergence=loss.divergence,
        k=loss.k if has_teacher else None,  # the top-K diagnostics need the teacher
        beta=loss.beta,
        normalize=loss.normalize,
        ce_weight=loss.ce_weight,
        vocab_size=plan.vocab_size,
        student_transform=logit_transform(plan.student_config),
        teacher_transform=logit_transform(plan.teacher_config) if has_teacher else IDENTITY,
    )
    if reference:
        return functools.partial(dense_distillation_loss, **options)
    compiled = loss.kernels == "compiled" or (loss.kernels == "auto" and device == "cuda")
    return functools.partial(
        fused_distillation_loss,
        chunk_size=loss.chunk_tokens(data.seq_len),
        compile=compiled,
        static_shapes=data.kind == "pretrain",
        **options,
    )


class TeacherHiddenStates(nn.Module):
    """A causal LM reduced to its backbone: input ids -> (final hidden states [B, T, H], *the
    hidden states at `aligned`, the alignment's teacher indices)."""

    def __init__(self, model: PreTrainedModel, aligned: tuple[int, ...] = ()):
        super().__init__()
        self.model = model
        self.indices = (model.config.num_hidden_layers, *aligned)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        return hidden_states_at(self.model, input_ids, attention_mask, self.indices)


def teacher_engine(
    module: nn.Module, recipe: Recipe, ctx: DistContext, placement: Placement = Placement()
):
    """The frozen teacher `module` (no gradients, eval mode) placed as `placement` says
    (tail_kd/placement.py): a ZeRO-3 inference engine (no optimizer; the student's batch split and
    ZeRO-3 settings, the placement's hpZ group, in the dtype of the module's weights), or,
    replicated, the module itself on this rank's device."""
    module.requires_grad_(False)
    if placement.teacher == "replicated":
        return module.to(ctx.device).eval()
    dtype = next(module.parameters()).dtype
    ds_student = student_config(recipe, ctx.world_size, ctx.device.type, placement)
    config = teacher_config(ds_student, dtype, placement.hpz_partition_size)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


class StudentWithLoss(nn.Module):
    """The student's training forward: backbone -> final hidden states -> distillation loss.

    Position t's hidden state predicts the token at t + 1: the loss sees hidden[:, :-1] against
    labels[:, 1:] (labels follow the Hugging Face convention, aligned with input_ids, -100 = none).
    With an `align`ment, loss = distillation loss + hidden_weight * L_hid
    (tail_kd/losses/hidden.py) on the same positions. Returns a dict of tensors (DeepSpeed's
    ZeRO-3 hooks only look inside tuples, lists and dicts): `tail_kd.losses.STEP_SCALARS` (the loss
    differentiable, the rest detached means over the micro-batch's valid tokens) and `num_tokens`.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        loss_fn: LossFunction,
        heads: HeadSource,
        align: HiddenAlignment | None = None,
        hidden_weight: float = 0.0,
    ):
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn
        self.heads = heads
        self.align = align
        self.hidden_weight = hidden_weight
        self.indices = (student.config.num_hidden_layers,)
        if align is not None:
            self.indices += align.student_indices
        heads.attach(self, student)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        teacher_states: tuple[Tensor, ...] | None,
        teacher_weight: Tensor | None,
    ) -> dict[str, Tensor]:
        """`labels`: on the host or the device (the loss reads them where they are).
        `teacher_states`: `TeacherHiddenStates`' output; it and teacher_weight may be None for
        a loss that needs no teacher (CE only)."""
        hidden, *aligned = hidden_states_at(self.student, input_ids, attention_mask, self.indices)
        weight = self.heads.student_weight(self.student)
        if not torch.is_grad_enabled():  # evaluation: spare the fused loss its in-pass gradients
            weight = weight.detach()
        inputs = LossInputs(
            student_hidden=hidden[:, :-1],
            student_weight=weight,
            teacher_hidden=None if teacher_states is None else teacher_states[0][:, :-1],
            teacher_weight=teacher_weight,
            labels=labels[:, 1:],
        )
        result = self.heads.loss(self.loss_fn, inputs)
        scalars = result.scalars()
        cosine = torch.full_like(scalars["ce"], math.nan)  # STEP_SCALARS has it: NaN when off
        if self.align is not None:
            on_device = labels.to(hidden.device, non_blocking=True)
            distance, cosine = self.align(aligned, teacher_states[1:], on_device)
            scalars["loss"] = scalars["loss"] + self.hidden_weight * distance
        num_tokens = torch.tensor(float(result.num_tokens), device=result.loss.device)
        return {**scalars, "hidden_cosine": cosine, "num_tokens": num_tokens}


class Distiller:
    """The teacher and student engines, and one distillation forward on a micro-batch.

    Build it on every rank with the (unpartitioned) teacher, or None, or with cached teacher
    states its `TeacherHead`, and student; `deepspeed.initialize` shards both. Then per
    micro-batch: `out = distiller.forward(batch)`, `distiller.backward(out["loss"])`, and
    `distiller.student.step()` (a no-op except at the gradient-accumulation boundary).
    """

    def __init__(
        self,
        teacher: PreTrainedModel | TeacherHead | None,
        student: PreTrainedModel,
        *,
        recipe: Recipe,
        ctx: DistContext,
        loss_fn: LossFunction,
        vocab_size: int,
        placement: Placement = Placement(),
    ):
        """`vocab_size`: the real tokens the two lm_heads share (the loss's vocabulary);
        `placement`: the teacher's and the student's (tail_kd/placement.py)."""
        ds_student = student_config(recipe, ctx.world_size, ctx.device.type, placement)
        if recipe.train.activation_checkpointing:
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.heads = make_heads(recipe.parallel.vocab_parallel_size, vocab_size, student)
        align = None
        if recipe.loss.hidden_weight > 0:
            pairs = aligned_pairs(
                recipe.loss, teacher.config.num_hidden_layers, student.config.num_hidden_layers
            )
            align = HiddenAlignment(pairs, student.config.hidden_size, teacher.config.hidden_size)
        model = StudentWithLoss(student, loss_fn, self.heads, align, recipe.loss.hidden_weight)
        self.student, *_ = deepspeed.initialize(
            model=model,
            model_parameters=weight_decay_groups(model, recipe.train.weight_decay),
            config=ds_student,
            lr_scheduler=lr_scheduler(recipe.train),
        )
        # The teacher's causal LM (its lm_head alone with cached states) inside its engine.
        self.teacher_model = teacher
        self.teacher = None
        if teacher is not None:
            aligned = () if align is None else align.teacher_indices
            cached = isinstance(teacher, TeacherHead)
            module = teacher if cached else TeacherHiddenStates(teacher, aligned)
            self.teacher = teacher_engine(module, recipe, ctx, placement)
            if cached:  # which stored state (each stored once) is each of the forward's outputs
                final, layers = teacher.config.num_hidden_layers, student.config.num_hidden_layers
                stored = state_indices(recipe.loss, final, layers)
                self.stored_positions = [stored.index(index) for index in (final, *aligned)]
        self.heads.bind(self.student, self.teacher_model)
        self.device = ctx.device
        self.vocab_size = vocab_size

    def _on_device(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The micro-batch on the device, copied without blocking (the loader pins it on GPUs)."""
        return {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}

    def _teacher_states(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """`TeacherHiddenStates`' output for the micro-batch (on the device): read from the batch
        with cached states ([B, S, T, H_t], `stored_positions`), else the teacher engine's
        forward."""
        if isinstance(self.teacher_model, TeacherHead):
            states = batch[STATES_KEY]
            return tuple(states[:, position] for position in self.stored_positions)
        return self.teacher(batch["input_ids"], batch["attention_mask"])

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Teacher hidden states (no autograd), then the student's loss forward: one micro-batch.
        The loss gets the host's labels (`batch` as the loader made it): it works out the valid
        tokens there, with no device synchronisation (tail_kd/losses/fused.py); only the hidden
        alignment copies them to the device (`StudentWithLoss`)."""
        labels = batch["labels"]
        on_device = self._on_device({k: v for k, v in batch.items() if k != "labels"})
        input_ids, attention_mask = on_device["input_ids"], on_device["attention_mask"]
        if self.teacher is None:
            return self.student(input_ids, attention_mask, labels, None, None)
        with torch.no_grad():
            teacher_states = self._teacher_states(on_device)
        teacher_weight = self.heads.teacher_weight()
        return self.student(input_ids, attention_mask, labels, teacher_states, teacher_weight)

    def backward(self, loss: Tensor) -> None:
        """The student engine's backward (and the head source's bookkeeping)."""
        self.student.backward(loss)
        self.heads.after_backward()

    @torch.no_grad()
    def score(self, batch: Mapping[str, Tensor], metrics: TokenMetrics) -> None:
        """Add a held-out micro-batch to `metrics` (tail_kd.eval, the code `tail-kd eval` runs):
        both backbones' final hidden states, then logits for a few hundred positions at a time
        (`score_hidden_states`) from the whole lm_heads, gathered here whatever the head source,
        post-processed as each model does it (`head_logits`), real vocabulary rows only. Call it on
        every rank (ZeRO-3 gathers the weights of each module collectively); sum the ranks'
        `metrics.state()`."""
        batch = self._on_device(batch)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        student, teacher = self.student.module.student, self.teacher_model
        teacher_hidden = None if teacher is None else self._teacher_states(batch)[0]
        hidden = student.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        heads = [lm_head(model) for model in (student, teacher) if model is not None]
        with deepspeed.zero.GatheredParameters(heads):  # read-only: no modifier_rank
            score_hidden_states(
                metrics,
                hidden,
                lambda h: head_logits(student, h),
                batch["labels"],
                teacher_hidden,
                None if teacher is None else lambda h: head_logits(teacher, h),
                vocab_size=self.vocab_size,
            )
