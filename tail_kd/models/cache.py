"""Build a folder once, atomically, even with several processes racing for it.

Converted GGUF teachers and the tiny test models are expensive to make and are shared by every
rank of a job. `build_once` gives them three guarantees:

- a folder at the target path is always complete: it is built under a temporary sibling name and
  renamed into place only when the build returned;
- only one process builds it: the others wait on a file lock (tail_kd/locks.py) and then find it
  done;
- a build that was killed half-way leaves only a temporary folder, which the next build removes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from tail_kd.locks import exclusive_lock, in_progress_name


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
    with exclusive_lock(target.with_name(target.name + ".lock"), str(target)):
        if target.is_dir():  # another process built it while we waited for the lock
            return target
        _remove_stale_builds(target)
        tmp = in_progress_name(target)
        tmp.mkdir()
        try:
            build(tmp)
            apply_umask(tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def apply_umask(folder: Path) -> None:
    """Give the files under `folder` the permissions the process's umask allows (0644 under the
    usual 022). Some writers (safetensors files saved by transformers) create theirs 0600, which
    would keep colleagues on a shared cluster from reading a shared cache or an exported model."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_stale_builds(target: Path) -> None:
    """Delete temporary folders left by killed builds of `target` (safe: we hold its lock)."""
    for stale in target.parent.glob(target.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
