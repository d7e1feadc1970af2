"""Atomic, resumable checkpoints of the student (DeepSpeed state + trainer state).

Layout of a run directory:

    RUN_DIR/checkpoints/step-0000050/       a published checkpoint
        deepspeed/                          engine.save_checkpoint(tag="deepspeed"): ZeRO-3
                                            shards, optimizer and LR-scheduler state
        latest, zero_to_fp32.py             written by DeepSpeed beside the tag
        trainer_state.json                  step, world size, recipe, TensorBoard run (rank 0)
        rank_state/rank-00000.json          each rank's data-loader position and RNG states
        COMPLETE                            written last: the checkpoint is whole
    RUN_DIR/checkpoints/tmp-step-0000100/   a checkpoint being written (ignored by readers)

Writing: every rank writes into `tmp-step-N`, flushes the files it wrote (`written_by`) to disk,
and meets the others at a barrier; then rank 0 renames the folder to `step-N`, writes `COMPLETE`
(fsync'd), and only after that deletes checkpoints beyond the `keep` newest. A reader trusts only
folders with `COMPLETE`, so a run killed at any moment (even with `kill -9` in the middle of a
write) leaves the previous checkpoint as the newest complete one. The teacher is frozen and never
saved: a resumed run reloads it from its source.

Write errors (a full disk, a quota, an I/O error) raise `CheckpointWriteError`, which names the
folder, the free space there and the fix; the unfinished folder is removed and the previous
checkpoints are untouched. An error in our own files (trainer and rank state, publishing) is agreed
on by all ranks, which all raise. An error inside DeepSpeed's `save_checkpoint` leaves its internal
collectives out of step between ranks: the ranks that hit it raise, and the others fail at their
next collective (see `tail_kd.distributed`, collective timeout).

The output directory must be visible to all ranks under the same path (a shared filesystem on a
multi-node job).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tail_kd.distributed import DistContext
from tail_kd.exit_status import UsageError
from tail_kd.run_dir import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    RANK_STATE_DIR,
    TRAINER_STATE,
    UNFINISHED_DIR,
    Checkpoint,
    complete_checkpoints,
    fsync,
    step_dir_name,
)

__all__ = [
    "CheckpointWriteError",
    "CheckpointManager",
    "capture_rng",
    "restore_rng",
    "written_by",
    "DEEPSPEED_TAG",
]

DEEPSPEED_TAG = "deepspeed"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message says where, why and what to do."""

    def __init__(self, folder: Path, error: BaseException, previous: Checkpoint | None):
        root = folder.parent
        try:
            free_bytes = shutil.disk_usage(root).free
            free = f"{free_bytes / 2**20:,.0f} MiB free there"
            needed = _size(previous.path) if previous is not None else 2**20
            if getattr(error, "errno", None) == errno.ENOSPC or free_bytes < needed:
                free += f", less than a checkpoint needs ({needed / 2**20:,.1f} MiB): disk full"
        except OSError:
            free = "free space unknown"
        cause = f"{type(error).__name__}: {error}"
        kept = (
            f"the newest complete checkpoint, {previous.path}, is intact"
            if previous is not None
            else "there is no earlier complete checkpoint"
        )
        super().__init__(
            f"could not write checkpoint {folder} ({cause}; {free}); {kept}. Free space on that "
            f"filesystem (or lower checkpoint.keep, or move the run to another --output-dir), "
            f"then rerun with --resume"
        )
        self.folder = folder


