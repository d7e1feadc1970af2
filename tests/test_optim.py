"""The student's LR schedule."""

import math

import pytest

from tail_kd.optim import warmup_cosine


def test_warmup_then_cosine_to_min_ratio():
    lr = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))
    assert lr[-1] == pytest.approx(0.1)
    assert warmup_cosine(0, warmup_steps=0, total_steps=1, min_ratio=0.3) == pytest.approx(0.3)
    assert math.isclose(warmup_cosine(0, warmup_steps=0, total_steps=5, min_ratio=1.0), 1.0)
