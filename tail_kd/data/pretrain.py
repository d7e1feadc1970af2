"""Continued pre-training data: documents -> tokens -> packed sequences of `seq_len` tokens.

Each document is tokenised without special tokens and followed by EOS; the concatenated token
stream is cut into consecutive windows of `seq_len` tokens, and the final partial window is
dropped. The loss is taken on every token (labels = input_ids, attention_mask all ones): as in
standard packing, a window may span a document boundary, marked by the EOS.

Evaluation holds out the last `eval_examples` windows. They share no tokens with the training
windows, only (at the boundary) a document.

Part of the builder protocol of `tail_kd.data`: `cache_key`, `build`, `datasets`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm import tqdm

from tail_kd.config import DataConfig
from tail_kd.data.cache import TableWriter
from tail_kd.data.sources import DataError, Source

__all__ = ["tokenize_documents", "pack", "cache_key", "build", "datasets_from_tables"]

TABLE = "sequences"


def tokenize_documents(
    texts: Iterable[str], tokenizer: Any, batch_size: int = 64
) -> Iterator[list[int]]:
    """Token ids of each text, without special tokens, tokenised `batch_size` texts at a time."""
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_size)):
        # verbose=False: documents longer than the model's context are expected here.
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def pack(documents: Iterable[list[int]], eos_token_id: int, seq_len: int) -> Iterator[list[int]]:
    """Concatenate the documents, each followed by `eos_token_id`, and cut into `seq_len` windows.

    The final window shorter than `seq_len` is not yielded.
    """
    buffer: list[int] = []
    for tokens in documents:
        buffer.extend(tokens)
        buffer.append(eos_token_id)
        start = 0
        while len(buffer) - start >= seq_len:
            yield buffer[start : start + seq_len]
            start += seq_len
        del buffer[:start]


def cache_key(data: DataConfig) -> dict[str, Any]:
    """The settings the packed table depends on (besides the source and the tokenizer)."""
    return {"text_field": data.text_field, "seq_len": data.seq_len}


def build(source: Source, data: DataConfig, tokenizer: Any, out_dir: Path) -> dict[str, Any]:
    """Tokenise and pack `source` into `out_dir/sequences.arrow`; return counts."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the teacher tokenizer has no EOS token, which separates packed documents")
    counts = {"documents": 0, "tokens": 0}

    def texts() -> Iterator[str]:
        for record in tqdm(source.records(), desc="tokenising", unit=" doc"):
            text = record.text(data.text_field, "data.text_field")
            if text.strip():
                counts["documents"] += 1
                yield text

    def counted(documents: Iterable[list[int]]) -> Iterator[list[int]]:
        for tokens in documents:
            counts["tokens"] += len(tokens) + 1  # + EOS
            yield tokens

    with TableWriter(out_dir / f"{TABLE}.arrow", ["input_ids"], data.seq_len) as table:
        for window in pack(counted(tokenize_documents(texts(), tokenizer)), eos, data.seq_len):
            table.write({"input_ids": window})
    if counts["documents"] == 0:
        raise DataError(f"data.source {data.source!r}: no non-empty {data.text_field!r} texts")
    if table.rows == 0:
        raise DataError(
            f"data.source {data.source!r}: {counts['tokens']} tokens from {counts['documents']} "
            f"documents do not fill one sequence of data.seq_len={data.seq_len}; add text or lower "
            f"data.seq_len"
        )
    return {
        "sequences": table.rows,
        "tokens": table.rows * data.seq_len,
        "documents": counts["documents"],
        "dropped_tail_tokens": counts["tokens"] - table.rows * data.seq_len,
    }


def datasets_from_tables(
    tables: dict[str, datasets.Dataset], data: DataConfig
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Train and eval datasets (the last `eval_examples` windows) yielding training examples."""
    sequences = tables[TABLE].with_transform(_as_example)
    total, held = len(sequences), data.eval_examples
    if held >= total:
        raise DataError(
            f"data.source {data.source!r} packs into {total} sequences of data.seq_len="
            f"{data.seq_len} tokens, and data.eval_examples={held} would leave none for training; "
            f"lower data.eval_examples or add text"
        )
    train = sequences.select(range(total - held))
    return train, (sequences.select(range(total - held, total)) if held else None)


def _as_example(batch: dict[str, list]) -> dict[str, torch.Tensor]:
    """A stored batch of windows -> int64 input_ids, labels (= input_ids), attention_mask (ones)."""
    input_ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "attention_mask": torch.ones_like(input_ids),
    }
