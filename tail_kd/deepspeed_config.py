"""The DeepSpeed configs of a run, from its recipe, and their checks.

`student_config` gives the student engine's config (ZeRO-3, AdamW, clipping, batch split,
precision); `teacher_config` the teacher's inference-engine config, derived from it. A recipe's
`deepspeed:` section is merged over the generated student config (and its `zero_optimization`,
minus optimizer offload, over the teacher's), after `check_deepspeed_overrides` has rejected keys
DeepSpeed does not know and keys the recipe owns. `check_deepspeed_config` also runs DeepSpeed's
own config parser over the result, which rejects unknown or mistyped keys inside sections
(`deepspeed.zero_optimization.stage3_param_persistance_threshold`), before any model is loaded.

Building a config imports nothing of DeepSpeed (`tail-kd plan` uses it); only the check does.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from tail_kd.config import Recipe, RecipeError, vocab_parallel_problem

if TYPE_CHECKING:
    from tail_kd.placement import Placement

__all__ = [
    "check_deepspeed_overrides",
    "check_deepspeed_config",
    "offloaded",
    "student_config",
    "teacher_config",
    "model_dtype",
]

# Top-level keys of DeepSpeed's config (https://www.deepspeed.ai/docs/config-json/). A key your
# DeepSpeed version supports but this list lacks can be added here.
DEEPSPEED_KEYS = frozenset(
    """
    activation_checkpointing aio amp autotuning checkpoint comet comms_logger
    communication_data_type compile compression_training csv_monitor curriculum_learning
    data_efficiency data_types dataloader_drop_last disable_allgather disable_python_gc dump_state
    elasticity flops_profiler gradient_allreduce_op gradient_predivide_factor hybrid_engine
    log_level memory_breakdown nebula optimizer pipeline prescale_gradients
    seq_parallel_communication_data_type sparse_attention sparse_gradients steps_per_print
    tensor_parallel tensorboard timers torch_autocast use_data_before_expert_parallelism
    wall_clock_breakdown wandb weight_quantization zero_allow_untested_optimizer
    zero_force_ds_cpu_optimizer zero_optimization
    """.split()
)

# Keys the recipe decides; setting them under `deepspeed:` would contradict it.
RECIPE_OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size and train.micro_batch_size",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision (float16 is not supported; use bfloat16)",
    "scheduler": "train.warmup_steps and train.min_lr_ratio (warm-up + cosine is built in)",
}


def check_deepspeed_overrides(extra: Mapping[str, Any]) -> None:
    """Raise RecipeError for a `deepspeed:` key DeepSpeed does not know or the recipe owns."""
    if "stage" in (extra.get("zero_optimization") or {}):
        raise RecipeError(
            "deepspeed.zero_optimization.stage: set by the recipe; use "
            "parallel.student_zero_stage (1, 2, 3 or auto) for the student, and "
            "parallel.teacher_placement for the teacher"
        )
    for key in extra:
        if key in RECIPE_OWNED_KEYS:
            raise RecipeError(
                f"deepspeed.{key}: set by the recipe; use {RECIPE_OWNED_KEYS[key]} instead"
            )
        if key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, sorted(DEEPSPEED_KEYS), n=1)
            hint = f" (did you mean 'deepspeed.{close[0]}'?)" if close else ""
            raise RecipeError(f"deepspeed.{key}: not a DeepSpeed config key{hint}")


# DeepSpeed's config models whose error locations do not start with their section's key.
_DEEPSPEED_SECTIONS = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "CommsLoggerConfig": "comms_logger",
}


def check_deepspeed_config(recipe: Recipe, world_size: int, device: str) -> dict[str, Any]:
    """The student's DeepSpeed config, checked by DeepSpeed's own parser; RecipeError if it fails.

    Call it with the job's world size (DeepSpeed reads the world size from the process group
    when there is one, and 1 otherwise). Loads nothing.
    """
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    config = student_config(recipe, world_size, device)
    stage = recipe.parallel.student_zero_stage
    if stage in (1, 2) and "offload_param" in offloaded(config):
        raise RecipeError(
            f"parallel.student_zero_stage: {stage} cannot offload parameters "
            "(deepspeed.zero_optimization.offload_param is ZeRO-3's); set the stage to 3 or auto"
        )
    try:
        DeepSpeedConfig(copy.deepcopy(config))
    except pydantic.ValidationError as error:
        problems = []
        for item in error.errors():
            location = [str(part) for part in item["loc"]]
            section = _DEEPSPEED_SECTIONS.get(error.title)
            if section and location[:1] != [section]:
                location.insert(0, section)
            hint = ""
            if item["type"] == "extra_forbidden" and error.title == "DeepSpeedZeroConfig":
                hint = _close_zero_key(location[-1]) if len(location) == 2 else ""
            problems.append(f"deepspeed.{'.'.join(location)}: {item['msg']}{hint}")
        raise RecipeError("; ".join(problems) + " (DeepSpeed's config schema)") from None
    except (AssertionError, ValueError, KeyError, TypeError) as error:
        raise RecipeError(f"deepspeed: DeepSpeed rejects the config: {error}") from None
    problem = vocab_parallel_problem(
        recipe.parallel.vocab_parallel_size, offloaded=offloaded(config)
    )
    if problem:
        raise RecipeError(problem)
    return config


def offloaded(config: Mapping[str, Any]) -> list[str]:
    """The ZeRO offloads a DeepSpeed config turns on (`offload_param`, `offload_optimizer`)."""
    zero = config.get("zero_optimization") or {}
    return [
        key
        for key in ("offload_param", "offload_optimizer")
        if (zero.get(key) or {}).get("device", "none") != "none"
    ]


def _close_zero_key(key: str) -> str:
    """` (did you mean 'deepspeed.zero_optimization.X'?)` for a misspelt ZeRO key, or ''."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    names = set(DeepSpeedZeroConfig.model_fields)
    names |= {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
    close = difflib.get_close_matches(key, sorted(names), n=1)
    return f" (did you mean 'deepspeed.zero_optimization.{close[0]}'?)" if close else ""


def model_dtype(setting: str, device: str) -> torch.dtype:
    """The dtype for a recipe's `precision`/`dtype` setting: auto is bf16 on GPU, fp32 on CPU."""
    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def student_config(
    recipe: Recipe, world_size: int, device: str, placement: Placement | None = None
) -> dict[str, Any]:
    """The student engine's DeepSpeed config: ZeRO stage, AdamW, clipping, batch split, precision.

    The ZeRO stage and hpZ group are the run's `placement` (tail_kd/placement.py), else the
    recipe's `parallel.student_zero_stage` and `parallel.hpz_partition_size`, with `auto` taken as
    ZeRO-3 without hpZ (the configs `tail-kd plan` and the checks build before choosing).

    In bf16 the gradients are accumulated over micro-batches in float32 (`data_types.
    grad_accum_dtype`; DeepSpeed's default would be the model's bf16, which loses the small
    contributions of later micro-batches). They are still reduce-scattered in bf16
    (`communication_data_type`); set `deepspeed: {communication_data_type: fp32}` to reduce
    in float32 too, at twice the bytes.

    The LR schedule is not here: `Distiller` passes DeepSpeed a warm-up + cosine LambdaLR.
    AdamW is torch's (`torch_adam`), which runs everywhere without compiling DeepSpeed's fused
    kernels; set `deepspeed: {optimizer: {params: {torch_adam: false}}}` for DeepSpeed's own
    (FusedAdam on GPU, CPUAdam with optimizer offload).
    """
    check_deepspeed_overrides(recipe.deepspeed)
    train = recipe.train
    bf16 = model_dtype(train.precision, device) == torch.bfloat16
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps(world_size),
        "gradient_clipping": train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": bf16},
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": _zero(recipe, placement),
        "steps_per_print": 2**31 - 1,  # the trainer logs; silence DeepSpeed's own step lines
        "wall_clock_breakdown": False,
    }
    return _merge(config, recipe.deepspeed)


