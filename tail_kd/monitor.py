"""What a person watching the run sees: TensorBoard scalars, a progress bar, one line per log step.

Everything here happens on rank 0 only; on other ranks a `Monitor` does nothing. The TensorBoard
run lives in `<log.tensorboard_dir>/<run_name>`. A resumed run reopens it with
`purge_step = resumed step + 1`, so points logged after the checkpoint by the interrupted run are
dropped and the curve continues as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from tail_kd.eval.metrics import TOKEN_METRICS
from tail_kd.losses import STEP_SCALARS

__all__ = [
    "Monitor",
    "TRAIN_SCALARS",
    "EVAL_SCALARS",
    "TEACHER_SCALARS",
    "HIDDEN_SCALARS",
    "format_metrics",
    "read_scalars",
]

# Logged as train/<name> at every log step: the loss scalars every training forward returns
# (tail_kd.distiller.StudentWithLoss), averaged per step, and the step's own numbers.
TRAIN_SCALARS = STEP_SCALARS + (
    "lr",
    "grad_norm",
    "tokens_per_sec",
    "skipped_steps",  # updates skipped for non-finite values so far (tail_kd/step_health.py)
)
# Held-out token metrics (tail_kd.eval.metrics, the same code as `tail-kd eval`).
EVAL_SCALARS = TOKEN_METRICS
# What a run without a teacher (CE only) has no value for, and does not log.
TEACHER_SCALARS = {
    "kl_to_teacher",
    "teacher_tail_mass",
    "student_tail_mass",
    "student_topk_mass",
    "top1_agreement",
}

# What a run without hidden-state alignment (loss.hidden_weight 0) does not log.
HIDDEN_SCALARS = {"hidden_cosine"}

_SHORT_NAMES = {
    "loss": "loss",
    "ce": "ce",
    "divergence": "div",
    "kl_to_teacher": "kl",
    "perplexity": "ppl",
    "top1_accuracy": "top1",
    "ece": "ece",
    "full_ece": "full_ece",
    "top1_agreement": "agree",
    "teacher_tail_mass": "tailT",
    "student_tail_mass": "tailS",
    "hidden_cosine": "hcos",
    "lr": "lr",
    "grad_norm": "gnorm",
    "tokens_per_sec": "tok/s",
}


def format_metrics(metrics: Mapping[str, float]) -> str:
    """`loss 3.21 | ce 2.901 | ... | lr 1.00e-04 | tok/s 351` for the names known here: four
    significant digits, so that a value of 1.4e-10 shows its size instead of `0.0000`."""
    parts = []
    for name, short in _SHORT_NAMES.items():
        if name not in metrics:
            continue
        value = metrics[name]
        if name == "lr":
            text = f"{value:.2e}"
        elif name == "tokens_per_sec":
            text = f"{value:.0f}"
        else:
            text = f"{value:.4g}"
        parts.append(f"{short} {text}")
    return " | ".join(parts)


class Monitor:
    """Rank 0's TensorBoard writer, tqdm bar and log lines; inert on other ranks.

    `print` works at once; the TensorBoard run and the bar open with `start`, at the step
    training starts from (after a resume), and close with `close`.
    """

    def __init__(
        self,
        enabled: bool,
        log_dir: str | Path,
        total_steps: int,
        teacher: bool = True,
        hidden: bool = False,
    ):
        """`teacher`: whether the run has one (without, the TEACHER_SCALARS are not logged);
        `hidden`: whether it aligns hidden states (without, no hidden_cosine)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_dir = Path(log_dir)
        dropped = (set() if teacher else TEACHER_SCALARS) | (set() if hidden else HIDDEN_SCALARS)
        self.train_scalars = [name for name in TRAIN_SCALARS if name not in dropped]
        self.eval_scalars = [name for name in EVAL_SCALARS if name not in dropped]

    def start(self, start_step: int) -> None:
        """Open the TensorBoard run (purging what an interrupted run logged after `start_step`)
        and the progress bar."""
        if not self.enabled:
            return
        purge = start_step + 1 if start_step > 0 else None
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=30)
        # disable=None: a bar on a terminal, none in a log file (the per-step lines remain).
        self.bar = tqdm(
            total=self.total_steps,
            initial=start_step,
            desc="distil",
            unit="step",
            dynamic_ncols=True,
            disable=None,
        )

    def print(self, message: str) -> None:
        """A line on rank 0's console that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def advance(self, step: int) -> None:
        """Move the bar to `step`."""
        if self.enabled:
            self.bar.update(step - self.bar.n)

    def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write train/<name> scalars (and comm/<collective> bytes when DeepSpeed's
        communication logger is on: tail_kd/collectives.py) and print the step's summary line."""
        if not self.enabled:
            return
        logged = {name: metrics[name] for name in self.train_scalars}
        for name, value in logged.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        for name, value in metrics.items():
            if name.startswith("comm/"):
                self.writer.add_scalar(name, value, step)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
        self.print(f"step {step}/{self.total_steps} | {format_metrics(logged)}")

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write eval/<name> scalars and print them."""
        if not self.enabled:
            return
        logged = {name: metrics[name] for name in self.eval_scalars}
        for name, value in logged.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        self.print(f"eval at step {step} | {format_metrics(logged)}")

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a TensorBoard run folder, read with TensorBoard's own reader:
    tag -> [(step, value)] (what the study, the report and the tests read back)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
