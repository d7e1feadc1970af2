"""Supervised data: question/answer records -> one sequence each, with the loss on the answer only.

Rendering: with the tokenizer's chat template when it has one (a user turn holding the question,
an assistant turn holding the answer; the answer tokens are everything the template adds after
the generation prompt, end-of-turn marker included); otherwise the plain format
`Question: {question}\nAnswer: ` followed by the answer and EOS. No BOS is added beyond what a
chat template writes itself, as in packed pre-training data.

Every sequence is `seq_len` long: labels are -100 on the prompt and on padding, attention_mask is 0
on padding (right padding, with the pad token or else EOS). Too-long examples lose the end of their
answer; records whose prompt alone fills `seq_len` are dropped. Both are counted and logged.

Evaluation: a generated source draws its own problems (duplicates of training questions removed);
any other source holds out its last `eval_examples` records.

Part of the builder protocol of `tail_kd.data`: `cache_key`, `build`, `datasets_from_tables`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm import tqdm

from tail_kd.config import DataConfig
from tail_kd.data.cache import TableWriter
from tail_kd.data.sources import DataError, Source
from tail_kd.losses import IGNORE_INDEX

__all__ = [
    "PLAIN_PROMPT",
    "render",
    "tokenize_example",
    "to_sequence",
    "cache_key",
    "build",
    "datasets_from_tables",
]

logger = logging.getLogger(__name__)

PLAIN_PROMPT = "Question: {question}\nAnswer: "
COLUMNS = ("input_ids", "labels", "attention_mask")
QA = tuple[str, str]  # (question, answer)


def render(question: str, answer: str, tokenizer: Any) -> tuple[str, str]:
    """The prompt text and the answer text that follows it (chat template or plain format)."""
    if not tokenizer.chat_template:
        return PLAIN_PROMPT.format(question=question), answer + tokenizer.eos_token
    user = {"role": "user", "content": question}
    prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [user, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(prompt):
        raise DataError(
            "the tokenizer's chat template does not render the generation prompt as the start of "
            "the conversation, so prompt and answer tokens cannot be told apart; remove the "
            "template (tokenizer.chat_template = None) to use the plain Question/Answer format"
        )
    return prompt, full[len(prompt) :]


def tokenize_example(question: str, answer: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the answer that follows it (no special tokens added)."""
    prompt, completion = render(question, answer, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids


def to_sequence(
    prompt_ids: list[int], answer_ids: list[int], seq_len: int, pad_id: int
) -> dict[str, list[int]]:
    """input_ids, labels and attention_mask, cut or right-padded to `seq_len`.

    Needs `len(prompt_ids) < seq_len`, so that at least one answer token remains.
    """
    if len(prompt_ids) >= seq_len:
        raise ValueError(
            f"the prompt ({len(prompt_ids)} tokens) leaves no room for the answer in {seq_len}"
        )
    input_ids = (prompt_ids + answer_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:seq_len]
    padding = seq_len - len(input_ids)
    return {
        "input_ids": input_ids + [pad_id] * padding,
        "labels": labels + [IGNORE_INDEX] * padding,
        "attention_mask": [1] * len(input_ids) + [0] * padding,
    }


def cache_key(data: DataConfig) -> dict[str, Any]:
    """The settings the tables depend on (besides the source and the tokenizer)."""
    return {
        "question_field": data.question_field,
        "answer_field": data.answer_field,
        "seq_len": data.seq_len,
        "eval_examples": data.eval_examples,
    }


def build(source: Source, data: DataConfig, tokenizer: Any, out_dir: Path) -> dict[str, Any]:
    """Encode the train (and eval) records into `train.arrow` (and `eval.arrow`); return counts."""
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the teacher tokenizer has no EOS token, which ends answers and pads sequences"
        )
    train_pairs, eval_pairs = _split(source, data)
    summary = {"train": _write(train_pairs, data, tokenizer, out_dir / "train.arrow", "train")}
    if eval_pairs:
        summary["eval"] = _write(eval_pairs, data, tokenizer, out_dir / "eval.arrow", "eval")
    return summary


def datasets_from_tables(
    tables: dict[str, datasets.Dataset], data: DataConfig
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Train and eval datasets yielding int64 tensors."""
    train = tables["train"].with_format("torch", dtype=torch.long)
    held = tables["eval"].with_format("torch", dtype=torch.long) if "eval" in tables else None
    return train, held


def _split(source: Source, data: DataConfig) -> tuple[list[QA], list[QA]]:
    """Training and evaluation (question, answer) pairs (see the module docstring)."""
    pairs = _read_pairs(source, data)
    if not pairs:
        raise DataError(f"data.source {data.source!r}: no records")
    held = data.eval_examples
    if held == 0:
        return pairs, []
    generated = source.held_out(held)
    if generated is not None:
        seen = {question for question, _ in pairs}
        fresh = [pair for pair in _read_pairs(generated, data) if pair[0] not in seen]
        if len(fresh) < held:
            logger.warning(
                "dropped %d eval problems that also appear in the training set", held - len(fresh)
            )
        return pairs, fresh
    if held >= len(pairs):
        raise DataError(
            f"data.source {data.source!r} has {len(pairs)} records, and data.eval_examples="
            f"{held} would leave none for training; lower data.eval_examples"
        )
    return pairs[:-held], pairs[-held:]


def _read_pairs(source: Source, data: DataConfig) -> list[QA]:
    """The (question, answer) texts of every record, checking that each has both fields."""
    return [
        (
            record.text(data.question_field, "data.question_field"),
            record.text(data.answer_field, "data.answer_field"),
        )
        for record in source.records()
    ]


def _write(
    pairs: Iterable[QA], data: DataConfig, tokenizer: Any, path: Path, split: str
) -> dict[str, int]:
    """Encode `pairs` into the table `path`; log and return how many were kept, cut, dropped."""
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    counts = {"examples": 0, "answer_tokens": 0, "truncated": 0, "dropped": 0}
    with TableWriter(path, COLUMNS, data.seq_len) as table:
        for question, answer in tqdm(pairs, desc=f"encoding {split}", unit=" example"):
            prompt_ids, answer_ids = tokenize_example(question, answer, tokenizer)
            if len(prompt_ids) >= data.seq_len:
                counts["dropped"] += 1
                continue
            counts["truncated"] += len(prompt_ids) + len(answer_ids) > data.seq_len
            counts["answer_tokens"] += min(len(answer_ids), data.seq_len - len(prompt_ids))
            counts["examples"] += 1
            table.write(to_sequence(prompt_ids, answer_ids, data.seq_len, pad_id))
    total = counts["examples"] + counts["dropped"]
    if counts["dropped"]:
        logger.warning(
            "%s: dropped %d of %d records whose prompt alone fills data.seq_len=%d",
            split,
            counts["dropped"],
            total,
            data.seq_len,
        )
    if counts["truncated"]:
        logger.warning(
            "%s: cut the end off %d of %d answers longer than data.seq_len=%d allows",
            split,
            counts["truncated"],
            total,
            data.seq_len,
        )
    if counts["examples"] == 0:
        raise DataError(
            f"data.source {data.source!r}: no {split} record fits data.seq_len={data.seq_len}"
        )
    return counts
