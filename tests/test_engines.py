"""DeepSpeed configs from recipes, the LR schedule, and the dense reference loss (no engines here;
test_train.py runs real ZeRO-3 engines)."""

import math

import pytest
import torch

from tail_kd.config import Recipe, RecipeError
from tail_kd.engines import (
    check_deepspeed_config,
    check_deepspeed_overrides,
    dense_reference_loss,
    student_config,
    teacher_config,
    warmup_cosine,
)
from tail_kd.losses import fused_tad_loss


def recipe(**sections) -> Recipe:
    return Recipe.from_dict({"teacher": {"path": "t"}, "data": {"source": "d"}, **sections})


def test_student_config_follows_the_recipe():
    r = recipe(
        train={"global_batch_size": 16, "micro_batch_size": 2, "grad_clip": 0.5, "lr": 3e-4},
        deepspeed={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
    )
    config = student_config(r, world_size=2, device="cuda")
    assert config["train_batch_size"] == 16
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"]["lr"] == 3e-4
    assert config["bf16"] == {"enabled": True}  # precision auto on cuda
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert not student_config(r, world_size=2, device="cpu")["bf16"]["enabled"]


def test_teacher_config_shares_zero3_settings_without_optimizer_offload():
    r = recipe(
        deepspeed={
            "zero_optimization": {
                "offload_optimizer": {"device": "cpu"},
                "offload_param": {"device": "cpu"},
            }
        }
    )
    config = teacher_config(student_config(r, 1, "cuda"), torch.bfloat16)
    assert config["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert config["bf16"] == {"enabled": True}
    assert "optimizer" not in config


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"zero_optimisation": {}},
            r"deepspeed.zero_optimisation: .*did you mean 'deepspeed.zero_optimization'",
        ),
        (
            {"train_batch_size": 64},
            r"deepspeed.train_batch_size: set by the recipe; use train.global_batch_size",
        ),
        ({"fp16": {"enabled": True}}, r"deepspeed.fp16: .*use bfloat16"),
    ],
)
def test_bad_deepspeed_keys_are_rejected_with_the_fix(extra, message):
    with pytest.raises(RecipeError, match=message):
        check_deepspeed_overrides(extra)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"zero_optimization": {"stage3_prefetch_bucket_sze": 10}},
            r"deepspeed.zero_optimization.stage3_prefetch_bucket_sze: Extra inputs are not "
            r"permitted \(did you mean 'deepspeed.zero_optimization.stage3_prefetch_bucket_size'",
        ),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
            r"deepspeed.zero_optimization.offload_optimizer.device: Input should be 'none', 'cpu'",
        ),
        ({"tensorboard": {"enabld": True}}, r"deepspeed.tensorboard.enabld: Extra inputs"),
    ],
)
def test_keys_inside_deepspeed_sections_are_checked_by_deepspeeds_schema(extra, message):
    with pytest.raises(RecipeError, match=message):
        check_deepspeed_config(recipe(deepspeed=extra), world_size=1, device="cpu")
    config = check_deepspeed_config(recipe(), world_size=1, device="cpu")
    assert config["zero_optimization"] == {"stage": 3}


def test_warmup_then_cosine_to_min_ratio():
    lr = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))
    assert lr[-1] == pytest.approx(0.1)
    assert warmup_cosine(0, warmup_steps=0, total_steps=1, min_ratio=0.3) == pytest.approx(0.3)
    assert math.isclose(warmup_cosine(0, warmup_steps=0, total_steps=5, min_ratio=1.0), 1.0)


@pytest.mark.parametrize("divergence", ["tad", "forward_kl", "reverse_kl", "none"])
def test_dense_reference_matches_fused_loss(divergence):
    """The --reference-loss path and the fused loss agree on every output and gradient."""
    g = torch.Generator().manual_seed(0)
    b, t, hs, ht, rows, vocab = 2, 7, 8, 12, 40, 37  # 3 padding rows
    s_hidden = torch.randn(b, t, hs, generator=g, dtype=torch.float64, requires_grad=True)
    s_weight = torch.randn(rows, hs, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(b, t, ht, generator=g, dtype=torch.float64)
    t_weight = torch.randn(rows, ht, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[0, :2] = -100
    options = dict(
        k=5, beta=2.0, normalize=True, ce_weight=1.0, divergence=divergence, vocab_size=vocab
    )
    outputs = []
    for loss_fn in (fused_tad_loss, dense_reference_loss):
        out = loss_fn(s_hidden, s_weight, t_hidden, t_weight, labels, **options)
        grads = torch.autograd.grad(out.loss, (s_hidden, s_weight))
        outputs.append((out, grads))
    (fused, fused_grads), (dense, dense_grads) = outputs
    for name in (
        "loss",
        "ce",
        "divergence",
        "kl_to_teacher",
        "teacher_tail_mass",
        "student_tail_mass",
    ):
        torch.testing.assert_close(
            getattr(fused, name).detach().double(), getattr(dense, name).detach().double()
        )
    assert fused.num_tokens == dense.num_tokens == b * t - 2
    for fused_grad, dense_grad in zip(fused_grads, dense_grads):
        torch.testing.assert_close(fused_grad, dense_grad)
