"""Recipes: a YAML file -> typed, validated dataclasses.

A recipe is one YAML file with the sections below; every field has a default except `teacher.path`
and `data.source`. A recipe without a `teacher:` section trains the student on CE alone
(`loss.divergence: none`, a student made from `student.path`): no teacher is loaded. `load_recipe` reads the file, applies `--set section.field=value` overrides
(values are parsed as YAML, so `--set train.lr=3e-4` and `--set train.betas=[0.9,0.99]` work) and
checks everything before a process group or a model exists:

- unknown keys (with a "did you mean" suggestion), wrong types, values outside their range or
  outside their set of choices: `RecipeError("recipe.yaml: loss.k: expected a positive integer,
  got -1")`;
- relations between fields (a student `init` that needs a `path`, a batch size split that cannot
  work); the split over ranks is re-checked at launch by `Recipe.check_world_size`.

Per-field rules live next to the field (its type, and a `_Range` in the field's metadata);
rules that relate several fields live in the section's `__post_init__`.

Paths in a recipe are relative to the working directory of the run, not to the recipe file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tail_kd.exit_status import UsageError

__all__ = [
    "RecipeError",
    "Recipe",
    "TeacherConfig",
    "StudentConfig",
    "DataConfig",
    "LossConfig",
    "TrainConfig",
    "LogConfig",
    "EvalConfig",
    "CheckpointConfig",
    "ParallelConfig",
    "DebugConfig",
    "GENERATED_SOURCES",
    "load_recipe",
    "apply_overrides",
    "vocab_parallel_problem",
    "default_cache_dir",
]

# Data sources produced by a generator instead of read from files (see tail_kd/data/sources.py).
GENERATED_SOURCES = ("gsm_symbolic",)


class RecipeError(UsageError):
    """A recipe that cannot run; the message names the file, the field and what would fix it."""


class _FieldError(RecipeError):
    """A problem with one field; sections prefix their name while the error travels up."""

    def __init__(self, field_path: str, problem: str):
        super().__init__(f"{field_path}: {problem}")
        self.field_path = field_path
        self.problem = problem

    def within(self, section: str) -> _FieldError:
        return _FieldError(f"{section}.{self.field_path}", self.problem)


@dataclass(frozen=True)
class _Range:
    """An allowed numeric interval; `describe` words it for error messages."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is not allowed

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high

    def describe(self, noun: str) -> str:
        article = "an" if noun[0] in "aeiou" else "a"
        if self.low == 0 and self.high is None:
            return f"a {'positive' if self.low_open else 'non-negative'} {noun}"
        if self.high is None:
            return f"{article} {noun} {'>' if self.low_open else '>='} {self.low}"
        return f"{article} {noun} in {'(' if self.low_open else '['}{self.low}, {self.high}]"


POSITIVE = _Range(0, low_open=True)
NON_NEGATIVE = _Range(0)
FRACTION = _Range(0, 1)


