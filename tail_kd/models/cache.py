"""Build a folder once, atomically, even with several processes racing for it.

Converted GGUF teachers and the tiny test models are expensive to make and are shared by every
rank of a job. `build_once` gives them three guarantees:

- a folder at the target path is always complete: it is built under a temporary sibling name and
  renamed into place only when the build returned;
- only one process builds it: the others wait on a file lock (`fcntl.flock`) and then find it done;
- a build that was killed half-way leaves only a temporary folder, which the next build removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


def build_once(target: str | Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, first building it with `build(tmp_dir)` and publishing it if it is absent.

    `build` receives a fresh, empty folder beside `target` and must fill it; when it returns, the
    folder is renamed to `target`. If `build` raises, the partial folder is removed and the error
    propagates. Existing targets are returned without taking the lock.
    """
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if target.is_dir():  # another process built it while we waited for the lock
            return target
        _remove_stale_builds(target)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        try:
            build(tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path` (created if needed) while the block runs."""
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale_builds(target: Path) -> None:
    """Delete temporary folders left by killed builds of `target` (safe: we hold its lock)."""
    for stale in target.parent.glob(target.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
