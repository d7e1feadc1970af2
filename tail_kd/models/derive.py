"""Students derived from their teacher, as in the TAD paper.

A derived student has the teacher's architecture with fewer layers and/or a narrower residual
stream, and starts from the teacher's weights where they fit:

- layers: student layer i copies teacher layer `teacher_layer_indices(...)[i]`; the kept layers are
  evenly spaced and always include the first and the last teacher layer;
- attention (q/k/v/o weights and biases, per-head norms) and the layer norms: the leading slice of
  the teacher's tensor (first `hidden_size` input/output features, first heads). The head size
  stays the teacher's, so narrowing keeps whole heads: the first `num_attention_heads` query heads
  and the first `num_key_value_heads` key/value heads. A fused `qkv_proj` (Phi-3: all query rows,
  then the key rows, then the value rows) is sliced part by part;
- token embedding, final norm and an untied lm_head: the first `hidden_size` features;
- MLPs: random (the student's own initialisation);
- lm_head is tied to the embedding exactly when the teacher's is.

Families are not listed: any decoder whose layers sit in one list of `num_hidden_layers` modules
and whose other parameters are of the kinds above (by the name of their module: `q_proj`,
`k_proj`, `v_proj`, `o_proj`, `qkv_proj`, `q_norm`, `k_norm`, `embed_tokens`, `lm_head`, or a
`*norm*`; anything under `.mlp.`) derives; checked on Llama, Qwen2, Gemma-2, Phi-3, Cohere and
Granite. Any other parameter (GPT-NeoX's interleaved `query_key_value`, GPT-2's `c_attn`, a
mixture of experts) is refused by name: the student could only get a meaningless slice of it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# The modules whose parameters a derived student copies a leading slice of (module docstring).
_HEAD_MAJOR = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_norm",
    "k_norm",
    "embed_tokens",
    "lm_head",
}
_FUSED_QKV = "qkv_proj"


def derive_student_config(
    teacher_config: PretrainedConfig,
    *,
    num_layers: int,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
) -> PretrainedConfig:
    """The config of a student with the teacher's architecture and the given (smaller) dimensions.

    The student keeps the teacher's head size, so `hidden_size` = `num_attention_heads` x head size:
    give either (or both, consistently); None keeps the teacher's width. `num_key_value_heads`
    defaults to keeping the teacher's query heads per key/value head. `intermediate_size` defaults
    to the teacher's, scaled by the width ratio; it may exceed the teacher's, since MLPs start
    random. Errors name the offending field.
    """
    t = teacher_config
    head_dim = _head_dim(t)
    hidden_size, num_heads = _student_width(t, head_dim, hidden_size, num_attention_heads)
    num_kv_heads = _student_kv_heads(t, num_heads, num_key_value_heads)
    if not 1 <= num_layers <= t.num_hidden_layers:
        raise ValueError(
            f"student num_layers={num_layers} must be between 1 and the teacher's "
            f"num_hidden_layers={t.num_hidden_layers}"
        )
    if intermediate_size is None:
        intermediate_size = t.intermediate_size * hidden_size // t.hidden_size
    if intermediate_size < 1:
        raise ValueError(f"student intermediate_size={intermediate_size} must be positive")

    fields = t.to_dict()
    fields.pop("quantization_config", None)
    fields.update(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
    )
    if "head_dim" in fields:
        fields["head_dim"] = head_dim
    if fields.get("layer_types") is not None:  # per-layer attention kinds (e.g. sliding window)
        layers = teacher_layer_indices(t.num_hidden_layers, num_layers)
        fields["layer_types"] = [t.layer_types[i] for i in layers]
    return type(t).from_dict(fields)


def teacher_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers for the student, first and last included (one layer: the first).

    Example: 30 teacher layers, 6 student layers -> [0, 6, 12, 17, 23, 29].
    """
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [int(i * step + 0.5) for i in range(student_layers)]