def _field(default: Any, allowed: _Range | None = None) -> Any:
    """A dataclass field with a default and, optionally, the range its value must lie in."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"range": allowed})
    return field(default=default, metadata={"range": allowed})


# ---------------------------------------------------------------------------------------------
# The sections
# ---------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    """The frozen model whose distributions the student learns."""

    path: str  # local HF folder, hub id, or a .gguf file
    gguf_file: str | None = None  # file name inside `path` when path is a folder holding a .gguf
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # Read the teacher's hidden states of the data from the cache `tail-kd cache-teacher` wrote
    # (tail_kd/teacher_cache.py) instead of running the teacher: only its lm_head is kept.
    cached_states: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise _FieldError("path", "must name a model folder, a hub id or a .gguf file")


@dataclass
class StudentConfig:
    """How the student is made: derived from the teacher, fresh from a config, or pretrained."""

    init: Literal["derived", "config", "pretrained"] = "derived"
    path: str | None = None  # model folder / hub id for init=config and init=pretrained
    num_layers: int = _field(6, POSITIVE)  # derived: keep this many teacher layers, evenly spaced
    hidden_size: int | None = _field(None, POSITIVE)  # derived: null = teacher width
    intermediate_size: int | None = _field(None, POSITIVE)
    num_attention_heads: int | None = _field(None, POSITIVE)
    num_key_value_heads: int | None = _field(None, POSITIVE)

    def __post_init__(self) -> None:
        if self.init != "derived" and not self.path:
            raise _FieldError(
                "path", f"required when init is {self.init!r} (a model folder or hub id)"
            )


@dataclass(kw_only=True)
class DataConfig:
    """What the student reads; see tail_kd/data for the formats."""

    kind: Literal["pretrain", "sft"] = "pretrain"  # packed text | question/answer, loss on answers
    source: str | list[str]  # files/dirs (txt, jsonl, parquet), a datasets name, or gsm_symbolic
    text_field: str = "text"
    question_field: str = "question"
    answer_field: str = "answer"
    seq_len: int = _field(256, _Range(2))
    num_examples: int | None = _field(None, POSITIVE)  # generated sources: how many; else a cap
    # Held out from the end of the source: packed sequences (pretrain) or records (sft); generated
    # sources draw them with another seed instead.
    eval_examples: int = _field(64, NON_NEGATIVE)
    dataset_config: str | None = None  # datasets-name sources: the configuration (gsm8k: main)
    dataset_split: str = "train"  # datasets-name sources: the split to read
    cache_dir: str | None = None  # default: <cache_dir>/data

    def __post_init__(self) -> None:
        sources = [self.source] if isinstance(self.source, str) else self.source
        if not sources or not all(sources):
            raise _FieldError(
                "source", "must name a file, a directory, a datasets name or gsm_symbolic"
            )
        generated = [s for s in sources if s in GENERATED_SOURCES]
        if generated and len(sources) > 1:
            raise _FieldError("source", f"{generated[0]} cannot be combined with other sources")
        if generated and self.kind != "sft":
            raise _FieldError(
                "kind", f"{generated[0]} gives question/answer records: set data.kind=sft"
            )
        if generated and self.num_examples is None:
            raise _FieldError("num_examples", f"required for the generated source {generated[0]}")


MIN_AUTO_CHUNK = 1024  # chunk_size: auto never goes below this many tokens


@dataclass
class LossConfig:
    """The distillation objective (tail_kd/losses): CE * ce_weight + divergence."""

    divergence: Literal["tad", "forward_kl", "reverse_kl", "none"] = "tad"  # none: CE only
    k: int = _field(10, POSITIVE)  # teacher top-K tokens kept as separate categories
    beta: float = _field(2.0, NON_NEGATIVE)  # weight of the renormalised tail term
    normalize: bool = True  # divide beta by the sequence's mean teacher tail mass
    ce_weight: float = _field(1.0, NON_NEGATIVE)
    # Tokens per fused-loss chunk. auto: data.seq_len, at least 1024: a chunk then holds whole
    # sequences, so TAD's sequence normalisation needs no teacher pre-pass (tail_kd/losses/fused.py).
    chunk_size: int | Literal["auto"] = "auto"
    # The fused loss's chunks: torch.compile'd or eager; auto = compiled on GPUs.
    kernels: Literal["auto", "eager", "compiled"] = "auto"
    # Hidden-state alignment (tail_kd/losses/hidden.py): + hidden_weight * mean (1 - cosine)
    # between the teacher's and the student's hidden states; 0 = off. hidden_layers: [teacher,
    # student] index pairs as in output_hidden_states (tail_kd/hidden_alignment.py); [] = the
    # final states. A narrower student gets a learned projection per pair (not exported).
    hidden_weight: float = _field(0.0, NON_NEGATIVE)
    hidden_layers: list[tuple[int, int]] = _field([])

    def __post_init__(self) -> None:
        if self.divergence == "none" and self.ce_weight == 0:
            raise _FieldError("ce_weight", "is 0 and divergence is none: nothing would be trained")
        if self.chunk_size != "auto" and self.chunk_size < 1:
            raise _FieldError("chunk_size", f"expected auto or >= 1, got {self.chunk_size}")

    def chunk_tokens(self, seq_len: int) -> int:
        """The fused loss's chunk size for sequences of `seq_len` tokens (`chunk_size`)."""
        return max(MIN_AUTO_CHUNK, seq_len) if self.chunk_size == "auto" else self.chunk_size


