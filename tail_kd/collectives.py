"""Bytes per collective per training step, from DeepSpeed's communication logger.

With `deepspeed: {comms_logger: {enabled: true}}` in a recipe (`--set
deepspeed.comms_logger.enabled=true`), DeepSpeed records every collective it runs: ZeRO-3's
all-gathers of parameters and reduce-scatters of gradients, the engine's all-reduces. The trainer
then logs what each optimizer step added as `comm/<collective>` (bytes, rank 0's; the ranks are
symmetric) to TensorBoard, where `tail-kd plan`'s prediction (`logged_bytes_per_step`,
tail_kd/cost_model.py) can be checked on the real cluster.

DeepSpeed's convention for a message's size: an all-gather counts one rank's shard, a
reduce-scatter its whole input. Collectives that tail-kd calls through torch.distributed (the
vocab-parallel exchanges, the step's metrics) are not in it, nor are evaluation's and
checkpointing's (outside the step). The logger synchronises the device after every collective:
a diagnostic mode, slower than a normal run.
"""

from __future__ import annotations

__all__ = ["LoggedCollectives"]


class LoggedCollectives:
    """The logger's running totals; `since(before)` is what a step added."""

    def __init__(self) -> None:
        from deepspeed.comm.comm import comms_logger

        self.logger = comms_logger

    @property
    def enabled(self) -> bool:
        return bool(self.logger.enabled)

    def totals(self) -> dict[str, float]:
        """Bytes logged so far, by collective."""
        return {
            name: float(sum(size * record[0] for size, record in sizes.items()))
            for name, sizes in self.logger.comms_dict.items()
        }

    def since(self, before: dict[str, float]) -> dict[str, float]:
        """`comm/<collective>`: bytes logged after the `totals()` that gave `before`."""
        now = self.totals()
        return {
            f"comm/{name}": value - before.get(name, 0.0)
            for name, value in now.items()
            if value > before.get(name, 0.0)
        }
