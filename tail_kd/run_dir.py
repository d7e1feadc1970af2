"""A run directory: its layout, its state, and `tail-kd status RUN_DIR [--json | --shell]`.

    RUN_DIR/
        DONE                        {"step": N, "finished": TIME}: the run reached its last step
        checkpoints/step-0000050/   a complete checkpoint (a COMPLETE file inside: checkpoint.py)
        checkpoints/tmp-step-*/     a checkpoint being written, or the debris of a killed write
        student/                    the student's config, tokenizer, generation config (export)
        tensorboard/<run_name>/     TensorBoard events (unless the recipe moves them)

This module is the one place that knows the layout: the trainer, `tail-kd export` / `eval`, the
study and the Slurm scripts (through `tail-kd status --shell`) all ask it. It imports only the
standard library, so `tail-kd status` answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tail_kd.config import RecipeError

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "DONE_MARKER",
    "STUDENT_DIR",
    "Checkpoint",
    "RunDirError",
    "RunStatus",
    "complete_checkpoints",
    "find_checkpoint",
    "is_run_dir",
    "read_done",
    "write_done",
    "write_json",
    "fsync",
    "check_output_dir",
    "clear_output_dir",
    "run_status",
    "main",
]

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
DONE_MARKER = "DONE"
STUDENT_DIR = "student"
TRAINER_STATE = "trainer_state.json"
RANK_STATE_DIR = "rank_state"
STEP_DIR = re.compile(r"step-(\d{7,})")
UNFINISHED_DIR = re.compile(r"(?:tmp-)?step-(\d{7,})")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


class RunDirError(RecipeError):
    """The output directory cannot be used as asked (another run's checkpoints, not writable)."""


# ---------------------------------------------------------------------------------------------
# Checkpoints and the DONE marker
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A published, complete checkpoint."""

    step: int
    path: Path

    @property
    def trainer_state(self) -> dict[str, Any]:
        """The run-level state rank 0 saved (step, world size, recipe, TensorBoard run)."""
        return json.loads((self.path / TRAINER_STATE).read_text())

    def rank_state(self, rank: int) -> dict[str, Any]:
        """What `rank` saved: its data-loader position and RNG states."""
        return json.loads((self.path / RANK_STATE_DIR / f"rank-{rank:05d}.json").read_text())


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run's output directory (it has the student's spec)."""
    return (Path(path) / STUDENT_DIR / "config.json").is_file()


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Checkpoint]:
    """The complete checkpoints of a run, oldest first (folders without COMPLETE are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.fullmatch(entry.name)
        if match and (entry / COMPLETE_MARKER).is_file():
            found.append(Checkpoint(int(match.group(1)), entry))
    return sorted(found, key=lambda c: c.step)


def find_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """The newest complete checkpoint of a run, or the one of `step`; FileNotFoundError if none."""
    checkpoints = complete_checkpoints(run_dir)
    if step is not None:
        checkpoints = [c for c in checkpoints if c.step == step]
    if not checkpoints:
        what = "complete checkpoint" if step is None else f"complete checkpoint of step {step}"
        available = ", ".join(str(c.step) for c in complete_checkpoints(run_dir)) or "none"
        raise FileNotFoundError(
            f"{Path(run_dir) / CHECKPOINTS_DIR} has no {what} (complete steps: {available})"
        )
    return checkpoints[-1]


def read_done(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The DONE marker of a finished run ({"step": ...}), or None."""
    path = Path(run_dir) / DONE_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def write_done(run_dir: str | os.PathLike, step: int) -> None:
    """Mark the run finished at `step` (flushed to disk)."""
    write_json(
        Path(run_dir) / DONE_MARKER, {"step": step, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    )


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON to `path` whole or not at all: into a temporary file beside it,
    flushed to disk, then renamed over it (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries (a rename, a new file), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Starting a run in a directory
# ---------------------------------------------------------------------------------------------


def check_output_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a directory holding another run unless resuming or overwriting; check writability."""
    status = run_status(run_dir)
    if status.state != "new" and not (resume or overwrite):
        raise RunDirError(
            f"output dir {run_dir} already holds a run (checkpoints or {DONE_MARKER}): pass "
            "--resume to continue it, --overwrite to start over, or choose another --output-dir"
        )
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RunDirError(
            f"output dir {run_dir} cannot be created: {existing} is not a directory; choose "
            "another --output-dir"
        )
    try:  # a real write, not os.access: root, read-only mounts, ACLs and network filesystems
        fd, probe = tempfile.mkstemp(prefix=".tail-kd-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise RunDirError(
            f"output dir {run_dir} is not writable: cannot create a file in {existing} "
            f"({error.strerror or error}); choose another --output-dir or make {existing} "
            "writable"
        ) from None


def clear_output_dir(run_dir: Path, tensorboard_run: Path) -> None:
    """--overwrite: remove a previous run's checkpoints, DONE marker and TensorBoard run."""
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    shutil.rmtree(tensorboard_run, ignore_errors=True)
    (run_dir / DONE_MARKER).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# State, and `tail-kd status`
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStatus:
    """What a run directory holds.

    state: "new" (nothing of a run: absent, or neither checkpoints nor DONE), "in progress"
    (checkpoint folders, complete or not, and no DONE: `--resume` continues from the newest
    complete one, or from the start) or "finished" (DONE).
    """

    run_dir: str
    state: str
    step: int  # the newest complete checkpoint's step (0 if none)
    total_steps: int | None  # train.steps of the recipe saved with that checkpoint
    done_step: int | None  # the step DONE records
    checkpoints: list[int] = field(default_factory=list)  # complete ones, oldest first
    unfinished: list[str] = field(default_factory=list)  # checkpoint folders without COMPLETE


def run_status(run_dir: str | os.PathLike) -> RunStatus:
    """The state of `run_dir` (see `RunStatus`); a missing directory is "new"."""
    run_dir = Path(run_dir)
    checkpoints = complete_checkpoints(run_dir)
    done = read_done(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    complete = {c.path.name for c in checkpoints}
    unfinished = sorted(
        entry.name
        for entry in (root.iterdir() if root.is_dir() else ())
        if UNFINISHED_DIR.fullmatch(entry.name) and entry.name not in complete
    )
    total = None
    try:  # the run's length, as the recipe saved with the newest checkpoint says
        total = checkpoints[-1].trainer_state["recipe"]["train"]["steps"]
    except (IndexError, OSError, ValueError, KeyError):
        pass
    if done is not None:
        state = "finished"
    else:
        state = "in progress" if checkpoints or unfinished else "new"
    return RunStatus(
        run_dir=str(run_dir),
        state=state,
        step=checkpoints[-1].step if checkpoints else 0,
        total_steps=total,
        done_step=None if done is None else done["step"],
        checkpoints=[c.step for c in checkpoints],
        unfinished=unfinished,
    )


def _shell_lines(status: RunStatus) -> list[str]:
    """`NAME=value` lines for `eval` in a shell: the run's state, its newest complete step (0 if
    none) and the same for people ("step 5", "none")."""
    newest = f"step {status.step}" if status.checkpoints else "none"
    values = {"TKD_RUN_STATE": status.state, "TKD_RUN_STEP": status.step, "TKD_RUN_NEWEST": newest}
    return [f"{name}={shlex.quote(str(value))}" for name, value in values.items()]


def _describe(status: RunStatus) -> str:
    total = f" of {status.total_steps}" if status.total_steps else ""
    lines = [f"{status.run_dir}: {status.state}"]
    if status.checkpoints:
        steps = ", ".join(map(str, status.checkpoints))
        lines.append(f"  newest complete checkpoint: step {status.step}{total} (complete: {steps})")
    else:
        lines.append("  no complete checkpoint")
    if status.done_step is not None:
        lines.append(f"  finished at step {status.done_step} (DONE)")
    if status.unfinished:
        lines.append(f"  unfinished checkpoint folders (ignored): {', '.join(status.unfinished)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tail-kd status",
        description="What a run directory holds: new, in progress (resumable) or finished; the "
        "newest complete checkpoint.",
    )
    parser.add_argument("run_dir", help="a training run's output directory")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the status as JSON")
    form.add_argument(
        "--shell",
        action="store_true",
        help="print TKD_RUN_STATE=..., TKD_RUN_STEP=... and TKD_RUN_NEWEST=... for a shell's eval",
    )
    args = parser.parse_args(argv)
    status = run_status(args.run_dir)
    if args.json:
        print(json.dumps(asdict(status), indent=1))
    elif args.shell:
        print("\n".join(_shell_lines(status)))
    else:
        print(_describe(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