@dataclass
class TrainConfig:
    """Optimisation: AdamW with linear warm-up and cosine decay."""

    steps: int = _field(100, POSITIVE)
    global_batch_size: int = _field(8, POSITIVE)  # sequences per optimizer step over all ranks
    micro_batch_size: int = _field(2, POSITIVE)  # sequences per rank per forward
    lr: float = _field(1.0e-4, POSITIVE)
    weight_decay: float = _field(0.1, NON_NEGATIVE)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = _field(10, NON_NEGATIVE)
    min_lr_ratio: float = _field(0.1, FRACTION)  # cosine decays to lr * min_lr_ratio
    grad_clip: float = _field(1.0, NON_NEGATIVE)  # max global gradient norm; 0 disables clipping
    activation_checkpointing: bool = False
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # A step whose loss or gradients are not finite is skipped (no update); this many skipped in a
    # row stop the run with a checkpoint and a diagnostic (exit status 3).
    max_skipped_steps: int = _field(5, POSITIVE)

    def __post_init__(self) -> None:
        if not all(0 <= b < 1 for b in self.betas):
            raise _FieldError("betas", f"expected two numbers in [0, 1), got {list(self.betas)}")
        problem = _batch_split_problem(self, world_size=1)
        if problem:
            raise _FieldError("global_batch_size", problem)

    @property
    def effective_warmup_steps(self) -> int:
        """The warm-up a run uses: `warmup_steps`, cut to `steps` when longer (`Recipe.notes`)."""
        return min(self.warmup_steps, self.steps)


@dataclass
class LogConfig:
    """Console and TensorBoard logging."""

    every: int = _field(1, POSITIVE)  # optimizer steps between log lines / TensorBoard points
    tensorboard_dir: str | None = None  # default: <output_dir>/tensorboard


@dataclass
class EvalConfig:
    """Held-out metrics during training; few-shot benchmarks after it."""

    # Optimizer steps between evaluations; 0 = only at the end.
    every: int = _field(50, NON_NEGATIVE)
    max_batches: int = _field(4, POSITIVE)  # micro-batches per rank per evaluation
    # lm-evaluation-harness tasks run on the finished student (`tail-kd eval RUN_DIR --final`,
    # which `tail-kd train --nproc` and the Slurm scripts call): task names, or `paper` for the
    # 8-task suite of tail_kd/eval/harness.py; [] runs none.
    tasks: list[str] = _field([])
    task_paths: list[str] = _field([])  # folders of your own task definitions, for `tasks`
    tasks_fewshot: int | None = _field(None, NON_NEGATIVE)  # None: each task's own default
    tasks_limit: int | None = _field(None, POSITIVE)  # examples per task (None: all)


@dataclass
class CheckpointConfig:
    """Resumable checkpoints under <output_dir>."""

    # Optimizer steps between checkpoints; 0 = only at the end.
    every: int = _field(50, NON_NEGATIVE)
    keep: int = _field(2, _Range(1))  # newest checkpoints kept on disk


@dataclass
class DebugConfig:
    """Fault injection, to see what a run (and your set-up) does when training goes wrong.

    Off by default. Steps are optimizer steps counted from 1, as in the logs.
    """

    nan_loss_steps: list[int] = _field([])  # these steps get a NaN loss (so NaN gradients)
    # These steps get a finite loss but a NaN gradient in one parameter: the student's last one.
    nan_grad_steps: list[int] = _field([])

    def __post_init__(self) -> None:
        for name in ("nan_loss_steps", "nan_grad_steps"):
            bad = [step for step in getattr(self, name) if step < 1]
            if bad:
                raise _FieldError(name, f"steps are counted from 1, got {bad}")


