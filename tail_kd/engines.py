"""The two DeepSpeed engines of a distillation job and the distillation forward.

Teacher: a ZeRO-3 inference engine (`deepspeed.initialize` with no optimizer, as TRL's
`prepare_deepspeed` does), in eval mode with gradients off; its weights are sharded over all ranks.
Its forward returns the final hidden states only (`TeacherHiddenStates`).

Student: a ZeRO-3 training engine around `StudentWithLoss`, whose forward runs the student's
backbone and then the loss on both models' final hidden states and lm_head weights. The logits of
the batch are never materialised (with the fused loss).

Two ZeRO-3 details make the lm_head weights usable outside their own modules:

- the student's lm_head weight (for tied models, the input embedding) is registered as an
  *external parameter* of `StudentWithLoss` (`deepspeed.zero.register_external_parameter`):
  ZeRO-3 gathers it when the wrapper's forward starts and keeps it until the forward ends (the
  embedding layer's own release does not drop it), and gathers it again for the wrapper's
  backward (where the dense reference loss needs it; the fused loss already computed its
  gradients in the forward). The gradient the loss returns for it is accumulated into the
  parameter (summed with the embedding's, when tied) and reduce-scattered by ZeRO-3 like any
  other.
- the teacher's lm_head weight is gathered read-only (`GatheredParameters`, no modifier rank)
  around the student's forward, and passed in as a plain tensor; the teacher gets no gradient.

With `parallel.vocab_parallel_size` > 1 neither lm_head is gathered for the loss: each rank reads
its rows from ZeRO-3's partitions and the loss runs vocab-parallel (tail_kd/sharded_heads.py).

DeepSpeed configs come from the recipe (`student_config`, `teacher_config`); a recipe's
`deepspeed:` section is merged over the generated student config (and its `zero_optimization`,
minus optimizer offload, over the teacher's), after `check_deepspeed_overrides` has rejected keys
DeepSpeed does not know and keys the recipe owns. `check_deepspeed_config` also runs DeepSpeed's
own config parser over the result, which rejects unknown or mistyped keys inside sections
(`deepspeed.zero_optimization.stage3_param_persistance_threshold`), before any model is loaded.

This module imports DeepSpeed: import it after `tail_kd.distributed.init_distributed`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from tail_kd.config import Recipe, RecipeError
from tail_kd.distributed import DistContext
from tail_kd.eval.metrics import TokenMetrics, score_hidden_states
from tail_kd.sharded_heads import ShardedHead, VocabGroups, group_loss, vocab_groups
from tail_kd.losses import (
    DistillationLossOutput,
    LossInputs,
    dense_distillation_loss,
    fused_distillation_loss,
)

__all__ = [
    "check_deepspeed_overrides",
    "check_deepspeed_config",
    "student_config",
    "teacher_config",
    "model_dtype",
    "warmup_cosine",
    "loss_function",
    "TeacherHiddenStates",
    "StudentWithLoss",
    "Distiller",
]

# ---------------------------------------------------------------------------------------------
# DeepSpeed configs
# ---------------------------------------------------------------------------------------------

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
    zero = config["zero_optimization"]
    offloaded = [
        key
        for key in ("offload_param", "offload_optimizer")
        if (zero.get(key) or {}).get("device", "none") != "none"
    ]
    if recipe.parallel.vocab_parallel_size > 1 and offloaded:
        raise RecipeError(
            f"parallel.vocab_parallel_size: {recipe.parallel.vocab_parallel_size} cannot be "
            f"combined with deepspeed.zero_optimization.{offloaded[0]} (vocab-parallel heads "
            "read ZeRO-3's partitions on the device); set one of them off"
        )
    return config


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


def student_config(recipe: Recipe, world_size: int, device: str) -> dict[str, Any]:
    """The student engine's DeepSpeed config: ZeRO-3, AdamW, clipping, batch split, precision.

    The LR schedule is not here: `Distiller` passes DeepSpeed a warm-up + cosine LambdaLR.
    AdamW is torch's (`torch_adam`), which runs everywhere without compiling DeepSpeed's fused
    kernels; set `deepspeed: {optimizer: {params: {torch_adam: false}}}` for DeepSpeed's own
    (FusedAdam on GPU, CPUAdam with optimizer offload).
    """
    check_deepspeed_overrides(recipe.deepspeed)
    train = recipe.train
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
        "bf16": {"enabled": model_dtype(train.precision, device) == torch.bfloat16},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 2**31 - 1,  # the trainer logs; silence DeepSpeed's own step lines
        "wall_clock_breakdown": False,
    }
    return _merge(config, recipe.deepspeed)


def teacher_config(student: Mapping[str, Any], teacher_dtype: torch.dtype) -> dict[str, Any]:
    """The teacher's inference-engine config: the student's batch split and ZeRO-3 settings.

    Optimizer offload has no meaning without an optimizer and is dropped; parameter offload and
    the stage-3 bucket/persistence settings carry over.
    """
    zero = {k: v for k, v in student["zero_optimization"].items() if k != "offload_optimizer"}
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


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier of optimizer step `step` (0-based): linear warm-up, then cosine to `min_ratio`.

    Step warmup_steps - 1 runs at the full LR; the last step (total_steps - 1) at min_ratio.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps + 1) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; not biases or norm gains (1-D tensors), as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------------------------------
# The loss, fused or dense
# ---------------------------------------------------------------------------------------------

LossFunction = Callable[..., DistillationLossOutput]


def loss_function(
    recipe: Recipe, vocab_size: int, device: str, *, reference: bool = False
) -> LossFunction:
    """The loss as `fn(*LossInputs, group=None) -> DistillationLossOutput`.

    The recipe's loss settings are bound; `reference=True` gives the dense reference instead of
    the fused loss (full [tokens, V] logits: for checking and debugging only).
    """
    loss = recipe.loss
    options = dict(
        k=loss.k,
        beta=loss.beta,
        normalize=loss.normalize,
        ce_weight=loss.ce_weight,
        divergence=loss.divergence,
        vocab_size=vocab_size,
    )
    if reference:
        return functools.partial(dense_distillation_loss, **options)
    compiled = loss.kernels == "compiled" or (loss.kernels == "auto" and device == "cuda")
    return functools.partial(
        fused_distillation_loss, chunk_size=loss.chunk_size, compile=compiled, **options
    )


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class TeacherHiddenStates(nn.Module):
    """A causal LM reduced to its backbone: input ids -> final hidden states [B, T, H]."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        return out.last_hidden_state


