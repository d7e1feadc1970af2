"""The student's LR schedule."""

import math

import pytest
import torch

from tail_kd.config import TrainConfig
from tail_kd.optim import lr_scheduler, warmup_cosine


def test_warmup_then_cosine_to_min_ratio():
    lr = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))
    assert lr[-1] == pytest.approx(0.1)
    assert warmup_cosine(0, warmup_steps=0, total_steps=1, min_ratio=0.3) == pytest.approx(0.3)
    assert math.isclose(warmup_cosine(0, warmup_steps=0, total_steps=5, min_ratio=1.0), 1.0)


def test_a_warm_up_longer_than_the_run_ends_with_the_run():
    """train.steps=1 with the recipe's warm-up of 10: the one step runs at the full LR (not at a
    tenth of it, as an uncut warm-up would give)."""
    train = TrainConfig(steps=1, warmup_steps=10, global_batch_size=2, micro_batch_size=2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = lr_scheduler(train)(optimizer)
    assert scheduler.get_last_lr() == [0.5]