@dataclass
class ParallelConfig:
    """How ranks share work beyond ZeRO-3's data parallelism."""

    # Groups of this many consecutive ranks (on one node) split the lm_head rows of teacher and
    # student between them for the loss (tail_kd/sharded_heads.py); 1 = off.
    vocab_parallel_size: int = _field(1, POSITIVE)
    # Where the frozen teacher's weights live (tail_kd/placement.py): zero3 partitions them over
    # the ranks (gathered at every forward), replicated keeps a whole copy on every GPU (no
    # gathers), auto takes replicated when `tail-kd plan`'s estimate fits the GPUs (zero3 on CPU).
    teacher_placement: Literal["auto", "replicated", "zero3"] = "auto"
    # The student's ZeRO stage (tail_kd/placement.py): 3 partitions its weights too (gathered at
    # every forward), 2 keeps them whole and partitions gradients and optimizer states, 1 only the
    # optimizer states; auto takes the fastest that `tail-kd plan`'s estimate fits (3 on CPU).
    student_zero_stage: Literal["auto", 1, 2, 3] = "auto"
    # ZeRO++ hierarchical partitioning (hpZ) of the ZeRO-3 engines: each also keeps its weights
    # partitioned over groups of this many consecutive ranks (a node) and gathers from that copy,
    # so that its all-gathers stay within the node; 1 = off; auto: the ranks per node on GPU jobs
    # of several nodes where `tail-kd plan`'s estimate fits (tail_kd/placement.py).
    hpz_partition_size: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.hpz_partition_size != "auto" and self.hpz_partition_size < 1:
            raise _FieldError(
                "hpz_partition_size", f"expected auto or >= 1, got {self.hpz_partition_size}"
            )
        problem = vocab_parallel_problem(
            self.vocab_parallel_size, student_zero_stage=self.student_zero_stage
        )
        if problem:
            raise RecipeError(problem)


@dataclass(kw_only=True)  # keyword-only: required sections can sit in schema order
class Recipe:
    """One distillation run. Directories left null are resolved on construction."""

    run_name: str = "tail-kd"  # names the TensorBoard run; output_dir defaults to runs/<run_name>
    output_dir: str | None = None  # default: runs/<run_name>
    # Shared caches (tokenised data, converted GGUF teachers, tiny models), independent of the
    # output dir so that `tail-kd prepare-data` and every job of a recipe find the same one;
    # default: $TAIL_KD_CACHE, else ~/.cache/tail_kd (`default_cache_dir`).
    cache_dir: str | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"  # cpu: DeepSpeed's CPU accelerator and gloo
    seed: int = _field(0, NON_NEGATIVE)
    teacher: TeacherConfig | None = None  # None: a CE-only run of the student alone
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    deepspeed: dict[str, Any] = _field({})  # extra DeepSpeed config keys, merged over the generated

    def __post_init__(self) -> None:
        if not self.run_name or os.sep in self.run_name:
            raise _FieldError(
                "run_name", f"expected a non-empty name without {os.sep!r}, got {self.run_name!r}"
            )
        if self.output_dir is None:
            self.output_dir = os.path.join("runs", self.run_name)
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()
        if self.data.cache_dir is None:
            self.data.cache_dir = os.path.join(self.cache_dir, "data")
        if self.log.tensorboard_dir is None:
            self.log.tensorboard_dir = os.path.join(self.output_dir, "tensorboard")
        if self.teacher is None and self.loss.divergence != "none":
            raise _FieldError(
                "teacher",
                f"required for loss.divergence {self.loss.divergence}: set teacher.path, or "
                "loss.divergence=none to train the student on CE alone",
            )
        if self.teacher is None and self.loss.hidden_weight > 0:
            raise _FieldError(
                "loss.hidden_weight",
                "aligns the student's hidden states with the teacher's: set teacher.path, or 0",
            )
        if self.teacher is None and self.student.init == "derived":
            raise _FieldError(
                "teacher",
                "required for student.init derived (the student is made from it): without a "
                "teacher, set student.init to config or pretrained and student.path",
            )

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], origin: str = "recipe", overrides: Iterable[str] = ()
    ) -> Recipe:
        """Build and validate a recipe from plain data (a parsed YAML file, a saved `to_dict`).

        `origin` (usually the file name) starts every error message, except those about a field
        that one of the `overrides` (`--set KEY=VALUE`, already applied to `data`) set: they
        start with `--set`.
        """
        try:
            return _build(cls, data, section="")
        except _FieldError as error:
            if error.field_path in _override_keys(overrides):
                raise RecipeError(f"--set {error}") from None
            raise RecipeError(f"{origin}: {error}") from None
        except RecipeError as error:
            raise RecipeError(f"{origin}: {error}") from None

    @property
    def cached_teacher_states(self) -> bool:
        """Whether the teacher's hidden states come from `tail-kd cache-teacher`'s cache."""
        return self.teacher is not None and self.teacher.cached_states

    def notes(self) -> list[str]:
        """What to know before reading this recipe's numbers (a run prints it first and last)."""
        notes = []
        if self.train.warmup_steps > self.train.steps:
            notes.append(
                f"train.warmup_steps {self.train.warmup_steps} is more than train.steps "
                f"{self.train.steps}: the warm-up is cut to {self.train.steps} steps"
            )
        if self.teacher is not None and self.teacher.path == "tiny://":
            notes.append(
                "the tiny:// teacher has random weights: KL to it and agreement with it need not "
                "improve; this recipe checks the machinery, not the method"
            )
        return notes

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, scalars) that `from_dict` turns back into an equal recipe."""
        return _plain(dataclasses.asdict(self))

    def check_world_size(self, world_size: int) -> None:
        """Raise RecipeError unless the global batch splits evenly over `world_size` ranks."""
        if not isinstance(world_size, int) or world_size < 1:
            raise RecipeError(f"world size must be a positive integer, got {world_size!r}")
        problem = _batch_split_problem(self.train, world_size)
        if problem:
            raise RecipeError(f"train.global_batch_size: {problem}")
        problem = vocab_parallel_problem(self.parallel.vocab_parallel_size, world_size=world_size)
        if problem:
            raise RecipeError(problem)
        hpz = self.parallel.hpz_partition_size
        if hpz != "auto" and world_size % hpz:
            raise RecipeError(
                f"parallel.hpz_partition_size: {hpz} does not divide the {world_size} ranks; "
                "set the ranks per node (or 1: off)"
            )

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Micro-batches each rank accumulates per optimizer step."""
        self.check_world_size(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * world_size)


