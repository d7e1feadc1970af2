"""A recipe's datasets: loaded from the cache, or tokenised into it first.

`prepare_datasets` opens the recipe's source, fingerprints what the tables depend on (the source,
the tokenizer, the kind's settings) and loads the cache entry of that fingerprint, building it
once if it is missing; `cached_entry` names that entry without building it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from tail_kd.config import DataConfig
from tail_kd.data import pretrain, sft
from tail_kd.data.cache import fingerprint, load_or_build, tokenizer_fingerprint
from tail_kd.data.sources import open_source

__all__ = ["PreparedData", "build_datasets", "prepare_datasets", "cached_entry"]

# Each kind's module: cache_key(data) -> dict, build(source, data, tokenizer, out_dir) -> summary,
# datasets_from_tables(tables, data) -> (train, eval).
_BUILDERS = {"pretrain": pretrain, "sft": sft}


@dataclass(frozen=True)
class PreparedData:
    """The datasets of a recipe, the cache folder they live in and what its build counted."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    cache_path: Path
    summary: dict[str, Any]


def prepare_datasets(
    data: DataConfig, tokenizer: Any, cache_dir: str | Path, seed: int
) -> PreparedData:
    """Load the datasets of `data` from `cache_dir`, tokenising and caching them first if needed."""
    builder = _BUILDERS[data.kind]
    source = open_source(data, seed)
    key = _cache_key(data, source, tokenizer)
    entry = load_or_build(
        Path(cache_dir) / f"{data.kind}-{fingerprint(key)}",
        key,
        lambda out_dir: builder.build(source, data, tokenizer, out_dir),
    )
    train, held = builder.datasets_from_tables(entry.tables, data)
    return PreparedData(train, held, entry.path, entry.summary)


def cached_entry(data: DataConfig, tokenizer: Any, cache_dir: str | Path, seed: int) -> Path:
    """The cache folder `prepare_datasets` loads `data` from (built or not: `is_complete`)."""
    key = _cache_key(data, open_source(data, seed), tokenizer)
    return Path(cache_dir) / f"{data.kind}-{fingerprint(key)}"


def _cache_key(data: DataConfig, source: Any, tokenizer: Any) -> dict[str, Any]:
    """What the tokenised tables depend on: the source, the tokenizer, the kind's settings."""
    return {
        "kind": data.kind,
        "source": source.fingerprint(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **_BUILDERS[data.kind].cache_key(data),
    }


def build_datasets(
    data: DataConfig, tokenizer: Any, cache_dir: str | Path, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The train and eval datasets of `data` (eval is None when `data.eval_examples` is 0)."""
    prepared = prepare_datasets(data, tokenizer, cache_dir, seed)
    return prepared.train, prepared.eval
