"""A fingerprinted, atomic, self-checking on-disk store of token tables.

A cache entry is a folder `<cache_dir>/<name>-<fingerprint>/` holding one Arrow file per table
(`train.arrow`, ...) and `manifest.json`. The fingerprint hashes everything the tables depend on
(source files by path, size and mtime; the tokenizer; the settings), so a changed input gets a new
entry and an unchanged one is reused by later runs and by every rank of a job.

- Complete or absent: an entry is built in a temporary sibling folder and renamed into place when
  its manifest is written, so a killed build never looks complete (its leftovers are removed by the
  next build).
- Built once: builders hold an exclusive lock on `<entry>.lock` (tail_kd/locks.py); the other
  processes wait, then find the entry done. No rank needs to know it is rank 0, and no process
  group is needed (waiting on the lock is no collective with a watchdog).
- Checked on load: the manifest records each file's size and a BLAKE2 checksum of its first and
  last MiB (the whole file when smaller). That costs milliseconds for any size and catches
  truncated, missing and overwritten files, but it is not a full scrub of the middle of big files.
  A damaged entry is deleted and rebuilt, with a warning.

Tables are Arrow IPC stream files of fixed-length int32 rows, read back memory-mapped with
`datasets.Dataset.from_file`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from tail_kd.locks import exclusive_lock, in_progress_name

__all__ = [
    "CacheEntry",
    "TableWriter",
    "fingerprint",
    "tokenizer_fingerprint",
    "load_or_build",
    "is_complete",
    "file_digest",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the layout or the meaning of a table changes
_SAMPLE_BYTES = 1 << 20


@dataclass(frozen=True)
class CacheEntry:
    """A loaded cache entry: its folder, its tables and the summary its build returned."""

    path: Path
    tables: dict[str, datasets.Dataset]
    summary: dict[str, Any]


def fingerprint(key: Mapping[str, Any]) -> str:
    """A short stable hash of JSON data."""
    text = json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's output.

    That is its full definition (fast tokenizers) or vocabulary, its special tokens and its chat
    template; the folder it was loaded from does not matter.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    extras = json.dumps(
        {"special": tokenizer.special_tokens_map, "chat_template": tokenizer.chat_template},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256((definition + extras).encode()).hexdigest()[:16]


class TableWriter:
    """Writes rows of fixed-length integer columns to an Arrow stream file, a batch at a time.

    >>> with TableWriter(path, ["input_ids"], length=4) as table:
    ...     table.write({"input_ids": [1, 2, 3, 4]})
    """

    def __init__(self, path: Path, columns: Sequence[str], length: int, batch_rows: int = 1024):
        self.length = length
        self.rows = 0
        self._batch_rows = batch_rows
        self._pending: dict[str, list[int]] = {name: [] for name in columns}
        self._schema = pa.schema([(name, pa.list_(pa.int32(), length)) for name in columns])
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self._schema)

    def write(self, row: Mapping[str, Sequence[int]]) -> None:
        for name, values in self._pending.items():
            if len(row[name]) != self.length:
                raise ValueError(
                    f"column {name}: expected {self.length} values, got {len(row[name])}"
                )
            values.extend(row[name])
        self.rows += 1
        if self.rows % self._batch_rows == 0:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _flush(self) -> None:
        if not next(iter(self._pending.values())):
            return
        arrays = [
            pa.FixedSizeListArray.from_arrays(pa.array(values, pa.int32()), self.length)
            for values in self._pending.values()
        ]
        self._writer.write_batch(pa.record_batch(arrays, schema=self._schema))
        for values in self._pending.values():
            values.clear()


def load_or_build(
    entry: Path, key: Mapping[str, Any], build: Callable[[Path], dict[str, Any]]
) -> CacheEntry:
    """Load the cache entry folder `entry`, building it first if it is absent or damaged.

    `build(folder)` writes the tables as `<table>.arrow` files into an empty folder and returns a
    JSON summary (counts, for people); `key` (what the fingerprint was made of) is stored with it.
    """
    entry = Path(entry)
    problem = _check(entry)
    if problem is None:
        return _load(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(entry.with_name(entry.name + ".lock"), f"data cache {entry}"):
        problem = _check(entry)  # another process may have built it while we waited
        if problem is None:
            return _load(entry)
        if entry.exists():
            logger.warning("data cache %s is damaged (%s); rebuilding it", entry, problem)
            shutil.rmtree(entry)
        for stale in entry.parent.glob(f".{entry.name}.tmp-*"):  # left by killed builds
            shutil.rmtree(stale, ignore_errors=True)
        tmp = in_progress_name(entry, prefix=".")
        tmp.mkdir()
        try:
            logger.info("building data cache %s", entry)
            summary = build(tmp)
            files = {p.name: file_digest(p) for p in sorted(tmp.iterdir())}
            manifest = {
                "format": FORMAT_VERSION,
                "key": dict(key),
                "summary": summary,
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(entry)


def is_complete(entry: Path) -> bool:
    """Whether the cache entry folder `entry` is built and undamaged."""
    return _check(entry) is None


def _check(entry: Path) -> str | None:
    """Why the entry cannot be used (absent, incomplete, damaged), or None if it can."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        version, files = manifest["format"], dict(manifest["files"])
    except FileNotFoundError:
        return "no manifest" if entry.exists() else "absent"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest: {error!r}"
    if version != FORMAT_VERSION:
        return f"format {version}, expected {FORMAT_VERSION}"
    for name, expected in files.items():
        try:
            actual = file_digest(entry / name)
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != expected:
            return f"{name} does not match its manifest (size or checksum)"
    return None


def _load(entry: Path) -> CacheEntry:
    manifest = json.loads((entry / MANIFEST).read_text())
    tables = {
        Path(name).stem: datasets.Dataset.from_file(str(entry / name))
        for name in manifest["files"]
        if name.endswith(".arrow")
    }
    return CacheEntry(entry, tables, manifest["summary"])


def file_digest(path: Path) -> dict[str, Any]:
    """Size and a checksum of the first and last MiB of `path` (all of it when smaller)."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as file:
        digest.update(file.read(_SAMPLE_BYTES))
        if size > _SAMPLE_BYTES:
            file.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
            digest.update(file.read())
    return {"size": size, "sample_blake2b": digest.hexdigest()}
