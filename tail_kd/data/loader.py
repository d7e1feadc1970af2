"""A deterministic, resumable, distributed loader of micro-batches.

Order: epoch `e` visits the dataset in the permutation drawn by a `torch.Generator` seeded with
`seed + e`. The permutation is consumed in global steps of `micro_batch_size * world_size`
examples; rank `r` takes the `r`-th slice of `micro_batch_size` examples of each global step, so
ranks never share an example. The last, incomplete global step of an epoch is skipped, so every
rank yields the same number of batches per epoch. The loader never ends: after the last step of
an epoch comes the first of the next.

State: the epoch and the number of its examples already consumed by all ranks together. Because
the position counts examples rather than batches, a run saved with one world size or micro-batch
size resumes at the same place of the same order with another.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from tail_kd.data.sources import DataError

__all__ = ["DistillationLoader"]


class DistillationLoader:
    """Endless micro-batches `{name: tensor [micro_batch_size, T]}` for one rank.

    `dataset` is any map-style dataset whose items are dicts of equal-shaped tensors.
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, torch.Tensor]],
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        pin_memory: bool = False,
    ):
        """`pin_memory`: batches in page-locked host memory (for GPUs: their copy to the device
        then overlaps the work already queued there)."""
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need micro_batch_size >= 1, world_size >= 1 and 0 <= rank < world_size; got "
                f"micro_batch_size={micro_batch_size}, world_size={world_size}, rank={rank}"
            )
        self.global_batch = micro_batch_size * world_size
        if len(dataset) < self.global_batch:
            raise DataError(
                f"the dataset has {len(dataset)} examples, fewer than one step of "
                f"micro_batch_size {micro_batch_size} x world size {world_size} = "
                f"{self.global_batch}; add data or lower train.micro_batch_size"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.seed = seed
        self.pin_memory = pin_memory
        self.epoch = 0
        self.position = 0  # examples of this epoch consumed by all ranks together
        self._order: torch.Tensor | None = None  # permutation of self.epoch, drawn when needed

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank yields per epoch."""
        return len(self.dataset) // self.global_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position + self.global_batch > len(self.dataset):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(len(self.dataset), generator=generator)
        start = self.position + self.rank * self.micro_batch_size
        indices = self._order[start : start + self.micro_batch_size].tolist()
        self.position += self.global_batch
        items = [self.dataset[i] for i in indices]
        batch = {name: torch.stack([item[name] for item in items]) for name in items[0]}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from; identical on every rank."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": len(self.dataset),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()` output, so that the next batch is the one that was due."""
        if state["seed"] != self.seed or state["num_examples"] != len(self.dataset):
            raise DataError(
                f"the checkpoint's data position is for seed {state['seed']} and "
                f"{state['num_examples']} examples, but this run has seed {self.seed} and "
                f"{len(self.dataset)} examples: the data order would differ; resume with the "
                "recipe's seed and data, or start over with --overwrite"
            )
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
