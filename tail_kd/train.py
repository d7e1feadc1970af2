"""`python -m tail_kd.train RECIPE.yaml [options]`: one distillation run, under any launcher.

    python -m tail_kd.train recipes/tiny/tad.yaml --set device=cpu          # one process
    deepspeed --num_gpus 2 --module tail_kd.train recipes/tiny/tad.yaml      # N local ranks
    torchrun --nproc-per-node 2 -m tail_kd.train recipes/tiny/tad.yaml
    srun python -m tail_kd.train recipes/tiny/tad.yaml                       # ranks from SLURM_*

This module is the entry point: it parses the command line into `TrainOptions`, checks the
recipe, the batch split, the output directory and the data paths, fills the caches (`tail-kd prepare-data`'s work,
a no-op when it was done ahead) before the process group is joined, then has
`tail_kd.run_setup.set_up_run` build the run and `Trainer.train` run it, and maps what can go
wrong to the exit statuses of tail_kd/exit_status.py. A run with `--resume` continues from the
newest complete checkpoint of its output directory (or starts fresh when there is none, so a
requeued job can always pass it); a Slurm job that was requeued (SLURM_RESTART_COUNT > 0) resumes
as if given `--resume`, even if its command line says `--overwrite`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tail_kd.config import Recipe, RecipeError, add_override_argument, load_recipe
from tail_kd.data.sources import DataError, open_source
from tail_kd.exit_status import (
    EXIT_CHECKPOINT_WRITE,
    EXIT_RANK_LOST,
    EXIT_USAGE,
    UsageError,
)
from tail_kd.run_dir import check_output_dir, complete_checkpoints
from tail_kd.signals import StopFlag
from tail_kd.topology import discover_topology

# Only what checks the command line, the recipe and its paths is imported above (the standard
# library and PyYAML), so that a mistake is reported in a fraction of a second; torch, DeepSpeed,
# transformers and datasets are imported once those checks passed. tail_kd.run_setup imports
# DeepSpeed, which fixes its accelerator (cpu or cuda) at import time: it is imported only after
# init_distributed has chosen the device.

__all__ = ["TrainOptions", "build_parser", "parse_options", "load_options_recipe", "run", "main"]


@dataclass(frozen=True)
class TrainOptions:
    """The command line of a training run."""

    recipe: str
    overrides: tuple[str, ...] = ()
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    stop_after_steps: int | None = None
    reference_loss: bool = False
    local_rank: int | None = None  # the deepspeed launcher's --local_rank

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> TrainOptions:
        """From `build_parser()`'s parse (extra attributes, such as `tail-kd train --nproc`, are
        left out)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"overrides"}
        values = {name: value for name, value in vars(args).items() if name in names}
        return cls(**values, overrides=tuple(args.overrides))


