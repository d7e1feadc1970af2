"""The training loop of one rank: steps, evaluation, checkpoints, stopping.

`Trainer` gets everything built (`tail_kd.run_setup.set_up_run` builds it) and does the work:

    train()       steps until train.steps, a signal, --stop-after-steps or divergence; returns
                  the exit status (tail_kd/exit_status.py)
    train_step()  one optimizer step: `accumulation` micro-batches forward + backward, the update
    evaluate()    held-out metrics (tail_kd.eval's, the code `tail-kd eval` runs), eval/* scalars
    save()        a checkpoint of the student and the trainer's state
    resume()      back to a checkpoint's state
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from tail_kd.checkpoint import CheckpointManager, capture_rng, restore_rng
from tail_kd.collectives import LoggedCollectives
from tail_kd.config import Recipe
from tail_kd.data.loader import DistillationLoader
from tail_kd.distiller import Distiller
from tail_kd.distributed import DistContext
from tail_kd.eval.metrics import TokenMetrics
from tail_kd.exit_status import EXIT_DIVERGED, EXIT_PREEMPTED
from tail_kd.losses import STEP_SCALARS
from tail_kd.monitor import Monitor
from tail_kd.run_dir import Checkpoint, step_dir_name, write_done
from tail_kd.signals import StopFlag
from tail_kd.step_health import (
    FaultInjector,
    SkippedSteps,
    nonfinite_gradients,
    poison_nonfinite,
    why_skipped,
)

__all__ = ["Trainer", "StepResult"]

# What a step sums over its micro-batches and the ranks (one all-reduce for all): each micro-batch's
# STEP_SCALARS (on the device), and the input tokens (counted on the host).
STEP_SUMS = (*STEP_SCALARS, "tokens")


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the metrics logged as train/*, and why the update was skipped (None:
    applied)."""

    metrics: dict[str, float]
    skipped: str | None