def _zero(recipe: Recipe, placement: Placement | None) -> dict[str, int]:
    """The student's `zero_optimization` stage and hpZ group (`student_config`)."""
    parallel = recipe.parallel
    if placement is None:
        stage = 3 if parallel.student_zero_stage == "auto" else parallel.student_zero_stage
        hpz = 1 if parallel.hpz_partition_size == "auto" else parallel.hpz_partition_size
    else:
        stage, hpz = placement.student_zero_stage, placement.hpz_partition_size
    return {"stage": stage, **({"zero_hpz_partition_size": hpz} if hpz > 1 and stage == 3 else {})}


def teacher_config(
    student: Mapping[str, Any], teacher_dtype: torch.dtype, hpz_partition_size: int = 1
) -> dict[str, Any]:
    """The teacher's inference-engine config: ZeRO-3 with the student's batch split and ZeRO
    settings, whatever the student's stage, and hpZ over `hpz_partition_size` ranks if > 1.

    Optimizer offload has no meaning without an optimizer and is dropped; parameter offload and
    the stage-3 bucket/persistence settings carry over.
    """
    zero = {k: v for k, v in student["zero_optimization"].items() if k != "offload_optimizer"}
    zero["stage"] = 3
    zero.pop("zero_hpz_partition_size", None)
    if hpz_partition_size > 1:
        zero["zero_hpz_partition_size"] = hpz_partition_size
    keys = (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "steps_per_print",
    )
    return {
        **{k: student[k] for k in keys},
        "zero_optimization": copy.deepcopy(zero),
        "bf16": {"enabled": teacher_dtype == torch.bfloat16},
    }


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in recursively (extra wins; nested dicts merge key by key)."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