def build_parser(prog: str = "python -m tail_kd.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Distil a teacher LM into a student with DeepSpeed ZeRO-3."
    )
    parser.add_argument(
        "recipe", help="recipe YAML file (see docs/ARCHITECTURE.md, 'Recipe schema')"
    )
    add_override_argument(parser)
    parser.add_argument(
        "--output-dir", help="where checkpoints, TensorBoard events and DONE go (recipe output_dir)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in the output dir (fresh start if none)",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the output dir's checkpoints, DONE marker and TensorBoard run, then start",
    )
    parser.add_argument(
        "--stop-after-steps",
        type=int,
        metavar="N",
        help="stop cleanly after optimizer step N, with a checkpoint (as a preemption would)",
    )
    parser.add_argument(
        "--reference-loss",
        action="store_true",
        help="compute the loss from full logits with the dense reference functions "
        "(slow; for checking the fused loss)",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    return parser


def parse_options(argv: Sequence[str] | None = None) -> TrainOptions:
    """`TrainOptions` from a command line."""
    return TrainOptions.from_namespace(build_parser().parse_args(argv))


def load_options_recipe(options: TrainOptions) -> Recipe:
    """The recipe named on the command line, with its --set and --output-dir overrides."""
    overrides = list(options.overrides)
    if options.output_dir is not None:  # as JSON, which YAML reads as a string whatever the path
        overrides.append(f"output_dir={json.dumps(options.output_dir)}")
    return load_recipe(options.recipe, overrides)


# Errors in what the user gave (recipe, paths, data, models): a message, no traceback.
_INPUT_ERRORS = (UsageError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_options(argv))


def run(options: TrainOptions) -> int:
    """Train as `options` say; return the exit status."""
    stop_flag = StopFlag()  # first, so that a signal during start-up is not fatal
    # DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, with a warning on every call.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    rank = int(os.environ.get("RANK", 0))
    try:
        topology = discover_topology(local_rank=options.local_rank)
        rank = topology.rank
        options = _requeued(options, rank)
        recipe = load_options_recipe(options)
        recipe.check_world_size(topology.world_size)
        if options.stop_after_steps is not None and options.stop_after_steps < 1:
            raise RecipeError(f"--stop-after-steps must be >= 1, got {options.stop_after_steps}")
        check_output_dir(
            Path(recipe.output_dir), resume=options.resume, overwrite=options.overwrite
        )
        open_source(recipe.data, recipe.seed)  # a missing data file: say so before any import
        from tail_kd.distributed import init_distributed, resolve_device

        resolve_device(recipe.device)  # a cuda recipe on a machine without GPU: say so first
        _compile_cache_in(Path(recipe.cache_dir))  # before anything imports torch._inductor
        _fill_caches(recipe)
        ctx = init_distributed(recipe.device, topology)
    except UsageError as error:
        return _input_error(error, rank)
    from tail_kd.checkpoint import CheckpointWriteError
    from tail_kd.distributed import collective_failure
    from tail_kd.run_setup import set_up_run

    try:
        trainer = set_up_run(recipe, options, ctx, stop_flag)
        return 0 if trainer is None else trainer.train()
    except _INPUT_ERRORS as error:
        return _input_error(error, rank)
    except CheckpointWriteError as error:
        print(f"error on rank {rank}: {error}", file=sys.stderr)
        # With several ranks DeepSpeed's collectives may be out of step: do not wait at exit.
        if topology.world_size > 1:
            return _exit_now(EXIT_CHECKPOINT_WRITE)
        return EXIT_CHECKPOINT_WRITE
    except Exception as error:
        if not collective_failure(error):
            raise
        print(_rank_lost_message(error, rank, Path(recipe.output_dir)), file=sys.stderr)
        # The process group is broken: tearing it down at exit can hang or abort.
        return _exit_now(EXIT_RANK_LOST)


def _fill_caches(recipe: Recipe) -> None:
    """Everything `tail-kd prepare-data` would fetch or build, before the process group exists:
    the first rank to need a cache entry builds it under a file lock while the others wait on the
    lock, in no collective that a watchdog could time out; and outside a process group,
    transformers saves whole model folders whatever the rank (inside one, only rank 0's). What a
    job cannot build (the teacher states of `teacher.cached_states`) is refused when missing."""
    from tail_kd.prepare import prepare

    for item in prepare(recipe, check=False):
        if not item.ready:  # what a job cannot build: the teacher states of cached_states
            raise RecipeError("; ".join((item.what, *item.details)))


def _compile_cache_in(cache_dir: Path) -> None:
    """torch.compile's caches (Inductor's compiled graphs, and Triton's kernels inside them) in
    <cache_dir>/torch_compile unless TORCHINDUCTOR_CACHE_DIR says otherwise: on the shared cache
    filesystem, not in the node-local /tmp that a requeued job on another node would not find
    (it would compile every chunk again). Inductor writes its entries atomically, so the ranks and
    jobs of a recipe share them."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "torch_compile"))


def _requeued(options: TrainOptions, rank: int) -> TrainOptions:
    """A requeued Slurm job (SLURM_RESTART_COUNT > 0) continues from its newest checkpoint; the
    --overwrite of its first run must not delete the checkpoints it continues from."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts == 0:
        return options
    if rank == 0:
        print(f"requeued Slurm job (restart {restarts}): resuming", flush=True)
    return dataclasses.replace(options, resume=True, overwrite=False)


def _rank_lost_message(error: BaseException, rank: int, run_dir: Path) -> str:
    """What a rank says when a collective failed: who, where, why, what now."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "tail_kd" in f.filename]
    where = " in " + " > ".join(
        f"{f.name} ({Path(f.filename).name}:{f.lineno})" for f in frames[-2:]
    )
    from tail_kd.distributed import collective_timeout

    checkpoints = complete_checkpoints(run_dir)
    newest = f"step {checkpoints[-1].step}" if checkpoints else "none"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    seconds = collective_timeout().total_seconds()
    return (
        f"error on rank {rank}: a collective operation failed{where if frames else ''}: "
        f"{first_line}\n"
        f"Another rank has died, hangs or cannot be reached: look for the first error in the other "
        f"ranks' logs. Collectives give up after {seconds:g} s (TAIL_KD_COLLECTIVE_TIMEOUT seconds "
        f"or DEEPSPEED_TIMEOUT minutes). Newest complete checkpoint: {newest}; rerun with --resume."
    )


def _exit_now(status: int) -> int:
    """Leave at once with `status` (no interpreter teardown, which waits on a broken group)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _input_error(error: Exception, rank: int) -> int:
    """Print `error: ...` (errors in the recipe or the data, the same on every rank, on rank 0
    only); return 2."""
    if rank == 0:
        print(f"error: {error}", file=sys.stderr)
    elif not isinstance(error, (RecipeError, DataError)):
        print(f"error on rank {rank}: {error}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
