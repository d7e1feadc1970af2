"""`python -m tail_kd.train RECIPE.yaml [options]`: one distillation run, under any launcher.

    python -m tail_kd.train recipes/tiny/tad.yaml --set device=cpu          # one process
    deepspeed --num_gpus 2 --module tail_kd.train recipes/tiny/tad.yaml      # N local ranks
    torchrun --nproc-per-node 2 -m tail_kd.train recipes/tiny/tad.yaml
    srun python -m tail_kd.train recipes/tiny/tad.yaml                       # ranks from SLURM_*

Order of work: the recipe, the batch split and the output directory are checked first, then the
process group is joined; then, on every rank, the teacher is resolved (rank 0 converts a GGUF
file first, the others reuse it), the student built, the vocabularies checked, the data
tokenised (rank 0 first, into a shared cache) and the two DeepSpeed engines created. A run with
`--resume` continues from the newest complete checkpoint of its output directory (or starts
fresh when there is none, so a requeued job can always pass it).

Exit status:
    0   the run finished (`DONE` is written in the output directory), or stopped as asked by
        `--stop-after-steps` (with a checkpoint, without `DONE`)
    1   an error (traceback), or another rank's error (that rank reports it)
    2   the recipe, the command line, the output directory, the data or the models cannot be
        used (a message on stderr, no traceback)
    3   `train.max_skipped_steps` steps in a row had a non-finite loss or gradient: a checkpoint
        was written and the first bad tensor of each of these steps is named
    4   another rank died or hangs: a collective failed or timed out (`tail_kd.distributed`)
    74  a checkpoint could not be written (disk full, quota, I/O error); the previous ones are
        intact (74 is EX_IOERR)
    75  stopped by SIGUSR1, SIGTERM or SIGINT: the current step finished, a checkpoint was written;
        rerun with `--resume` to continue (75 is EX_TEMPFAIL, "try again later")

Non-finite values: a micro-batch whose loss is NaN or infinite gets NaN gradients, and DeepSpeed
skips an update whose global gradient norm is not finite (ZeRO-3 checks it in every precision)
and clears the gradients, leaving the weights, the optimizer state and the LR schedule as they
were. The skip is agreed by all ranks (the norm is global), counted (`train/skipped_steps` in
TensorBoard, DeepSpeed's own counter, kept in checkpoints) and explained on the console: the loss
(rank, micro-batch, terms) or, from the second skipped step in a row on, the parameters whose
gradients are not finite (checking them costs one pass over each rank's gradient shard, so it is
done only then). The batches of a skipped step are consumed; `--resume` after a stop continues
after them. `debug.nan_loss_steps` / `debug.nan_grad_steps` inject such steps to try it out.

On a signal every rank finishes its current optimizer step; the ranks then agree (one all-reduce
per step) to stop after that same step. A second SIGINT kills the process at once; repeated
SIGUSR1/SIGTERM are ignored. A Slurm job that was requeued (SLURM_RESTART_COUNT > 0) resumes
as if given `--resume`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

import datasets
import torch
from transformers.utils import logging as hf_logging

from tail_kd.checkpoint import (
    CHECKPOINTS_DIR,
    Checkpoint,
    CheckpointManager,
    CheckpointWriteError,
    capture_rng,
    complete_checkpoints,
    restore_rng,
)
from tail_kd.config import Recipe, RecipeError, add_override_argument, load_recipe
from tail_kd.data import DataError, DistillationLoader, build_datasets
from tail_kd.distributed import (
    DistContext,
    MainProcessFailed,
    collective_failure,
    collective_timeout,
    discover_topology,
    init_distributed,
)
from tail_kd.eval.metrics import TokenMetrics
from tail_kd.export import save_student_spec
from tail_kd.monitor import LOSS_SCALARS, Monitor
from tail_kd.pair import load_models, plan_models

# tail_kd.engines imports DeepSpeed, which fixes its accelerator (cpu or cuda) at import time: it is
# imported only after init_distributed has chosen the device.

__all__ = [
    "main",
    "run",
    "build_parser",
    "recipe_from_args",
    "EXIT_PREEMPTED",
    "EXIT_USAGE",
    "EXIT_DIVERGED",
    "EXIT_RANK_LOST",
    "EXIT_CHECKPOINT_WRITE",
    "DONE_MARKER",
]

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_RANK_LOST = 4
EXIT_CHECKPOINT_WRITE = 74
EXIT_PREEMPTED = 75
DONE_MARKER = "DONE"
_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class RunDirError(RecipeError):
    """The output directory cannot be used as asked (another run's checkpoints, not writable)."""


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


# Errors in what the user gave (recipe, paths, data, models): a message, no traceback.
_INPUT_ERRORS = (RecipeError, DataError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Train as `args` (from `build_parser`) say; return the exit status."""
    stop_flag = _StopFlag()  # first, so that a signal during start-up is not fatal
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        args.resume = True  # a requeued Slurm job continues from its newest checkpoint
    # DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, with a warning on every call.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    topology = discover_topology(local_rank=args.local_rank)
    try:
        recipe = recipe_from_args(args)
        recipe.check_world_size(topology.world_size)
        if args.stop_after_steps is not None and args.stop_after_steps < 1:
            raise RecipeError(f"--stop-after-steps must be >= 1, got {args.stop_after_steps}")
        check_output_dir(Path(recipe.output_dir), resume=args.resume, overwrite=args.overwrite)
    except RecipeError as error:
        return _input_error(error, topology.rank)
    ctx = init_distributed(recipe.device, topology)
    try:
        return Trainer(recipe, ctx, args, stop_flag).run()
    except _INPUT_ERRORS as error:
        return _input_error(error, topology.rank)
    except MainProcessFailed:
        return 1
    except CheckpointWriteError as error:
        print(f"error on rank {topology.rank}: {error}", file=sys.stderr)
        # With several ranks DeepSpeed's collectives may be out of step: do not wait at exit.
        if topology.world_size > 1:
            return _exit_now(EXIT_CHECKPOINT_WRITE)
        return EXIT_CHECKPOINT_WRITE
    except Exception as error:
        if not collective_failure(error):
            raise
        print(_rank_lost_message(error, topology.rank, Path(recipe.output_dir)), file=sys.stderr)
        # The process group is broken: tearing it down at exit can hang or abort.
        return _exit_now(EXIT_RANK_LOST)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe named on the command line, with its --set and --output-dir overrides."""
    overrides = list(args.overrides)
    if args.output_dir is not None:  # as JSON, which YAML reads as a string whatever the path
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    return load_recipe(args.recipe, overrides)


def _rank_lost_message(error: BaseException, rank: int, run_dir: Path) -> str:
    """What a rank says when a collective failed: who, where, why, what now."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "tail_kd" in f.filename]
    where = " in " + " > ".join(
        f"{f.name} ({Path(f.filename).name}:{f.lineno})" for f in frames[-2:]
    )
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
    """Print `error: ...` (recipe errors, the same on every rank, on rank 0 only); return 2."""
    if rank == 0:
        print(f"error: {error}", file=sys.stderr)
    elif not isinstance(error, RecipeError):
        print(f"error on rank {rank}: {error}", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------------------------
# The output directory
# ---------------------------------------------------------------------------------------------


def check_output_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a directory holding another run unless resuming or overwriting; check writability."""
    history = (run_dir / CHECKPOINTS_DIR).is_dir() and any((run_dir / CHECKPOINTS_DIR).iterdir())
    history = history or (run_dir / DONE_MARKER).exists()
    if history and not (resume or overwrite):
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


def read_done(run_dir: Path) -> dict[str, Any] | None:
    """The DONE marker of a finished run ({"step": ...}), or None."""
    path = Path(run_dir) / DONE_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def _write_done(run_dir: Path, step: int) -> None:
    with open(run_dir / DONE_MARKER, "w") as f:
        json.dump({"step": step, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGUSR1/SIGTERM/SIGINT: finish the step, checkpoint, exit 75.

    Repeats of SIGUSR1/SIGTERM change nothing (Slurm may deliver one from several places); a
    second SIGINT (Ctrl-C twice) kills the process at once.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in _STOP_SIGNALS:
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


class Trainer:
    """Everything one rank does in a run: set-up, the loop, evaluation, checkpoints."""

    def __init__(
        self, recipe: Recipe, ctx: DistContext, args: argparse.Namespace, stop_flag: "_StopFlag"
    ):
        self.recipe = recipe
        self.ctx = ctx
        self.args = args
        self.run_dir = Path(recipe.output_dir)
        self.tensorboard_run = Path(recipe.log.tensorboard_dir) / recipe.run_name
        self.stop_flag = stop_flag
        self.step = 0
        self.first_eval: dict[str, float] | None = None  # held-out numbers before training
        self.last_eval: dict[str, float] | None = None
        self.skipped: list[tuple[int, str]] = []  # (step, why) of the current run of skipped steps

    def run(self) -> int:
        """Set up, train to the end (or to a stop), and return the exit status."""
        from tail_kd.engines import Distiller, check_deepspeed_config, loss_function, model_dtype

        recipe, ctx = self.recipe, self.ctx
        check_deepspeed_config(recipe, ctx.world_size, ctx.device.type)  # bad `deepspeed:` keys
        _check_vocab_parallel(recipe, ctx, self.args.reference_loss)
        if not ctx.is_main:  # one set of progress bars per job
            hf_logging.disable_progress_bar()
            datasets.disable_progress_bars()
        done = read_done(self.run_dir)
        if self.args.resume and done is not None and done["step"] >= recipe.train.steps:
            if ctx.is_main:
                print(f"{self.run_dir} finished at step {done['step']}: nothing to resume")
            return 0
        if ctx.is_main:
            if self.args.overwrite:
                clear_output_dir(self.run_dir, self.tensorboard_run)
            (self.run_dir / DONE_MARKER).unlink(missing_ok=True)  # resuming a run with more steps
            self.run_dir.mkdir(parents=True, exist_ok=True)
        ctx.barrier()

        plan = plan_models(recipe, ctx)
        if ctx.is_main:  # what `tail-kd export` needs besides the weights
            save_student_spec(
                self.run_dir, plan.student_config, plan.student_tokenizer, plan.generation_config
            )
        with ctx.main_first():  # rank 0 tokenises into the shared cache; the others load it
            train_set, self.eval_set = build_datasets(
                recipe.data, plan.teacher_tokenizer, recipe.data.cache_dir, recipe.seed
            )
        self.loader = DistillationLoader(
            train_set, recipe.train.micro_batch_size, ctx.rank, ctx.world_size, recipe.seed
        )
        teacher, student = load_models(
            recipe, plan, model_dtype(recipe.teacher.dtype, ctx.device.type)
        )
        loss_fn = loss_function(
            recipe, plan.vocab_size, ctx.device.type, reference=self.args.reference_loss
        )
        self.distiller = Distiller(teacher, student, recipe, ctx, loss_fn, plan.vocab_size)
        self.vocab_size = plan.vocab_size
        self.accumulation = recipe.gradient_accumulation_steps(ctx.world_size)
        self.checkpoints = CheckpointManager(self.run_dir, ctx, recipe.checkpoint.keep)
        latest = self.checkpoints.latest() if self.args.resume else None
        if latest is not None:
            self._resume(latest)

        self.monitor = Monitor(ctx.is_main, self.tensorboard_run, recipe.train.steps, self.step)
        self.monitor.print(f"TensorBoard: tensorboard --logdir {recipe.log.tensorboard_dir}")
        try:
            return self._train()
        finally:
            self.monitor.close()

    def _resume(self, checkpoint: Checkpoint) -> None:
        trainer_state, rank_state = self.checkpoints.load(self.distiller.student, checkpoint)
        self.step = trainer_state["step"]
        self.first_eval = trainer_state["first_eval"]
        self.loader.load_state_dict(rank_state["loader"])
        restore_rng(rank_state["rng"])
        if self.ctx.is_main:
            changes = _differences(trainer_state["recipe"], self.recipe.to_dict())
            print(
                f"resumed from {checkpoint.path} (step {self.step})"
                + (f"; changed since: {', '.join(changes)}" if changes else "")
            )

    def _train(self) -> int:
        recipe, ctx = self.recipe, self.ctx
        total, stop_after = recipe.train.steps, self.args.stop_after_steps
        if self.step == 0 and self.eval_set is not None:
            self.first_eval = self._evaluate()
        while self.step < total:
            metrics, skipped = self._train_step()
            self.step += 1
            self.monitor.advance(self.step)
            if skipped is None:
                self.skipped = []
            else:
                self.skipped.append((self.step, skipped))
                self.monitor.print(
                    f"step {self.step}: update skipped ({len(self.skipped)} in a row, the run "
                    f"stops at train.max_skipped_steps={recipe.train.max_skipped_steps}): "
                    f"{skipped}"
                )
            if self.step % recipe.log.every == 0 or self.step == total or skipped is not None:
                self.monitor.log_train(self.step, metrics)
            at_eval = recipe.eval.every and self.step % recipe.eval.every == 0
            if self.eval_set is not None and (at_eval or self.step == total):
                self.last_eval = self._evaluate()
            signalled = ctx.any(self.stop_flag.signal_name is not None)
            stop_asked = stop_after is not None and self.step >= stop_after
            at_checkpoint = recipe.checkpoint.every and self.step % recipe.checkpoint.every == 0
            diverged = len(self.skipped) >= recipe.train.max_skipped_steps
            if at_checkpoint or self.step == total or signalled or stop_asked or diverged:
                self._save()
            if diverged:
                if ctx.is_main:
                    print(self._diverged_message(), file=sys.stderr, flush=True)
                return EXIT_DIVERGED
            if self.step < total and signalled:
                self.monitor.print(
                    f"stopped by a signal after step {self.step}; continue with --resume"
                )
                return EXIT_PREEMPTED
            if self.step < total and stop_asked:
                self.monitor.print(
                    f"stopped after step {self.step} (--stop-after-steps); continue with --resume"
                )
                return 0
        if ctx.is_main:
            _write_done(self.run_dir, self.step)
        ctx.barrier()
        if self.first_eval is not None and self.last_eval is not None:
            before, after = self.first_eval, self.last_eval
            self.monitor.print(
                f"held-out: ce {before['ce']:.4f} -> {after['ce']:.4f} | "
                f"kl_to_teacher {before['kl_to_teacher']:.4f} -> {after['kl_to_teacher']:.4f}"
            )
        return 0

    def _train_step(self) -> tuple[dict[str, float], str | None]:
        """One optimizer step: `accumulation` micro-batches forward + backward, then the update.

        Returns the step's metrics and, when the update was skipped for non-finite values, what
        was not finite (the same text on every rank; see the module docstring).

        The logged loss terms are means over micro-batches and ranks, the same weighting the
        gradient gets (DeepSpeed divides each micro-batch's gradient by the accumulation steps).
        """
        engine = self.distiller.student
        start = time.perf_counter()
        step = self.step + 1
        lr = engine.get_lr()[0]  # the scheduler moves on inside the last engine.step()
        inspect = bool(self.skipped)  # the previous update was skipped: name bad gradients now
        bad_parameters: list[str] = []
        rows = []
        with self._injected_faults(step):
            for micro in range(self.accumulation):
                batch = next(self.loader)
                out = self.distiller.forward(batch)
                loss = out["loss"]
                if step in self.recipe.debug.nan_loss_steps:
                    loss = loss * float("nan")
                # x 1 when finite (bit-identical); x NaN otherwise, so that the update is skipped
                # whatever gradients the loss produced (the fused loss makes them in its forward).
                finite = torch.isfinite(loss)
                nan = torch.full_like(loss, math.nan)
                self.distiller.backward(loss * torch.where(finite, torch.ones_like(loss), nan))
                if inspect and micro == self.accumulation - 1:
                    bad_parameters = self._nonfinite_gradients()
                engine.step()
                tokens = batch["attention_mask"].sum().to(loss.device, torch.float32)
                rows.append(
                    torch.stack(
                        [loss.detach().float()]
                        + [out[name].detach().float() for name in LOSS_SCALARS[1:]]
                        + [tokens]
                    )
                )
        per_micro_batch = torch.stack(rows)
        totals = self.ctx.sum(per_micro_batch.sum(0)).tolist()
        seconds = time.perf_counter() - start
        micro_batches = self.accumulation * self.ctx.world_size
        metrics = {name: value / micro_batches for name, value in zip(LOSS_SCALARS, totals)}
        metrics.update(
            lr=lr,
            grad_norm=float(engine.get_global_grad_norm()),
            tokens_per_sec=totals[-1] / seconds,
            skipped_steps=float(engine.skipped_steps),
        )
        if engine.was_step_applied():
            return metrics, None
        return metrics, self._why_skipped(per_micro_batch, bad_parameters, inspect)

    @contextlib.contextmanager
    def _injected_faults(self, step: int):
        """`debug.nan_grad_steps`: a NaN gradient for the student's last parameter at `step`."""
        handles = []
        if step in self.recipe.debug.nan_grad_steps:
            _, parameter = list(self.distiller.student.module.named_parameters())[-1]
            handles.append(parameter.register_hook(lambda grad: grad * math.nan))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _nonfinite_gradients(self) -> list[str]:
        """The student parameters whose gradient is not finite on some rank, in model order.

        Call between the last backward of a step and its `engine.step()`; a collective.
        """
        from deepspeed.utils import safe_get_local_grad

        named = list(self.distiller.student.module.named_parameters())
        local = []
        for name, parameter in named:
            if parameter.requires_grad:
                grad = safe_get_local_grad(parameter)
                if grad is not None and not bool(torch.isfinite(grad).all()):
                    local.append(name)
        bad = {name for names in self.ctx.all_gather(local) for name in names}
        return [name for name, _ in named if name in bad]

    def _why_skipped(
        self, per_micro_batch: torch.Tensor, bad_parameters: list[str], inspected: bool
    ) -> str:
        """What was not finite in a skipped step (a collective: every rank calls it)."""
        values = per_micro_batch.cpu()
        bad_rows = (~torch.isfinite(values[:, 0])).nonzero().flatten().tolist()
        local = None
        if bad_rows:
            row = values[bad_rows[0]]
            local = (bad_rows[0], row[0].item(), row[1].item(), row[2].item())
        reports = self.ctx.all_gather(local)
        for rank, report in enumerate(reports):
            if report is not None:
                micro, loss, ce, divergence = report
                return (
                    f"the loss is not finite (rank {rank}, micro-batch {micro + 1} of "
                    f"{self.accumulation}: loss {loss}, ce {ce}, divergence {divergence})"
                )
        if bad_parameters:
            more = len(bad_parameters) - 1
            others = f" (and {more} more parameter{'s' if more > 1 else ''})" if more else ""
            return f"the gradient of {bad_parameters[0]} is not finite{others}"
        if inspected:
            return "the global gradient norm is not finite"
        return (
            "the gradients are not finite (global norm not finite, loss finite); if the next "
            "step is skipped too, its bad parameters are named"
        )

    def _diverged_message(self) -> str:
        steps = "\n".join(f"  step {step}: {why}" for step, why in self.skipped)
        first_step = self.skipped[0][0]
        return (
            f"error: stopped after step {self.step}: the last {len(self.skipped)} updates were "
            f"skipped for non-finite values (train.max_skipped_steps="
            f"{self.recipe.train.max_skipped_steps}):\n{steps}\n"
            f"The weights are those after step {first_step - 1} (skipped updates change nothing) "
            f"and are saved in {self.checkpoints.root / f'step-{self.step:07d}'}. Lower train.lr, "
            f"look at the data of these steps, or raise train.max_skipped_steps; --resume "
            f"continues after the skipped batches."
        )

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Held-out metrics of tail_kd.eval (CE, perplexity, top-1, ECE, Full-ECE, KL to the
        teacher, top-1 agreement) over `eval.max_batches` micro-batches per rank, all ranks'
        positions together, logged as eval/<name>."""
        recipe, ctx = self.recipe, self.ctx
        loader = DistillationLoader(
            self.eval_set, recipe.train.micro_batch_size, ctx.rank, ctx.world_size, recipe.seed
        )
        metrics = TokenMetrics()
        self.distiller.student.eval()
        for _ in range(min(recipe.eval.max_batches, loader.batches_per_epoch)):
            self.distiller.score(next(loader), metrics, self.vocab_size)
        self.distiller.student.train()
        metrics.load_state(ctx.sum(metrics.state().to(ctx.device)))
        result = metrics.result()
        self.monitor.log_eval(self.step, result)
        return result

    def _save(self) -> None:
        trainer_state = {
            "world_size": self.ctx.world_size,
            "recipe": self.recipe.to_dict(),
            "tensorboard": {"log_dir": str(self.tensorboard_run)},
            "first_eval": self.first_eval,
        }
        rank_state = {"loader": self.loader.state_dict(), "rng": capture_rng()}
        self.monitor.flush()
        saved = self.checkpoints.save(self.distiller.student, self.step, trainer_state, rank_state)
        self.monitor.print(f"checkpoint: {saved.path}")


def _check_vocab_parallel(recipe: Recipe, ctx: DistContext, reference_loss: bool) -> None:
    """A vocab-parallel group must sit on one node and needs the fused loss's group mode."""
    size = recipe.parallel.vocab_parallel_size
    if size == 1:
        return
    if ctx.topology.local_world_size % size:
        raise RecipeError(
            f"parallel.vocab_parallel_size: {size} does not divide the "
            f"{ctx.topology.local_world_size} ranks on this node; a group must sit on one node"
        )
    if reference_loss:
        raise RecipeError(
            "--reference-loss computes full logits on every rank: run it with "
            "parallel.vocab_parallel_size=1"
        )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`train.steps 20 -> 40` for every leaf that differs between two recipe dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new)):
            changes += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return changes
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]


if __name__ == "__main__":
    sys.exit(main())
