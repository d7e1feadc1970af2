"""Work that several processes may start at once (the ranks of a job, jobs of a sweep, nodes on a
shared filesystem), done by one of them: an exclusive lock, and names for work in progress.

The lock is `fcntl.flock` on a file beside the target. Waiting on it is not a collective, so a rank
that waits while another builds a large cache is not caught by the process group's watchdog. On a
shared filesystem the lock must reach across nodes (NFSv4, GPFS, BeeGFS; Lustre mounted with
`-o flock`); where it does not, build caches ahead with `tail-kd prepare-data`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["exclusive_lock", "in_progress_name"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if needed) while the block runs; say so
    when another process holds it first (`what` is being built)."""
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for another process to finish building %s", what)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def in_progress_name(target: Path, prefix: str = "") -> Path:
    """A sibling of `target` for this process's unfinished work, unique across the hosts that
    share the filesystem (process ids alone repeat from node to node)."""
    return target.with_name(f"{prefix}{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