def default_cache_dir() -> str:
    """Where shared caches go when a recipe does not say: $TAIL_KD_CACHE, else ~/.cache/tail_kd.
    On a cluster, point it at a filesystem every node sees (a job's ranks build into it under a
    file lock: tail_kd/locks.py)."""
    return os.environ.get("TAIL_KD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tail_kd"
    )


def vocab_parallel_problem(
    size: int,
    *,
    world_size: int | None = None,
    ranks_per_node: int | None = None,
    offloaded: Sequence[str] = (),
    reference_loss: bool = False,
    vocab_size: int | None = None,
    student_zero_stage: int | str = "auto",
) -> str | None:
    """Why `parallel.vocab_parallel_size: size` cannot run in a set-up, or None if it can.

    The rules, each written only here; callers pass what they know when they know it:
    - groups are `size` consecutive ranks: `size` divides the world size;
    - a group sits on one node: `size` divides the ranks per node;
    - the rows are read from ZeRO-3's partitions on the device: no ZeRO offload, and a ZeRO-3
      student (`parallel.student_zero_stage` 3 or auto, which then takes 3);
    - `--reference-loss` makes full logits on every rank: not with vocab-parallel heads;
    - every member holds at least one row: `size` <= the vocabulary.
    """
    if size == 1:
        return None
    key = f"parallel.vocab_parallel_size: {size}"
    if world_size is not None and world_size % size:
        return (
            f"{key} does not divide the {world_size} ranks; choose a divisor of {world_size} "
            "(1 turns vocab parallelism off)"
        )
    if ranks_per_node is not None and ranks_per_node % size:
        return (
            f"{key} does not divide the {ranks_per_node} ranks on this node; a group must sit "
            "on one node"
        )
    if offloaded:
        return (
            f"{key} cannot be combined with deepspeed.zero_optimization.{offloaded[0]} "
            "(vocab-parallel heads read ZeRO-3's partitions on the device); set one of them off"
        )
    if student_zero_stage not in (3, "auto"):
        return (
            f"{key} cannot be combined with parallel.student_zero_stage: {student_zero_stage} "
            "(vocab-parallel heads read the rows of ZeRO-3's partitions); set the stage to 3 "
            "or auto"
        )
    if reference_loss:
        return (
            "--reference-loss computes full logits on every rank: run it with "
            "parallel.vocab_parallel_size=1"
        )
    if vocab_size is not None and vocab_size < size:
        return f"{key} exceeds the {vocab_size}-token vocabulary"
    return None