@torch.no_grad()
def init_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Copy the teacher's weights into the student where they fit (see the module docstring).

    Every non-MLP student parameter receives the leading slice of its teacher counterpart (part by
    part for a fused `qkv_proj`); a parameter of another kind, without a counterpart, or larger
    than it, raises ValueError naming it.
    """
    prefix = check_derivable(teacher)
    layers = teacher_layer_indices(
        teacher.config.num_hidden_layers, student.config.num_hidden_layers
    )
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        if ".mlp." in name:
            continue
        source_name = _teacher_name(name, prefix, layers)
        source = teacher_params.get(source_name)
        if source is None:
            raise ValueError(f"student parameter {name} has no teacher counterpart {source_name}")
        if _module(name) == _FUSED_QKV:
            param.copy_(_fused_qkv_slice(source, param, teacher.config, student.config))
        else:
            param.copy_(_leading_slice(source, param, name, source_name))


def check_derivable(teacher: nn.Module) -> str:
    """Raise ValueError, naming what is missing, unless students can be derived from `teacher`
    (any device, `meta` included: only names and structure are read); return the name of its
    list of decoder layers."""
    prefix = _decoder_layers(teacher)
    kinds = {_module(n) for n, _ in teacher.named_parameters() if ".mlp." not in n}
    unknown = sorted(k for k in kinds - _HEAD_MAJOR - {_FUSED_QKV} if "norm" not in k)
    if unknown:
        raise ValueError(
            f"cannot derive a student from a {teacher.config.model_type} teacher: its parameters "
            f"of {', '.join(unknown)} are of a kind a narrower or shallower student cannot take "
            "a slice of; use student.init: config (a fresh student) instead"
        )
    return prefix


def _module(parameter_name: str) -> str:
    """The name of the module a parameter belongs to: `q_proj` for `...self_attn.q_proj.weight`."""
    return parameter_name.rsplit(".", 2)[-2]


def _leading_slice(source: Tensor, param: Tensor, name: str, source_name: str) -> Tensor:
    if param.dim() != source.dim() or any(
        s > t for s, t in zip(param.shape, source.shape, strict=True)
    ):
        raise ValueError(
            f"student parameter {name} {tuple(param.shape)} does not fit in teacher "
            f"{source_name} {tuple(source.shape)}"
        )
    return source[tuple(slice(0, n) for n in param.shape)]


def _fused_qkv_slice(
    source: Tensor, param: Tensor, teacher: PretrainedConfig, student: PretrainedConfig
) -> Tensor:
    """A fused projection's rows are [query heads | key heads | value heads]: the student takes
    its first query, key and value heads from each part, and its first input features."""
    head_dim = _head_dim(teacher)

    def parts(config: PretrainedConfig) -> list[int]:
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return [config.num_attention_heads * head_dim, kv * head_dim, kv * head_dim]

    pieces = []
    for t_part, s_part in zip(
        source.split(parts(teacher)), parts(student), strict=True
    ):  # fmt: skip
        pieces.append(t_part[:s_part] if param.dim() == 1 else t_part[:s_part, : param.shape[1]])
    return torch.cat(pieces)


def _decoder_layers(model: PreTrainedModel) -> str:
    """The name of the module list holding the model's `num_hidden_layers` decoder layers
    (`model.layers` in the Llama family)."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == model.config.num_hidden_layers
    ]
    if len(found) != 1:
        raise ValueError(
            f"cannot derive a student from a {model.config.model_type} teacher: expected one list "
            f"of its {model.config.num_hidden_layers} decoder layers, found {found or 'none'}"
        )
    return found[0]


def build_derived_student(
    teacher: PreTrainedModel,
    *,
    num_layers: int,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
) -> PreTrainedModel:
    """A student derived from `teacher` (see `derive_student_config`), in the teacher's dtype.

    The random MLP weights come from torch's global generator: seed it first for reproducibility.
    """
    config = derive_student_config(
        teacher.config,
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
    )
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    init_from_teacher(student, teacher)
    return student


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _student_width(
    t: PretrainedConfig, head_dim: int, hidden_size: int | None, num_heads: int | None
) -> tuple[int, int]:
    """(hidden_size, num_attention_heads) of the student, checked against the teacher's."""
    if hidden_size is not None and not 1 <= hidden_size <= t.hidden_size:
        raise ValueError(
            f"student hidden_size={hidden_size} must be between 1 and the teacher's {t.hidden_size}"
        )
    if num_heads is not None and not 1 <= num_heads <= t.num_attention_heads:
        raise ValueError(
            f"student num_attention_heads={num_heads} must be between 1 and the teacher's "
            f"{t.num_attention_heads}"
        )
    if hidden_size is None and num_heads is None:
        return t.hidden_size, t.num_attention_heads
    if num_heads is None:
        if hidden_size % head_dim != 0:
            below = max(head_dim, hidden_size // head_dim * head_dim)
            raise ValueError(
                f"student hidden_size={hidden_size} must be a multiple of the teacher's head size "
                f"{head_dim} (the student keeps whole teacher heads), e.g. {below} or "
                f"{below + head_dim}"
            )
        num_heads = hidden_size // head_dim
    elif hidden_size is None:
        hidden_size = num_heads * head_dim
    if hidden_size != num_heads * head_dim:
        raise ValueError(
            f"student hidden_size={hidden_size} must equal num_attention_heads={num_heads} x the "
            f"teacher's head size {head_dim}; leave one of them unset to derive it"
        )
    return hidden_size, num_heads


def _student_kv_heads(t: PretrainedConfig, num_heads: int, num_kv_heads: int | None) -> int:
    """num_key_value_heads of the student: given, or keeping the teacher's heads per kv head."""
    teacher_kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    if num_kv_heads is None:
        group = t.num_attention_heads // teacher_kv
        if num_heads % group != 0:
            raise ValueError(
                f"student num_attention_heads={num_heads} is not a multiple of the teacher's "
                f"{group} query heads per key/value head: set num_key_value_heads to one of "
                f"{_kv_head_choices(num_heads, teacher_kv)}"
            )
        num_kv_heads = num_heads // group
    if not 1 <= num_kv_heads <= teacher_kv:
        raise ValueError(
            f"student num_key_value_heads={num_kv_heads} must be between 1 and the teacher's "
            f"{teacher_kv}"
        )
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"student num_key_value_heads={num_kv_heads} must divide "
            f"num_attention_heads={num_heads}: one of {_kv_head_choices(num_heads, teacher_kv)}"
        )
    return num_kv_heads


def _kv_head_choices(num_heads: int, teacher_kv: int) -> str:
    """The numbers of key/value heads a student with `num_heads` query heads can have: the
    divisors of `num_heads`, up to the teacher's `teacher_kv`."""
    return ", ".join(str(d) for d in range(1, teacher_kv + 1) if num_heads % d == 0)


def _teacher_name(student_name: str, prefix: str, layers: list[int]) -> str:
    """The teacher parameter a student parameter copies from: same name, mapped layer index
    (`prefix`: where the decoder layers are, e.g. `model.layers`)."""
    if not student_name.startswith(prefix + "."):
        return student_name
    index, rest = student_name[len(prefix) + 1 :].split(".", 1)
    return f"{prefix}.{layers[int(index)]}.{rest}"