class CheckpointManager:
    """Saves, publishes, prunes and loads a run's checkpoints; call its methods on every rank."""

    def __init__(self, run_dir: str | os.PathLike, ctx: DistContext, keep: int):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.ctx = ctx
        self.keep = keep

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None: rank 0's answer, on every rank."""
        checkpoints = complete_checkpoints(self.root.parent)
        return self.ctx.broadcast(checkpoints[-1] if checkpoints else None)

    def save(
        self, engine, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any]
    ) -> Checkpoint:
        """Write the student engine and trainer state of `step`, publish it, prune old ones.

        Args:
            engine: the student's DeepSpeed engine.
            trainer_state: run-level state, written by rank 0 (must be JSON-serialisable).
            rank_state: this rank's state (data position, RNG), written by every rank.
        """
        final = self.root / step_dir_name(step)
        tmp = self.root / f"tmp-{final.name}"
        failure: BaseException | None = None
        if self.ctx.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted attempt
                (tmp / RANK_STATE_DIR).mkdir(parents=True)
            except OSError as error:
                failure = error
        self._agree_or_raise(failure, tmp)  # also the barrier before the engine writes

        try:
            engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG)
        except Exception as error:
            # torch.save reports a full disk as a RuntimeError; either way DeepSpeed's own
            # collectives are now out of step with the other ranks: raise without meeting them.
            self._abandon(tmp)
            raise CheckpointWriteError(tmp, error, self._newest()) from error
        try:
            if self.ctx.is_main:
                _write_json(tmp / TRAINER_STATE, {**trainer_state, "step": step})
            _write_json(tmp / RANK_STATE_DIR / f"rank-{self.ctx.rank:05d}.json", rank_state)
            for path in written_by(tmp, self.ctx.rank):
                fsync(path)
        except OSError as error:
            failure = error
        self._agree_or_raise(failure, tmp)

        if self.ctx.is_main:
            try:
                # A folder of this step without COMPLETE is an interrupted attempt's: replace it.
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                fsync(self.root)
                _write_json(final / COMPLETE_MARKER, {"step": step})
                fsync(final)
            except OSError as error:
                failure = error
                shutil.rmtree(final, ignore_errors=True)  # never leave a half-marked folder
        self._agree_or_raise(failure, final)
        if self.ctx.is_main:
            try:
                self._prune()
            except OSError as error:  # the new checkpoint is complete; old ones stay behind
                print(f"warning: could not delete old checkpoints: {error}", file=sys.stderr)
        self.ctx.barrier()
        return Checkpoint(step, final)

    def _agree_or_raise(self, failure: BaseException | None, folder: Path) -> None:
        """A barrier that also tells every rank whether any rank failed; if one did, all raise."""
        failed = self.ctx.any(failure is not None) if self.ctx.world_size > 1 else bool(failure)
        if not failed:
            return
        self._abandon(folder)
        if failure is None:
            failure = RuntimeError("another rank failed to write its part (see its error)")
        raise CheckpointWriteError(folder, failure, self._newest()) from failure

    def _abandon(self, folder: Path) -> None:
        """Remove an unfinished checkpoint folder (rank 0), freeing its space."""
        if self.ctx.is_main:
            shutil.rmtree(folder, ignore_errors=True)

    def _newest(self) -> Checkpoint | None:
        checkpoints = complete_checkpoints(self.root.parent)
        return checkpoints[-1] if checkpoints else None

    def load(self, engine, checkpoint: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load `checkpoint` into the student engine; return (trainer_state, this rank's state)."""
        trainer_state = checkpoint.trainer_state
        saved_world = trainer_state["world_size"]
        if saved_world != self.ctx.world_size:
            raise UsageError(
                f"{checkpoint.path} was written by {saved_world} ranks but this job has "
                f"{self.ctx.world_size}: resume with {saved_world} ranks (ZeRO-3 shards are "
                "per rank)"
            )
        load_path, _ = engine.load_checkpoint(str(checkpoint.path), tag=DEEPSPEED_TAG)
        if load_path is None:
            raise UsageError(
                f"DeepSpeed could not load {checkpoint.path / DEEPSPEED_TAG}: the checkpoint is "
                "damaged; delete it to resume from the one before, or start over with --overwrite"
            )
        return trainer_state, checkpoint.rank_state(self.ctx.rank)

    def _prune(self) -> None:
        """Delete complete checkpoints beyond the `keep` newest, and stale unpublished folders."""
        checkpoints = complete_checkpoints(self.root.parent)
        for old in checkpoints[: -self.keep]:
            shutil.rmtree(old.path)
        newest = checkpoints[-1].step
        for entry in self.root.iterdir():
            match = UNFINISHED_DIR.fullmatch(entry.name)
            if match and int(match.group(1)) < newest and not (entry / COMPLETE_MARKER).is_file():
                shutil.rmtree(entry)


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states, as JSON-serialisable values."""
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode_bytes(state["torch"]))
    if "cuda" in state:
        torch.cuda.set_rng_state_all([_decode_bytes(s) for s in state["cuda"]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _encode_bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _write_json(path: Path, obj: Any) -> None:
    """In place, not through a temporary file (the folder is published whole by its rename):
    another rank listing the folder (`written_by`) must never meet a file about to be renamed."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# The rank in the name of a file one rank writes: DeepSpeed's ZeRO files
# (zero_pp_rank_<r>_mp_rank_00_*.pt) and our rank state (rank-<r>.json).
_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|^rank-)(\d+)")


def written_by(root: Path, rank: int) -> list[Path]:
    """The files under `root` that `rank` wrote: those naming it (ZeRO's data-parallel rank is
    the global one: the student engine's group is the whole world), and for rank 0 those naming
    no rank (DeepSpeed's `latest` and scripts, the trainer state). Each rank flushes only its
    own: on a shared filesystem an fsync from another node does not flush the writer's cache,
    and 32 ranks each flushing every file is 32 times the work."""
    owned = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            match = _RANK_IN_NAME.search(name)
            if (int(match.group(1)) if match else 0) == rank:
                owned.append(Path(dirpath) / name)
    return owned


def _size(root: Path) -> int:
    """Bytes in the files under `root`."""
    return sum(
        os.path.getsize(os.path.join(dirpath, name))
        for dirpath, _, names in os.walk(root)
        for name in names
    )