def _batch_split_problem(train: TrainConfig, world_size: int) -> str | None:
    """Why `train.global_batch_size` cannot be split into micro-batches on `world_size` ranks."""
    per_pass = train.micro_batch_size * world_size
    if train.global_batch_size % per_pass == 0:
        return None
    fixes = [f"train.global_batch_size={math.ceil(train.global_batch_size / per_pass) * per_pass}"]
    fitting = [
        m
        for m in range(train.micro_batch_size, 0, -1)
        if train.global_batch_size % (m * world_size) == 0
    ]
    if fitting:
        fixes.insert(0, f"train.micro_batch_size={fitting[0]}")
    return (
        f"{train.global_batch_size} is not a multiple of train.micro_batch_size "
        f"({train.micro_batch_size}) x world size ({world_size}) = {per_pass}; "
        f"set {' or '.join(fixes)}"
    )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read the recipe YAML at `path`, apply `section.field=value` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe file {path}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    return Recipe.from_dict(apply_overrides(data, overrides), str(path), overrides)


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of recipe data with each `a.b=value` override set (value parsed as YAML).

    Keys are checked against the schema, so a typo fails here instead of being silently ignored;
    below `deepspeed.` any key is accepted (it is DeepSpeed's own config).
    """
    data = _copy_tree(data)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set expects KEY=VALUE (e.g. train.lr=3e-4), got {override!r}")
        parts = key.strip().split(".")
        try:
            _check_key(parts)
        except RecipeError as error:
            raise RecipeError(f"--set {override}: {error}") from None
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise RecipeError(f"--set {override}: the value is not valid YAML ({error})") from None
        node = data
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if node.get(part) is not None:
                    raise RecipeError(
                        f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section"
                    )
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _override_keys(overrides: Iterable[str]) -> set[str]:
    """The dotted keys that `KEY=VALUE` overrides set."""
    return {override.partition("=")[0].strip() for override in overrides}


def _check_key(parts: list[str]) -> None:
    """Raise RecipeError unless the dotted key `parts` names a recipe field."""
    cls: Any = Recipe
    for depth, part in enumerate(parts):
        if cls is dict:  # free-form section (deepspeed): anything goes below it
            return
        if not dataclasses.is_dataclass(cls):
            raise RecipeError(
                f"{'.'.join(parts[:depth])} is a value, not a section: cannot set {'.'.join(parts)}"
            )
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise RecipeError(_unknown_key_message(".".join(parts)))
        hint = hints[part]
        cls = dict if typing.get_origin(hint) is dict else (_section(hint) or hint)


def _all_keys(cls: Any = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: sections and fields."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if _section(hint) is not None:
            keys.extend(_all_keys(_section(hint), f"{prefix}{name}."))
    return keys


def _section(hint: Any) -> type | None:
    """The section (dataclass) a field's type names, also when optional (`TeacherConfig | None`)."""
    if dataclasses.is_dataclass(hint):
        return hint
    sections = [t for t in typing.get_args(hint) if dataclasses.is_dataclass(t)]
    return sections[0] if sections else None


def _unknown_key_message(key: str) -> str:
    """`unknown key 'train.lr_sched' (did you mean 'train.lr'?)`."""
    candidates = _all_keys()
    leaf = key.rsplit(".", 1)[-1]
    guesses = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    guesses = guesses or difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(g) for g in guesses)}?)" if guesses else ""
    return f"unknown key {key!r}{hint}"


