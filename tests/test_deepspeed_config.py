"""DeepSpeed configs from recipes (no engines here; test_train.py runs real ZeRO-3 engines)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tail_kd.config import Recipe, RecipeError
from tail_kd.placement import Placement
from tail_kd.deepspeed_config import (
    check_deepspeed_config,
    check_deepspeed_overrides,
    student_config,
    teacher_config,
)


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


def test_the_student_takes_its_zero_stage_and_the_teacher_stays_zero3():
    """parallel.student_zero_stage and hpz_partition_size, or what the run chose for `auto`
    (ZeRO-3 without hpZ until it has); hpZ applies to the ZeRO-3 engines only."""
    assert student_config(recipe(), 2, "cuda")["zero_optimization"] == {"stage": 3}
    chosen = Placement("replicated", 1, 1)
    assert student_config(recipe(), 2, "cuda", chosen)["zero_optimization"] == {"stage": 1}
    explicit = recipe(parallel={"student_zero_stage": 2})
    config = student_config(explicit, 2, "cuda")
    assert config["zero_optimization"] == {"stage": 2}
    assert teacher_config(config, torch.bfloat16)["zero_optimization"] == {"stage": 3}
    hpz = student_config(recipe(), 4, "cuda", Placement("zero3", 3, 2))["zero_optimization"]
    assert hpz == {"stage": 3, "zero_hpz_partition_size": 2}
    not_zero3 = student_config(recipe(), 4, "cuda", Placement("zero3", 2, 2))
    assert not_zero3["zero_optimization"] == {"stage": 2}
    teacher = teacher_config(not_zero3, torch.bfloat16, 2)["zero_optimization"]
    assert teacher == {"stage": 3, "zero_hpz_partition_size": 2}


def test_only_a_zero3_student_offloads_its_parameters():
    offload = {"zero_optimization": {"offload_param": {"device": "cpu"}}}
    with pytest.raises(RecipeError, match=r"parallel.student_zero_stage: 1 cannot offload param"):
        check_deepspeed_config(
            recipe(parallel={"student_zero_stage": 1}, deepspeed=offload), 1, "cpu"
        )
    check_deepspeed_config(recipe(deepspeed=offload), 1, "cpu")  # auto: ZeRO-3


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
        (
            {"zero_optimization": {"stage": 2}},
            r"deepspeed.zero_optimization.stage: set by the recipe; use "
            r"parallel.student_zero_stage",
        ),
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


def _accumulated_gradient(extra: dict, stage: int = 3) -> dict:
    script = Path(__file__).parent / "scripts" / "bf16_accumulation.py"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(extra), str(stage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_gradients_are_accumulated_over_micro_batches_in_float32(stage):
    """A real engine of each student ZeRO stage (DeepSpeed's BF16_Optimizer for ZeRO-1, its ZeRO
    optimizers for 2 and 3): with the generated config, 64 bf16 micro-batches sum exactly (ZeRO-1
    sends the float32 sum once, in bf16: one rounding, no term lost); with DeepSpeed's default for
    bf16 (accumulating in bf16) the 63 small ones are lost."""
    ours = _accumulated_gradient({}, stage)
    exact = ours["exact"]
    if stage == 1:  # all-reduced once per step, as the float32 sum rounded to bf16
        exact = torch.tensor(exact).bfloat16().item()  # (communication_data_type: bf16)
    assert ours["grad"] == pytest.approx(exact, rel=1e-6)
    if stage == 3:
        bf16 = _accumulated_gradient({"data_types": {"grad_accum_dtype": "bf16"}})
        assert abs(bf16["grad"] - bf16["exact"]) > 0.1 * bf16["exact"]