class Trainer:
    """Everything one rank does once the run is built (module docstring)."""

    def __init__(
        self,
        *,
        recipe: Recipe,
        ctx: DistContext,
        distiller: Distiller,
        loader: DistillationLoader,
        eval_set: Dataset | None,
        checkpoints: CheckpointManager,
        monitor: Monitor,
        stop_flag: StopFlag,
        stop_after_steps: int | None = None,
    ):
        self.recipe = recipe
        self.ctx = ctx
        self.distiller = distiller
        self.loader = loader
        self.eval_set = eval_set
        self.checkpoints = checkpoints
        self.monitor = monitor
        self.stop_flag = stop_flag
        self.stop_after_steps = stop_after_steps
        self.accumulation = recipe.gradient_accumulation_steps(ctx.world_size)
        self.faults = FaultInjector(recipe.debug)
        self.skipped = SkippedSteps(recipe.train.max_skipped_steps)
        self.collectives = LoggedCollectives()
        self.step = 0
        self.first_eval: dict[str, float] | None = None  # held-out numbers before training
        self.last_eval: dict[str, float] | None = None

    # -----------------------------------------------------------------------------------------
    # The loop
    # -----------------------------------------------------------------------------------------

    def train(self) -> int:
        """Train to the end (or to a stop); return the exit status."""
        self.monitor.start(self.step)
        self.monitor.print(f"TensorBoard: tensorboard --logdir {self.monitor.log_dir.parent}")
        self._print_notes()
        try:
            return self._train()
        finally:
            self.monitor.close()

    def _train(self) -> int:
        recipe, ctx, total = self.recipe, self.ctx, self.recipe.train.steps
        if self.step == 0 and self.eval_set is not None:
            self.first_eval = self.evaluate()
        while self.step < total:
            result = self.train_step()
            self.step += 1
            self.monitor.advance(self.step)
            self.skipped.record(self.step, result.skipped)
            if result.skipped is not None:
                self.monitor.print(self.skipped.progress())
            if self.step % recipe.log.every == 0 or self.step == total or result.skipped:
                self.monitor.log_train(self.step, result.metrics)
            at_eval = recipe.eval.every and self.step % recipe.eval.every == 0
            if self.eval_set is not None and (at_eval or self.step == total):
                self.last_eval = self.evaluate()
            signalled = ctx.any(self.stop_flag.signal_name is not None)
            stop_asked = self.stop_after_steps is not None and self.step >= self.stop_after_steps
            at_checkpoint = recipe.checkpoint.every and self.step % recipe.checkpoint.every == 0
            if (
                at_checkpoint
                or self.step == total
                or signalled
                or stop_asked
                or self.skipped.diverged
            ):
                self.save()
            if self.skipped.diverged:
                if ctx.is_main:
                    checkpoint = self.checkpoints.root / step_dir_name(self.step)
                    print(self.skipped.stop_message(checkpoint), file=sys.stderr, flush=True)
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
            write_done(Path(recipe.output_dir), self.step)
        ctx.barrier()
        if self.first_eval is not None and self.last_eval is not None:
            before, after = self.first_eval, self.last_eval
            names = [n for n in ("ce", "kl_to_teacher") if n in self.monitor.eval_scalars]
            self.monitor.print(
                "held-out: " + " | ".join(f"{n} {before[n]:.4g} -> {after[n]:.4g}" for n in names)
            )
        self._print_notes()
        return 0

    def _print_notes(self) -> None:
        for note in self.recipe.notes():
            self.monitor.print(f"note: {note}")

    def train_step(self) -> StepResult:
        """One optimizer step: `accumulation` micro-batches forward + backward, then the update.

        The logged loss scalars are means over micro-batches and ranks, the same weighting the
        gradient gets (DeepSpeed divides each micro-batch's gradient by the accumulation steps).
        A skipped update comes with what was not finite (tail_kd/step_health.py).

        Nothing in a micro-batch waits for the device (tests/test_host_syncs.py): the scalars stay
        there until the step's one all-reduce and copy to the host.
        """
        engine = self.distiller.student
        start = time.perf_counter()
        step = self.step + 1
        lr = engine.get_lr()[0]  # the scheduler moves on inside the last engine.step()
        inspect = self.skipped.inspect_next
        bad_parameters: list[str] = []
        rows = []  # per micro-batch, STEP_SCALARS
        tokens = 0  # this rank's input tokens, counted on the host
        logged = self.collectives.totals() if self.collectives.enabled else None
        with self.faults.gradients(step, engine.module):
            for micro in range(self.accumulation):
                batch = next(self.loader)
                out = self.distiller.forward(batch)
                loss = self.faults.loss(step, out["loss"])
                self.distiller.backward(poison_nonfinite(loss))
                if inspect and micro == self.accumulation - 1:
                    bad_parameters = nonfinite_gradients(engine.module, self.ctx)
                engine.step()
                tokens += int(batch["attention_mask"].sum())
                scalars = {**out, "loss": loss}  # the loss as stepped on
                rows.append(torch.stack([scalars[name].detach().float() for name in STEP_SCALARS]))
        per_micro_batch = torch.stack(rows)
        sums = torch.cat([per_micro_batch.sum(0), per_micro_batch.new_tensor([tokens])])
        totals = dict(zip(STEP_SUMS, self.ctx.sum(sums).tolist(), strict=True))
        seconds = time.perf_counter() - start
        micro_batches = self.accumulation * self.ctx.world_size
        metrics = {name: totals[name] / micro_batches for name in STEP_SCALARS}
        metrics.update(
            lr=lr,
            grad_norm=float(engine.get_global_grad_norm()),
            tokens_per_sec=totals["tokens"] / seconds,
            skipped_steps=float(engine.skipped_steps),
        )
        if logged is not None:  # deepspeed.comms_logger: bytes per collective (comm/*)
            metrics.update(self.collectives.since(logged))
        if engine.was_step_applied():
            return StepResult(metrics, None)
        mine = [dict(zip(STEP_SCALARS, row.tolist(), strict=True)) for row in per_micro_batch.cpu()]
        return StepResult(metrics, why_skipped(self.ctx, mine, bad_parameters, inspect))

    # -----------------------------------------------------------------------------------------
    # Evaluation and checkpoints
    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of tail_kd.eval (CE, perplexity, top-1, ECE, Full-ECE, KL to the
        teacher, top-1 agreement) over `eval.max_batches` micro-batches per rank, all ranks'
        positions together, logged as eval/<name>."""
        recipe, ctx = self.recipe, self.ctx
        loader = DistillationLoader(
            self.eval_set,
            recipe.train.micro_batch_size,
            ctx.rank,
            ctx.world_size,
            recipe.seed,
            pin_memory=ctx.device.type == "cuda",
        )
        metrics = TokenMetrics()
        self.distiller.student.eval()
        for _ in range(min(recipe.eval.max_batches, loader.batches_per_epoch)):
            self.distiller.score(next(loader), metrics)
        self.distiller.student.train()
        metrics.load_state(ctx.sum(metrics.state().to(ctx.device)))
        result = metrics.result()
        self.monitor.log_eval(self.step, result)
        return result

    def save(self) -> Checkpoint:
        """A checkpoint of this step: the student engine, the trainer's and each rank's state."""
        trainer_state = {
            "world_size": self.ctx.world_size,
            "recipe": self.recipe.to_dict(),
            "tensorboard": {"log_dir": str(self.monitor.log_dir)},
            "first_eval": self.first_eval,
        }
        rank_state = {"loader": self.loader.state_dict(), "rng": capture_rng()}
        self.monitor.flush()
        saved = self.checkpoints.save(self.distiller.student, self.step, trainer_state, rank_state)
        self.monitor.print(f"checkpoint: {saved.path}")
        return saved

    def resume(self, checkpoint: Checkpoint) -> None:
        """Back to the state `save` wrote into `checkpoint`: weights, optimizer, step, data
        position, RNG; says what changed in the recipe since."""
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


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`train.steps 20 -> 40` for every leaf that differs between two recipe dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new)):
            changes += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return changes
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]
