"""Step health: steps whose loss or gradients are not finite, the skipped updates, and why.

A micro-batch whose loss is NaN or infinite gets NaN gradients (`poison_nonfinite`), and DeepSpeed
skips an update whose global gradient norm is not finite (ZeRO-3 checks it in every precision)
and clears the gradients, leaving the weights, the optimizer state and the LR schedule as they
were. The skip is agreed by all ranks (the norm is global), counted (`train/skipped_steps` in
TensorBoard, DeepSpeed's own counter, kept in checkpoints) and explained on the console
(`why_skipped`): the loss (rank, micro-batch, terms) or, from the second skipped step in a row
on, the parameters whose gradients are not finite (`nonfinite_gradients` costs one pass over each
rank's gradient shard, so it runs only then). `SkippedSteps` keeps the current run of skipped
steps: `train.max_skipped_steps` in a row stop the run (exit status 3). The batches of a skipped
step are consumed; `--resume` after a stop continues after them.

`FaultInjector` makes such steps on purpose (`debug.nan_loss_steps`, `debug.nan_grad_steps`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from tail_kd.config import DebugConfig
from tail_kd.distributed import DistContext

__all__ = [
    "poison_nonfinite",
    "nonfinite_gradients",
    "why_skipped",
    "SkippedSteps",
    "FaultInjector",
]


def poison_nonfinite(loss: Tensor) -> Tensor:
    """`loss` x 1 when finite (bit-identical), x NaN otherwise: then every gradient is NaN and
    the update is skipped, whatever gradients the loss made (the fused loss makes them in its
    forward)."""
    finite = torch.isfinite(loss)
    return loss * torch.where(finite, torch.ones_like(loss), torch.full_like(loss, math.nan))


def nonfinite_gradients(model: nn.Module, ctx: DistContext) -> list[str]:
    """The parameters of `model` whose gradient is not finite on some rank, in model order.

    Call between the last backward of a step and its `engine.step()`; a collective.
    """
    from deepspeed.utils import safe_get_local_grad

    named = list(model.named_parameters())
    local = []
    for name, parameter in named:
        if parameter.requires_grad:
            grad = safe_get_local_grad(parameter)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                local.append(name)
    bad = {name for names in ctx.all_gather(local) for name in names}
    return [name for name, _ in named if name in bad]


def why_skipped(
    ctx: DistContext,
    micro_batches: Sequence[dict[str, float]],
    bad_parameters: Sequence[str],
    inspected: bool,
) -> str:
    """What was not finite in a skipped step, the same text on every rank (a collective).

    `micro_batches`: this rank's loss scalars of each micro-batch of the step;
    `bad_parameters`: `nonfinite_gradients`, if `inspected`.
    """
    local = None
    for index, values in enumerate(micro_batches):
        if not math.isfinite(values["loss"]):
            local = (index, len(micro_batches), values["loss"], values["ce"], values["divergence"])
            break
    for rank, report in enumerate(ctx.all_gather(local)):
        if report is not None:
            micro, count, loss, ce, divergence = report
            return (
                f"the loss is not finite (rank {rank}, micro-batch {micro + 1} of {count}: "
                f"loss {loss}, ce {ce}, divergence {divergence})"
            )
    if bad_parameters:
        more = len(bad_parameters) - 1
        others = f" (and {more} more parameter{'s' if more > 1 else ''})" if more else ""
        return f"the gradient of {bad_parameters[0]} is not finite{others}"
    if inspected:
        return "the global gradient norm is not finite"
    return (
        "the gradients are not finite (global norm not finite, loss finite); if the next "
        "step is skipped too, its bad parameters are named"
    )


@dataclass
class SkippedSteps:
    """The current run of consecutive skipped updates: (step, why) each."""

    limit: int  # train.max_skipped_steps
    steps: list[tuple[int, str]] = field(default_factory=list)

    def record(self, step: int, why: str | None) -> None:
        """The outcome of `step`: skipped (`why`) or applied (None, which ends the run)."""
        if why is None:
            self.steps = []
        else:
            self.steps.append((step, why))

    @property
    def inspect_next(self) -> bool:
        """The previous update was skipped: name the bad gradients of the next one."""
        return bool(self.steps)

    @property
    def diverged(self) -> bool:
        return len(self.steps) >= self.limit

    def progress(self) -> str:
        """The console line of the latest skipped step."""
        step, why = self.steps[-1]
        return (
            f"step {step}: update skipped ({len(self.steps)} in a row, the run stops at "
            f"train.max_skipped_steps={self.limit}): {why}"
        )

    def stop_message(self, checkpoint: Path) -> str:
        """Why the run stopped, and what to do; `checkpoint` holds the weights."""
        lines = "\n".join(f"  step {step}: {why}" for step, why in self.steps)
        first_step, last_step = self.steps[0][0], self.steps[-1][0]
        return (
            f"error: stopped after step {last_step}: the last {len(self.steps)} updates were "
            f"skipped for non-finite values (train.max_skipped_steps={self.limit}):\n{lines}\n"
            f"The weights are those after step {first_step - 1} (skipped updates change nothing) "
            f"and are saved in {checkpoint}. Lower train.lr, look at the data of these steps, or "
            f"raise train.max_skipped_steps; --resume continues after the skipped batches."
        )


class FaultInjector:
    """`debug.nan_loss_steps`: a NaN loss at those steps; `debug.nan_grad_steps`: a NaN gradient
    in the student's last parameter at those steps (steps counted from 1)."""

    def __init__(self, debug: DebugConfig):
        self.debug = debug

    def loss(self, step: int, loss: Tensor) -> Tensor:
        return loss * math.nan if step in self.debug.nan_loss_steps else loss

    @contextlib.contextmanager
    def gradients(self, step: int, model: nn.Module) -> Iterator[None]:
        handles = []
        if step in self.debug.nan_grad_steps:
            _, parameter = list(model.named_parameters())[-1]
            handles.append(parameter.register_hook(lambda grad: grad * math.nan))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