class StudentWithLoss(nn.Module):
    """The student's training forward: backbone -> final hidden states -> distillation loss.

    Position t's hidden state predicts the token at t + 1: the loss sees hidden[:, :-1] against
    labels[:, 1:] (labels follow the Hugging Face convention, aligned with input_ids, -100 = none).
    Returns a dict of tensors (DeepSpeed's ZeRO-3 hooks only look inside tuples, lists and dicts):
    `tail_kd.losses.LOSS_SCALARS` (the loss differentiable, the rest detached means over the
    micro-batch's valid tokens) and `num_tokens`.
    """

    def __init__(
        self, student: PreTrainedModel, loss_fn: LossFunction, groups: VocabGroups | None = None
    ):
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn
        self.groups = groups
        if groups is None:
            # Used by the loss, outside the lm_head's own forward: let ZeRO-3 gather it here.
            deepspeed.zero.register_external_parameter(self, self.lm_head_weight)

    @property
    def lm_head_weight(self) -> nn.Parameter:
        return self.student.get_output_embeddings().weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        teacher_hidden: Tensor | None,
        teacher_weight: Tensor | None,
        student_rows: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """teacher_hidden/teacher_weight may be None for a loss that needs no teacher (CE only).

        Vocab-parallel (`groups`): `teacher_weight` and `student_rows` are this rank's rows of the
        two lm_heads (tail_kd/sharded_heads.py), and the loss is the group's (`group_loss`).
        """
        out = self.student.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        weight = self.lm_head_weight if self.groups is None else student_rows
        if not torch.is_grad_enabled():  # evaluation: spare the fused loss its in-pass gradients
            weight = weight.detach()
        inputs = LossInputs(
            student_hidden=out.last_hidden_state[:, :-1],
            student_weight=weight,
            teacher_hidden=None if teacher_hidden is None else teacher_hidden[:, :-1],
            teacher_weight=teacher_weight,
            labels=labels[:, 1:],
        )
        if self.groups is None:
            result = self.loss_fn(*inputs)
        else:
            result = group_loss(self.loss_fn, inputs, self.groups)
        num_tokens = torch.tensor(float(result.num_tokens), device=result.loss.device)
        return {**result.scalars(), "num_tokens": num_tokens}


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


