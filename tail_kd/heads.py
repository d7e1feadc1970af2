"""Where the loss gets the two lm_head weights from under ZeRO-3: a "head source".

ZeRO-3 partitions every weight and gathers a module's weights only around that module's own
forward; the loss reads both lm_heads outside their modules. Two sources solve that:

- `GatheredHeads` (the default, `parallel.vocab_parallel_size: 1`): the whole weights.
  - The student's lm_head weight (for tied models, the input embedding) is registered as an
    *external parameter* of the student's loss module
    (`deepspeed.zero.register_external_parameter`):
    ZeRO-3 gathers it when that module's forward starts and keeps it until the forward ends (the
    embedding layer's own release does not drop it). The gradient the fused loss returns for it
    is accumulated into the parameter (summed with the embedding's, when tied) and
    reduce-scattered by ZeRO-3 like any other.
  - The teacher's lm_head weight is frozen: a ZeRO-3 teacher's is gathered once, read-only
    (`GatheredParameters`, no modifier rank), and a whole copy kept for the run, passed in as a
    plain tensor; the teacher gets no gradient. `tail-kd plan` counts it whole already (the
    memory of the lm_heads while the loss runs), so it costs no peak memory and saves a gather of
    V H_t per micro-batch. A replicated teacher's (tail_kd/placement.py) is whole already: it is
    used where it is.
- `ShardedHeads` (`parallel.vocab_parallel_size: P > 1`): each rank reads only its 1/P of the rows
  from ZeRO-3's partitions (the teacher's once, or straight from its weight when the teacher is
  replicated; the student's after each optimizer step), the
  loss runs vocab-parallel over the rank's group, and the rows' gradient goes back into ZeRO-3's
  gradient partitions at the accumulation boundary (tail_kd/sharded_heads.py has the exchange).

The distiller calls a source at fixed points: `attach` (building the student's loss module),
`bind` (after `deepspeed.initialize`), `teacher_weight` (each forward), `student_weight`
and `loss` (inside the student's forward) and `after_backward`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import deepspeed
import torch
from torch import Tensor, nn

from tail_kd.losses import DistillationLossOutput, LossInputs
from tail_kd.sharded_heads import ShardedHead, VocabGroups, group_loss, vocab_groups

__all__ = ["LossFunction", "HeadSource", "GatheredHeads", "ShardedHeads", "make_heads", "lm_head"]

LossFunction = Callable[..., DistillationLossOutput]  # called as loss_fn(*LossInputs)


def lm_head(model: nn.Module) -> nn.Parameter:
    """A causal LM's output embedding weight (the input embedding when tied)."""
    return model.get_output_embeddings().weight


class HeadSource(abc.ABC):
    """The interface (module docstring); the hooks a source does not need do nothing."""

    def attach(self, module: nn.Module, student: nn.Module) -> None:
        """Called once, building the student's loss module `module` around `student`."""

    def bind(self, student_engine, teacher: nn.Module | None) -> None:
        """Called once, after `deepspeed.initialize` partitioned both models (`teacher` None for
        a run without one, whose forwards never ask for `teacher_weight`)."""

    @abc.abstractmethod
    def teacher_weight(self) -> Tensor:
        """The teacher's lm_head weight (or rows) for the loss: frozen, read once in `bind`."""

    @abc.abstractmethod
    def student_weight(self, student: nn.Module) -> Tensor:
        """The student's lm_head weight (or rows), inside the student's forward."""

    @abc.abstractmethod
    def loss(self, loss_fn: LossFunction, inputs: LossInputs) -> DistillationLossOutput:
        """This rank's loss of its micro-batch."""

    def after_backward(self) -> None:
        """Called after each micro-batch's backward."""


class GatheredHeads(HeadSource):
    """Whole lm_head weights, gathered by ZeRO-3 for the loss."""

    def attach(self, module: nn.Module, student: nn.Module) -> None:
        # Used by the loss, outside the lm_head's own forward: let ZeRO-3 gather it for `module`.
        deepspeed.zero.register_external_parameter(module, lm_head(student))

    def bind(self, student_engine, teacher: nn.Module | None) -> None:
        if teacher is None:
            return
        head = lm_head(teacher)
        if not hasattr(head, "ds_id"):  # replicated: whole on this rank
            self.teacher_head = head.data
            return
        with deepspeed.zero.GatheredParameters([head]):  # read-only: no modifier_rank
            self.teacher_head = head.data.clone()

    def teacher_weight(self) -> Tensor:
        return self.teacher_head

    def student_weight(self, student: nn.Module) -> Tensor:
        return lm_head(student)

    def loss(self, loss_fn: LossFunction, inputs: LossInputs) -> DistillationLossOutput:
        return loss_fn(*inputs)


class ShardedHeads(HeadSource):
    """This rank's rows of both lm_heads, read from ZeRO-3's partitions; the group's loss."""

    def __init__(self, groups: VocabGroups, tied: bool):
        self.groups = groups
        self.tied = tied  # the student's lm_head is its input embedding, which has its own grads
        self.rows: Tensor | None = None  # the student's rows: a leaf the loss leaves its grad in
        self.rows_step = -1  # the optimizer step the rows were read at
        self.row_grad: Tensor | None = None  # float32, summed over this step's micro-batches

    def bind(self, student_engine, teacher: nn.Module | None) -> None:
        self.engine = student_engine
        self.student_head = ShardedHead(lm_head(student_engine.module.student), self.groups)
        if teacher is None:
            return
        head = lm_head(teacher)
        if hasattr(head, "ds_tensor"):  # ZeRO-3 partitions: this rank's rows from them
            self.teacher_rows = ShardedHead(head, self.groups).gather_rows()
        else:  # a replicated teacher: its rows are here
            start, stop = self.groups.rows
            self.teacher_rows = head.data[start:stop]

    def teacher_weight(self) -> Tensor:
        return self.teacher_rows

    def student_weight(self, student: nn.Module) -> Tensor:
        """The rows, read again after each optimizer step (and after a checkpoint load, which
        sets the step): one all_to_all."""
        if self.rows_step != self.engine.global_steps:
            rows = self.student_head.gather_rows()
            if self.rows is None:
                self.rows = rows.requires_grad_()
            else:
                with torch.no_grad():
                    self.rows.copy_(rows)
            self.rows_step = self.engine.global_steps
        return self.rows

    def loss(self, loss_fn: LossFunction, inputs: LossInputs) -> DistillationLossOutput:
        return group_loss(loss_fn, inputs, self.groups)

    def after_backward(self) -> None:
        """The rows' gradient, summed over micro-batches, handed to ZeRO-3 at the accumulation
        boundary (before the optimizer step, which clips and applies it with the others)."""
        grad = self.rows.grad.float()
        self.rows.grad = None
        self.row_grad = grad if self.row_grad is None else self.row_grad.add_(grad)
        if self.engine.is_gradient_accumulation_boundary():
            self.student_head.add_grad_to_partition(self.row_grad, accumulate=self.tied)
            self.row_grad = None


def make_heads(vocab_parallel_size: int, vocab_size: int, student: nn.Module) -> HeadSource:
    """The source for `parallel.vocab_parallel_size` (a collective when > 1: it makes groups)."""
    if vocab_parallel_size == 1:
        return GatheredHeads()
    tied = student.get_input_embeddings().weight is lm_head(student)
    return ShardedHeads(vocab_groups(vocab_parallel_size, vocab_size), tied)
