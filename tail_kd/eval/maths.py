"""Maths accuracy: greedy answers to held-out GSM8K-style problems, scored by exact match.

Protocol (the usual GSM8K one, as in Cobbe et al. 2021 and lm-evaluation-harness's `gsm8k`):

1. Problems: `held_out_problems` generates GSM8K-style problems with reasoning-gym's
   `gsm_symbolic` from the held-out seed the trainer uses for its evaluation records
   (`seed + EVAL_SEED_OFFSET`, tail_kd/data/sources.py), dropping any whose question also occurs
   in the given training set. Each has a worked solution ending in `#### <number>`.
2. Prompts: exactly the prompt of supervised training (`tail_kd.data.sft.render`: the chat
   template's user turn + generation prompt, or `Question: ...\\nAnswer: ` without a template).
3. Generation: greedy, batched (left padding), until EOS, until the completion has written a
   complete `#### <number>` line, or `max_new_tokens`.
4. Extraction (`extract_answer`): the number after the first `####`; if there is none, the last
   number in the completion (lm-evaluation-harness's "strict" then "flexible" extraction). The
   fallback can credit a degenerate completion whose last number happens to be the answer (a
   string of 1s for the answer 1), so the strict score, which accepts `#### N` answers only
   (`strict=True`), is reported beside it.
   Numbers are normalised: thousands separators and `$` dropped, trailing zeros of decimals
   removed (`1,234.50` -> `1234.5`, `18.0` -> `18`).
5. Score: exact match of the normalised predicted and reference numbers; accuracy = the fraction
   of problems matched (`accuracy`, and `strict_accuracy` with the `####`-only extraction).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

__all__ = [
    "extract_answer",
    "normalize_number",
    "is_correct",
    "held_out_problems",
    "prompt_for",
    "generate_greedy",
    "maths_accuracy",
]

# A number: an optional sign, digits with optional comma thousands groups, optional decimals.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_MARKED = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)
# A finished answer line: `#### <number>` followed by something that is not part of the number.
_ANSWER_LINE = re.compile(r"####\s*\$?\s*(?:" + _NUMBER + r")(?:\.?\s)")


def normalize_number(text: str) -> str | None:
    """`1,234.50` -> `1234.5`, `$18.0` -> `18`, `-0.50` -> `-0.5`; None if not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The normalised answer of a completion: after the first `####`, else (unless `strict`) the
    last number."""
    marked = _MARKED.search(text)
    if marked is not None:
        return normalize_number(marked.group(1))
    if strict:
        return None
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(completion: str, reference: str, strict: bool = False) -> bool:
    """Exact match of the answers extracted from a completion (`####` only when `strict`) and a
    reference solution."""
    predicted = extract_answer(completion, strict)
    return predicted is not None and predicted == extract_answer(reference)


def held_out_problems(
    count: int, seed: int = 0, train_examples: int | None = None
) -> list[tuple[str, str]]:
    """`count` held-out gsm_symbolic (question, solution) pairs for a run with `seed`.

    Drawn with the trainer's held-out seed (`seed + EVAL_SEED_OFFSET`), so that the first ones are
    the trainer's own evaluation records; with `train_examples`, problems whose question is also
    in the training set of that size and seed are dropped (so fewer than `count` may remain).
    Needs reasoning-gym; the problems are generated, never stored in the repository.
    """
    from tail_kd.data.sources import EVAL_SEED_OFFSET, GsmSymbolicSource

    def pairs(source: GsmSymbolicSource) -> list[tuple[str, str]]:
        return [(r.fields["question"], r.fields["answer"]) for r in source.records()]

    problems = pairs(GsmSymbolicSource(size=count, seed=seed + EVAL_SEED_OFFSET))
    if train_examples:
        seen = {question for question, _ in pairs(GsmSymbolicSource(train_examples, seed))}
        problems = [pair for pair in problems if pair[0] not in seen]
    return problems


def prompt_for(question: str, tokenizer: Any) -> str:
    """The prompt text supervised training puts before an answer (tail_kd.data.sft.render)."""
    from tail_kd.data.sft import render

    return render(question, "", tokenizer)[0]


class _AnswerWritten(StoppingCriteria):
    """Stops each sequence once its completion holds a finished `#### <number>` line."""

    def __init__(self, tokenizer: Any, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_length :], skip_special_tokens=True
        )
        done = [_ANSWER_LINE.search(text) is not None for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
) -> list[str]:
    """Greedy completions of `prompts` (in their order), `batch_size` at a time.

    Prompts are sorted by length so that a batch needs little padding; padding is on the left,
    as decoder-only generation requires. Special tokens are removed from the completions.
    """
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    completions: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = tokenizer.pad(
                {"input_ids": [encoded[i] for i in indices]}, return_tensors="pt"
            ).to(device)
            width = batch["input_ids"].shape[1]
            output = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                stopping_criteria=StoppingCriteriaList([_AnswerWritten(tokenizer, width)]),
            )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            for index, text in zip(indices, texts, strict=True):
                completions[index] = text
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return completions


def maths_accuracy(
    model: Any,
    tokenizer: Any,
    problems: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Exact-match accuracy (and strict accuracy) of greedy answers to `problems`
    [(question, solution)], with the per-problem details (question, reference, completion,
    extracted answer, correct, correct_strict)."""
    prompts = [prompt_for(question, tokenizer) for question, _ in problems]
    completions = generate_greedy(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    details = []
    for (question, solution), completion in zip(problems, completions, strict=True):
        details.append(
            {
                "question": question,
                "reference": extract_answer(solution),
                "predicted": extract_answer(completion),
                "correct": is_correct(completion, solution),
                "correct_strict": is_correct(completion, solution, strict=True),
                "completion": completion,
            }
        )
    correct = sum(d["correct"] for d in details)
    strict = sum(d["correct_strict"] for d in details)
    return {
        "accuracy": correct / len(details) if details else float("nan"),
        "strict_accuracy": strict / len(details) if details else float("nan"),
        "correct": correct,
        "correct_strict": strict,
        "problems": len(details),
        "details": details,
    }
