"""Data and scoring for the `tail_kd_gsm_symbolic*` lm-evaluation-harness tasks.

`load_problems` is the tasks' `custom_dataset`: lm_eval calls it with `--metadata` (and the task's
metadata, e.g. `version`) as keyword arguments. It writes the held-out problems (and a few
training problems for `--num_fewshot`) as JSON-lines files into a cache once, then loads them with
`datasets.load_dataset("json", ...)`. `process_results` scores one completion with
`tail_kd.eval.maths.is_correct`, the extraction and exact match of `tail-kd eval --gsm`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from tail_kd.config import default_cache_dir
from tail_kd.eval.maths import held_out_problems, is_correct

FEWSHOT_EXAMPLES = 8  # training problems offered for --num_fewshot


def cache_dir() -> Path:
    return Path(default_cache_dir()) / "lm_eval"


def _write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    """Write (question, solution) pairs to `path` atomically (concurrent runs may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for question, answer in pairs:
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    os.replace(tmp, path)


def problem_files(
    num_examples: int = 200, seed: int = 0, train_examples: int | None = 2000
) -> dict[str, str]:
    """The JSON-lines files of the held-out (`test`) and few-shot (`train`) problems, generated
    into the cache when missing."""
    from importlib.metadata import version

    from tail_kd.data.sources import GsmSymbolicSource

    tag = f"seed{seed}-rg{version('reasoning-gym')}"
    test = cache_dir() / f"gsm_symbolic-test-{tag}-n{num_examples}-x{train_examples or 0}.jsonl"
    train = cache_dir() / f"gsm_symbolic-train-{tag}-n{FEWSHOT_EXAMPLES}.jsonl"
    if not test.is_file():
        _write_jsonl(test, held_out_problems(num_examples, seed, train_examples))
    if not train.is_file():
        records = GsmSymbolicSource(size=FEWSHOT_EXAMPLES, seed=seed).records()
        _write_jsonl(train, [(r.fields["question"], r.fields["answer"]) for r in records])
    return {"test": str(test), "train": str(train)}


def load_problems(
    num_examples: int = 200, seed: int = 0, train_examples: int | None = 2000, **_: object
) -> datasets.DatasetDict:
    """`custom_dataset` of the tasks: {"test": held-out problems, "train": few-shot problems}."""
    files = problem_files(int(num_examples), int(seed), train_examples and int(train_examples))
    return datasets.load_dataset("json", data_files=files)


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """exact_match of the first completion (greedy, one repeat) against the reference solution."""
    return {"exact_match": int(is_correct(results[0], doc["answer"]))}