class Distiller:
    """The teacher and student engines, and one distillation forward on a micro-batch.

    Build it on every rank with the (unpartitioned) teacher and student; `deepspeed.initialize`
    shards both. Then per micro-batch: `out = distiller.forward(batch)`,
    `distiller.backward(out["loss"])`, and `distiller.student.step()` (a no-op except at the
    gradient-accumulation boundary).

    With `parallel.vocab_parallel_size` P > 1 the lm_heads are not gathered for the loss: each
    rank reads its rows from the ZeRO-3 partitions (the teacher's once, the student's after every
    optimizer step) and the loss runs vocab-parallel over its group; `backward` hands the rows'
    gradient back to ZeRO-3 at the accumulation boundary (tail_kd/sharded_heads.py).
    """

    def __init__(
        self,
        teacher: PreTrainedModel,
        student: PreTrainedModel,
        recipe: Recipe,
        ctx: DistContext,
        loss_fn: LossFunction,
        vocab_size: int,
    ):
        """`vocab_size`: the real tokens the two lm_heads share (the loss's vocabulary)."""
        device = ctx.device.type
        ds_student = student_config(recipe, ctx.world_size, device)
        if recipe.train.activation_checkpointing:
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        schedule = functools.partial(
            warmup_cosine,
            warmup_steps=recipe.train.warmup_steps,
            total_steps=recipe.train.steps,
            min_ratio=recipe.train.min_lr_ratio,
        )
        size = recipe.parallel.vocab_parallel_size
        self.groups = vocab_groups(size, vocab_size) if size > 1 else None
        # Tied: the lm_head is the input embedding, which also gets ZeRO-3's own gradients.
        self.tied = student.get_input_embeddings().weight is student.get_output_embeddings().weight
        model = StudentWithLoss(student, loss_fn, self.groups)
        self.student, *_ = deepspeed.initialize(
            model=model,
            model_parameters=_weight_decay_groups(model, recipe.train.weight_decay),
            config=ds_student,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        )
        teacher.requires_grad_(False)
        self.teacher, *_ = deepspeed.initialize(
            model=TeacherHiddenStates(teacher), config=teacher_config(ds_student, teacher.dtype)
        )
        self.teacher.eval()
        self.device = ctx.device
        if self.groups is not None:
            self.student_head = ShardedHead(self.student.module.lm_head_weight, self.groups)
            self.teacher_rows = ShardedHead(self.teacher_lm_head, self.groups).gather_rows()
            self.student_rows: Tensor | None = None  # a leaf: the loss leaves its gradient here
            self.rows_step = -1  # the optimizer step the rows were read at
            self.row_grad: Tensor | None = None  # float32, summed over micro-batches

    @property
    def teacher_lm_head(self) -> nn.Parameter:
        return self.teacher.module.model.get_output_embeddings().weight

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Teacher hidden states (no autograd), then the student's loss forward: one micro-batch."""
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device)
        with torch.no_grad():
            teacher_hidden = self.teacher(input_ids, attention_mask)
        if self.groups is not None:
            return self.student(
                input_ids, attention_mask, labels, teacher_hidden, self.teacher_rows,
                self._student_rows(),
            )  # fmt: skip
        teacher_head = self.teacher_lm_head
        with deepspeed.zero.GatheredParameters([teacher_head]):  # read-only: no modifier_rank
            return self.student(
                input_ids, attention_mask, labels, teacher_hidden, teacher_head.data
            )

    def backward(self, loss: Tensor) -> None:
        """The student engine's backward; vocab-parallel, also the lm_head rows' gradient: summed
        over micro-batches, then handed to ZeRO-3 at the accumulation boundary (before the
        optimizer step, which clips and applies it with the other gradients)."""
        self.student.backward(loss)
        if self.groups is None:
            return
        grad = self.student_rows.grad.float()
        self.student_rows.grad = None
        self.row_grad = grad if self.row_grad is None else self.row_grad.add_(grad)
        if self.student.is_gradient_accumulation_boundary():
            self.student_head.add_grad_to_partition(self.row_grad, accumulate=self.tied)
            self.row_grad = None

    def _student_rows(self) -> Tensor:
        """This rank's rows of the student's lm_head, read again after each optimizer step (and
        after a checkpoint load, which sets the step)."""
        if self.rows_step != self.student.global_steps:
            rows = self.student_head.gather_rows()
            if self.student_rows is None:
                self.student_rows = rows.requires_grad_()
            else:
                with torch.no_grad():
                    self.student_rows.copy_(rows)
            self.rows_step = self.student.global_steps
        return self.student_rows

    @torch.no_grad()
    def score(self, batch: Mapping[str, Tensor], metrics: TokenMetrics, vocab_size: int) -> None:
        """Add a held-out micro-batch to `metrics` (tail_kd.eval, the code `tail-kd eval` runs):
        both backbones' final hidden states, then logits for a few hundred positions at a time
        (`score_hidden_states`) from the gathered lm_heads, real vocabulary rows only. Call it on every rank (ZeRO-3
        gathers the weights of each module collectively); sum the ranks' `metrics.state()`."""
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        teacher_hidden = self.teacher(input_ids, attention_mask)
        student = self.student.module
        hidden = student.student.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        heads = [student.lm_head_weight, self.teacher_lm_head]
        with deepspeed.zero.GatheredParameters(heads):  # read-only: no modifier_rank
            student_weight, teacher_weight = (head.data for head in heads)
            score_hidden_states(
                metrics,
                hidden,
                lambda h: F.linear(h, student_weight),
                batch["labels"].to(self.device),
                teacher_hidden,
                lambda h: F.linear(h, teacher_weight),
                vocab_size=vocab_size,
            )
