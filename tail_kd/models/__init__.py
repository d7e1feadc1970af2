"""Models: loading (HF folder, hub id, GGUF), derived students, vocabulary checks, tiny models."""

from tail_kd.models.cache import build_once
from tail_kd.models.derive import (
    build_derived_student,
    check_derivable,
    derive_student_config,
    init_from_teacher,
    teacher_layer_indices,
)
from tail_kd.models.loading import convert_gguf, load_causal_lm, load_tokenizer, resolve_model_dir
from tail_kd.models.logits import check_logits_reproduced, head_logits, logit_transform
from tail_kd.models.tiny import build_tiny_pair
from tail_kd.models.vocab import VocabularyMismatchError, check_vocabularies

__all__ = [
    "VocabularyMismatchError",
    "build_derived_student",
    "build_once",
    "build_tiny_pair",
    "check_derivable",
    "check_logits_reproduced",
    "head_logits",
    "logit_transform",
    "check_vocabularies",
    "convert_gguf",
    "derive_student_config",
    "init_from_teacher",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_dir",
    "teacher_layer_indices",
]
