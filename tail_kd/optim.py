"""The student's optimisation set-up besides DeepSpeed's AdamW: the LR schedule and which
parameters decay."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from tail_kd.config import TrainConfig

__all__ = ["warmup_cosine", "lr_scheduler", "weight_decay_groups"]


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier of optimizer step `step` (0-based): linear warm-up, then cosine to `min_ratio`.

    Step warmup_steps - 1 runs at the full LR; the last step (total_steps - 1) at min_ratio.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps + 1) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(train: TrainConfig):
    """`optimizer -> LambdaLR` with the recipe's warm-up + cosine (what DeepSpeed takes)."""
    schedule = functools.partial(
        warmup_cosine,
        warmup_steps=train.effective_warmup_steps,
        total_steps=train.steps,
        min_ratio=train.min_lr_ratio,
    )
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; not biases or norm gains (1-D tensors), as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
