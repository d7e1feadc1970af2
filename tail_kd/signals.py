"""Stopping a run from outside: SIGUSR1 (Slurm's warning before a time limit or preemption),
SIGTERM and SIGINT.

`StopFlag` is installed first thing at start-up, so that a signal during set-up is not fatal. On a
signal every rank finishes its current optimizer step; the ranks then agree (one all-reduce per
step, `Trainer`) to stop after that same step, write a checkpoint and exit with status 75.
Repeats of SIGUSR1/SIGTERM change nothing (Slurm may deliver one from several places); a second
SIGINT (Ctrl-C twice) kills the process at once.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

__all__ = ["StopFlag", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set by the first stop signal; `signal_name` says which (None: none yet)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None:
            return
        self.signal_name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(
            f"{self.signal_name} received: finishing this step, then checkpointing",
            file=sys.stderr,
            flush=True,
        )
