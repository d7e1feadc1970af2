"""Held-out token metrics and maths accuracy of a model: the library behind `tail-kd eval`
(tail_kd/eval/command.py), the study (tools/study.py) and the trainer's evaluations.

- `load_model`: a run directory's student (its newest complete checkpoint, or `step`,
  consolidated from the ZeRO-3 shards in memory as `tail-kd export` does) or the model a
  reference names, as recipes take them (a Hugging Face folder, a `.gguf` file,
  `pkg://PACKAGE/FILE`, `tiny://`, a hub id);
- `load_eval_data`: held-out sequences from a recipe (its held-out set, exactly as the trainer
  builds it, from the same cache) or from data files (records with `question` and `answer`
  fields scored on the answer tokens, as supervised training does; other records are text,
  packed into `seq_len` token sequences);
- `Evaluator`: scores models on one set, computing the teacher's hidden states once;
- `format_report`, `write_tensorboard`: the report for people and as `eval/<metric>` scalars.

The metrics (definitions and citations in tail_kd/eval/metrics.py and tail_kd/eval/maths.py):
ce, perplexity, top1_accuracy, ece, full_ece, and with a teacher (same tokenizer, or a
vocabulary of which the model's is a prefix) kl_to_teacher and top1_agreement; with `gsm=N`,
gsm_accuracy and gsm_strict_accuracy (`#### N` answers only) on N held-out gsm_symbolic problems
(greedy, batched).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tail_kd.config import default_cache_dir
from tail_kd.exit_status import UsageError
from tail_kd.eval.metrics import NUM_BINS, TOKEN_METRICS, TokenMetrics, score_hidden_states

__all__ = [
    "LoadedModel",
    "load_model",
    "load_eval_data",
    "Evaluator",
    "format_report",
    "write_tensorboard",
    "REPORTED",
]

# The scalars of a report, in the order they are printed and logged as eval/<name>.
REPORTED = TOKEN_METRICS + ("gsm_accuracy", "gsm_strict_accuracy")


class EvalError(UsageError):
    """An input that cannot be evaluated; the message says what to change."""


@dataclass
class LoadedModel:
    """A model ready to score, with where it came from."""

    model: Any
    tokenizer: Any
    source: str
    step: int | None = None  # the checkpoint's step, for a run directory
    recipe: dict[str, Any] | None = None  # the run's recipe, for a run directory


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def load_model(
    reference: str,
    *,
    step: int | None = None,
    cache_dir: str | None = None,
    gguf_file: str | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """A run directory's student or the model a reference names (module docstring; `gguf_file`
    as a recipe's `teacher.gguf_file`; `cache_dir` for converted GGUF files, default the recipes'
    default), in float32 on `device`."""
    from transformers import AutoTokenizer, GenerationConfig

    from tail_kd.export import load_student
    from tail_kd.models import load_causal_lm, load_tokenizer, resolve_model_dir
    from tail_kd.pair import resolve_reference
    from tail_kd.run_dir import STUDENT_DIR, find_checkpoint, is_run_dir

    if is_run_dir(reference):
        run_dir = Path(reference)
        spec = run_dir / STUDENT_DIR
        model, saved_step = load_student(run_dir, step)
        if (spec / "generation_config.json").is_file():  # as `tail-kd export` writes it
            model.generation_config = GenerationConfig.from_pretrained(spec)
        recipe = find_checkpoint(run_dir, saved_step).trainer_state.get("recipe")
        tokenizer = AutoTokenizer.from_pretrained(spec)
        return LoadedModel(model.to(device).eval(), tokenizer, str(run_dir), saved_step, recipe)
    if step is not None:
        raise EvalError(f"--step needs a training run directory; {reference} is not one")
    cache_dir = cache_dir or default_cache_dir()
    folder = resolve_model_dir(resolve_reference(reference, cache_dir), cache_dir, gguf_file)
    model = load_causal_lm(folder, torch.float32).to(device).eval()
    return LoadedModel(model, load_tokenizer(folder), reference)


def shared_vocab_size(student: LoadedModel, teacher: LoadedModel | None) -> int:
    """The number of leading token ids scored: real tokens of the model (and of the teacher)."""
    from tail_kd.models import VocabularyMismatchError, check_vocabularies

    s_rows = student.model.get_output_embeddings().weight.shape[0]
    if teacher is None:
        return check_vocabularies(student.tokenizer, student.tokenizer, s_rows, s_rows)
    t_rows = teacher.model.get_output_embeddings().weight.shape[0]
    try:
        return check_vocabularies(teacher.tokenizer, student.tokenizer, t_rows, s_rows)
    except VocabularyMismatchError as error:
        raise EvalError(f"model and teacher vocabularies: {error}") from None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """Held-out sequences (dicts of int64 tensors, the data contract) and what they are."""

    items: Sequence[dict[str, torch.Tensor]]
    description: dict[str, Any]
    recipe: Any = None  # the Recipe they came from, if any (its gsm_symbolic settings matter)


def load_eval_data(
    data: str | None,
    tokenizer: Any,
    *,
    run_recipe: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    seq_len: int = 256,
    max_examples: int | None = None,
) -> EvalData:
    """The held-out sequences of `data` (a recipe YAML or data files; None: `run_recipe`, a
    run's saved recipe), with a recipe's `overrides` applied, at most `max_examples`."""
    from tail_kd.config import Recipe, apply_overrides, load_recipe

    if data is not None and Path(data).suffix in (".yaml", ".yml"):
        recipe = load_recipe(data, overrides)
        origin = data
    elif data is None and run_recipe is not None:
        recipe = Recipe.from_dict(
            apply_overrides(run_recipe, overrides), "the run's recipe", overrides
        )
        origin = "the run's recipe"
    elif data is None:
        raise EvalError("no data to score: give a recipe or data files, or a run's recipe")
    else:
        items, description = _encode_files(data, tokenizer, seq_len)
        items = _cap(items, max_examples)
        return EvalData(items, {**description, "sequences": len(items)})
    items = _cap(_recipe_eval_set(recipe, tokenizer), max_examples)
    description = {
        "recipe": origin,
        "kind": recipe.data.kind,
        "source": recipe.data.source,
        "seed": recipe.seed,
        "sequences": len(items),
    }
    return EvalData(items, description, recipe)


def _recipe_eval_set(recipe: Any, tokenizer: Any) -> Sequence[dict[str, torch.Tensor]]:
    from tail_kd.data.prepared import build_datasets

    _, held = build_datasets(recipe.data, tokenizer, recipe.data.cache_dir, recipe.seed)
    if held is None:
        raise EvalError("the recipe holds out no data (data.eval_examples is 0): --set it higher")
    return held


def _cap(items: Sequence, limit: int | None) -> Sequence:
    if limit is None or limit >= len(items):
        return items
    return items.select(range(limit)) if hasattr(items, "select") else items[:limit]


def _encode_files(path: str, tokenizer: Any, seq_len: int) -> tuple[list[dict], dict[str, Any]]:
    """Every record of local files as held-out sequences: question/answer records as in supervised
    training (loss on the answer), text records packed as in pre-training."""
    from tail_kd.data import pretrain, sft
    from tail_kd.data.sources import FileSource

    records = list(FileSource.from_paths([path]).records())
    if not records:
        raise EvalError(f"--data {path}: no records")
    if all("question" in r.fields and "answer" in r.fields for r in records):
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        rows = []
        for record in records:
            prompt_ids, answer_ids = sft.tokenize_example(
                record.text("question", "question"), record.text("answer", "answer"), tokenizer
            )
            if len(prompt_ids) < seq_len:
                rows.append(sft.to_sequence(prompt_ids, answer_ids, seq_len, pad))
        kind = "sft"
    else:
        texts = (r.text("text", "text") for r in records)
        windows = pretrain.pack(
            pretrain.tokenize_documents(texts, tokenizer), tokenizer.eos_token_id, seq_len
        )
        rows = [{"input_ids": w, "labels": w, "attention_mask": [1] * len(w)} for w in windows]
        kind = "pretrain"
    if not rows:
        raise EvalError(f"--data {path}: nothing fits --seq-len {seq_len}")
    items = [{k: torch.tensor(v, dtype=torch.long) for k, v in row.items()} for row in rows]
    return items, {"file": path, "kind": kind, "seq_len": seq_len}


def _batches(items: Sequence[dict], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(items), batch_size):
        chunk = [items[i] for i in range(start, min(start + batch_size, len(items)))]
        yield {key: torch.stack([item[key] for item in chunk]) for key in chunk[0]}


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


class Evaluator:
    """Scores models on one held-out set, optionally against one teacher, loading each thing once.

    The teacher's final hidden states on the set are computed for the first model scored and
    kept: every later model's KL then costs one teacher lm_head product per chunk of positions,
    not a teacher forward (a study scores many students against one teacher). Maths problems are
    generated once, for the largest count asked.

        evaluator = Evaluator(data, teacher)
        report = evaluator.evaluate(student, gsm=64)   # the report `tail-kd eval` writes

    Each model is scored with its final hidden states per batch of `batch_size` sequences, then
    logits for `chunk_size` positions at a time (`score_hidden_states`), real tokens only.
    """

    def __init__(
        self,
        data: EvalData,
        teacher: LoadedModel | None = None,
        *,
        batch_size: int = 8,
        chunk_size: int = 128,
        gsm_batch_size: int = 16,
        max_new_tokens: int = 256,
    ):
        self.data = data
        self.teacher = teacher
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.gsm_batch_size = gsm_batch_size
        self.max_new_tokens = max_new_tokens
        self._teacher_hidden: list[torch.Tensor] | None = None
        self._problems: list[tuple[str, str]] = []

    def evaluate(self, model: LoadedModel, *, gsm: int = 0) -> dict[str, Any]:
        """The report: metrics, reliability diagrams and, with `gsm` problems, maths accuracy."""
        start = time.perf_counter()
        vocab_size = shared_vocab_size(model, self.teacher)
        metrics = self.token_metrics(model.model, vocab_size)
        scores = metrics.result()
        report: dict[str, Any] = {
            "model": model.source,
            "step": model.step,
            "teacher": None if self.teacher is None else self.teacher.source,
            "data": {**self.data.description, "positions": scores.pop("positions")},
            "vocab_size": vocab_size,
            "num_bins": metrics.num_bins,
            "metrics": scores,
            "reliability": metrics.diagrams(),
        }
        if gsm:
            from tail_kd.eval.maths import maths_accuracy  # imports transformers' generation

            seed, train_examples = _gsm_settings(self.data.recipe)
            result = maths_accuracy(
                model.model,
                model.tokenizer,
                self.problems(gsm),
                batch_size=self.gsm_batch_size,
                max_new_tokens=self.max_new_tokens,
            )
            scores["gsm_accuracy"] = result["accuracy"]
            scores["gsm_strict_accuracy"] = result["strict_accuracy"]
            report["gsm"] = {
                "seed": seed,
                "excluded_train_examples": train_examples,
                "max_new_tokens": self.max_new_tokens,
                **result,
            }
        report["seconds"] = round(time.perf_counter() - start, 1)
        return report

    @torch.no_grad()
    def token_metrics(self, model: Any, vocab_size: int | None) -> TokenMetrics:
        """`model`'s token metrics on the set (and against the teacher, if any)."""
        from tail_kd.models import head_logits

        metrics = TokenMetrics(NUM_BINS)
        device = next(model.parameters()).device
        teacher_hidden = self.teacher_hidden()
        for index, batch in enumerate(_batches(self.data.items, self.batch_size)):
            teacher = None if self.teacher is None else self.teacher.model
            score_hidden_states(
                metrics,
                _final_hidden(model, batch, device),
                functools.partial(head_logits, model),
                batch["labels"].to(device),
                None if teacher_hidden is None else teacher_hidden[index].to(device),
                None if teacher is None else functools.partial(head_logits, teacher),
                vocab_size=vocab_size,
                chunk_size=self.chunk_size,
            )
        return metrics

    def teacher_hidden(self) -> list[torch.Tensor] | None:
        """The teacher's final hidden states per batch of the set, computed on first use."""
        if self.teacher is not None and self._teacher_hidden is None:
            model = self.teacher.model
            device = next(model.parameters()).device
            with torch.no_grad():
                self._teacher_hidden = [  # in host memory: the device's is for the models
                    _final_hidden(model, batch, device).cpu()
                    for batch in _batches(self.data.items, self.batch_size)
                ]
        return self._teacher_hidden

    def problems(self, count: int) -> list[tuple[str, str]]:
        """The first `count` held-out maths problems of the largest set asked for so far
        (`held_out_problems`, generated once per larger count)."""
        if count > len(self._problems):
            from tail_kd.eval.maths import held_out_problems

            seed, train_examples = _gsm_settings(self.data.recipe)
            self._problems = held_out_problems(count, seed, train_examples)
        return self._problems[:count]


def _final_hidden(model: Any, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    return model.base_model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    ).last_hidden_state


def _gsm_settings(recipe: Any) -> tuple[int, int | None]:
    """(seed, training-set size to exclude) for held-out maths problems: the recipe's when it
    trains on gsm_symbolic, else seed 0 and nothing to exclude."""
    if recipe is not None and recipe.data.source == "gsm_symbolic":
        return recipe.seed, recipe.data.num_examples
    return 0, None


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def write_tensorboard(log_dir: str | Path, report: dict[str, Any], step: int) -> None:
    """Log each finite metric of REPORTED as the scalar `eval/<name>` at `step`, and the
    benchmarks' accuracies (`report["benchmarks"]`, tail_kd/eval/harness.py) as
    `eval/tasks/<name>` and `eval/tasks/average`."""
    from torch.utils.tensorboard import SummaryWriter

    from tail_kd.eval.harness import task_scalars

    scalars = {name: report["metrics"].get(name) for name in REPORTED}
    if report.get("benchmarks"):
        scalars.update(task_scalars(report["benchmarks"]))
    writer = SummaryWriter(str(log_dir))
    try:
        for name, value in scalars.items():
            if value is not None and math.isfinite(value):
                writer.add_scalar(f"eval/{name}", value, step)
    finally:
        writer.close()


def format_report(report: dict[str, Any]) -> str:
    metrics = report["metrics"]
    parts = [f"{name} {metrics[name]:.4g}" for name in REPORTED if name in metrics]
    data = report["data"]
    text = (
        f"{report['model']}"
        + (f" (step {report['step']})" if report["step"] is not None else "")
        + f": {data['sequences']} sequences, {int(data['positions'])} scored positions\n"
        + " | ".join(parts)
    )
    if report.get("benchmarks"):
        tasks = report["benchmarks"]["tasks"]
        text += "\naccuracy: " + " | ".join(
            [f"{name} {r['accuracy']:.4g}" for name, r in tasks.items()]
            + [f"average {report['benchmarks']['average_accuracy']:.4g}"]
        )
    return text