# ---------------------------------------------------------------------------------------------
# Plain data -> dataclasses, checking types and ranges
# ---------------------------------------------------------------------------------------------


def _build(cls: type, data: Any, section: str) -> Any:
    """Instantiate dataclass `cls` from the mapping `data` found at dotted `section`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{section or 'recipe'}: expected a mapping of fields, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{section}." if section else ""
    for key in data:
        if key not in fields:
            raise RecipeError(_unknown_key_message(prefix + str(key)))
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], prefix + name)
            allowed = spec.metadata.get("range")
            if allowed is not None and values[name] is not None and values[name] not in allowed:
                noun = "integer" if _strip_none(hints[name]) is int else "number"
                raise _FieldError(
                    prefix + name, f"expected {allowed.describe(noun)}, got {values[name]!r}"
                )
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                values[name] = _build(
                    hints[name], {}, prefix + name
                )  # names the missing field inside
            else:
                raise _FieldError(prefix + name, "required but missing")
    try:
        return cls(**values)
    except _FieldError as error:
        raise (error.within(section) if section else error) from None


def _convert(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the type `hint` and return it in that type (e.g. list -> tuple)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(hint):
            return None
        if _section(hint) is not None:  # an optional section: its own errors name the field
            return _build(_section(hint), value, path)
        for option in typing.get_args(hint):
            if option is not type(None):
                try:
                    return _convert(value, option, path)
                except _FieldError:
                    continue
        raise _FieldError(path, f"expected {_describe(hint)}, got {_show(value)}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if any(value == c and type(value) is type(c) for c in choices):  # `true` is not 1
            return value
        close = difflib.get_close_matches(str(value), list(map(str, choices)), n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise _FieldError(
            path, f"expected one of {', '.join(map(str, choices))}; got {_show(value)}{hint_text}"
        )
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        number = _as_float(value)
        if number is not None:
            return number
        ok = False
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list:
        ok = isinstance(value, list)
        if ok:
            (item,) = typing.get_args(hint)
            return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        items = typing.get_args(hint)
        ok = isinstance(value, (list, tuple)) and len(value) == len(items)
        if ok:
            return tuple(
                _convert(v, t, f"{path}[{i}]")
                for i, (v, t) in enumerate(zip(value, items, strict=True))
            )
    elif origin is dict:
        ok = isinstance(value, Mapping)
        if ok:
            return _copy_tree(value)
    else:
        raise TypeError(f"config field {path} has an unsupported type {hint!r}")
    if not ok:
        raise _FieldError(path, f"expected {_describe(hint)}, got {_show(value)}")
    return value


def _as_float(value: Any) -> float | None:
    """`value` as a float, or None. Strings count: YAML 1.1 reads `1e-4` (no dot) as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _describe(hint: Any) -> str:
    """Words for a type in error messages: `a list of 2 numbers`, `an integer or null`."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(
            "null" if t is type(None) else _describe(t) for t in typing.get_args(hint)
        )
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    if origin is tuple:
        args = typing.get_args(hint)
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _strip_none(hint: Any) -> Any:
    """`int | None` -> `int`."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        (inner,) = [t for t in typing.get_args(hint) if t is not type(None)]
        return inner
    return hint


def _show(value: Any) -> str:
    """A value for an error message, with its type when that is the problem."""
    if isinstance(value, (Mapping, list)):
        return f"a {type(value).__name__}: {value!r}"
    return repr(value)


def _copy_tree(data: Mapping[str, Any]) -> dict[str, Any]:
    """Copy nested dicts (so overrides never change the caller's data)."""
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _plain(value: Any) -> Any:
    """Dataclass `asdict` output with tuples turned into lists (YAML- and JSON-safe)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def add_override_argument(parser: argparse.ArgumentParser, example: str = "train.lr=3e-4") -> None:
    """The `--set KEY=VALUE` option (repeatable) whose values `load_recipe(path, overrides)` takes."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a recipe field, e.g. --set {example} (repeatable)",
    )
