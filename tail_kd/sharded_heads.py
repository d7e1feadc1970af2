"""Vocab-parallel lm_heads in training: row shards read from, and gradients written back to, ZeRO-3.

With `parallel.vocab_parallel_size: P > 1`, ranks form groups of P consecutive ranks (launchers
number a node's ranks consecutively, so a group sits on one node when P divides the ranks per
node). Within a group, position j owns rows [R_j, R_{j+1}) of both lm_heads, the real tokens
[0, V) split as evenly as `torch.tensor_split` splits them (padding rows >= V are never read: the
loss excludes them and their gradient is 0). The loss is computed per shard by the loss core's
`group` mode (tail_kd/losses), so neither a full lm_head nor full-vocabulary logits exist on any
rank.

ZeRO-3 keeps the weights. It stores a [V_rows, H] parameter flattened, rank q holding the flat
elements [q S, (q + 1) S) (S = ceil(V_rows H / W) over all W ranks, `param.ds_tensor`). A row
shard is a flat range [R_j H, R_{j+1} H), so both directions are one `all_to_all` over all ranks:

    gather_rows    rank r receives, from every rank q, partition_q ∩ shard_pos(r): its rows
    scatter_grad   rank q receives, from every rank r, shard_pos(r) ∩ partition_q of r's row
                   gradient, and sums what the W / P groups send for the same elements

Each rank moves V H / P elements either way (an all-gather of the head would move V H).

The loss (`group_loss`): every member's micro-batch is scored by the whole group in the loss
core's group mode, one micro-batch at a time, so each keeps its own token mean as at P = 1; a rank
backpropagates its own micro-batch into its backbone and every micro-batch into its rows.

Gradient bookkeeping (`ShardedHead.add_grad_to_partition`), chosen to equal what ZeRO-3 does for
the same parameter when P = 1: ZeRO-3 averages gradients over the W ranks (reduce-scatter / W),
and the engine's backward already scaled each micro-batch by 1 / accumulation steps; so the row
gradients summed over micro-batches and groups are divided by W and added to the rank's gradient
partition (`deepspeed.utils.safe_set_local_grad`), before the optimizer step clips and applies
it. A student whose lm_head is its input embedding (tied) also has the embedding's own gradient
there, which ZeRO-3 accumulated during the backward: the rows' gradient is added to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tail_kd.config import vocab_parallel_problem
from tail_kd.losses import DistillationLossOutput, LossInputs

__all__ = ["VocabGroups", "vocab_groups", "ShardedHead", "group_loss"]


@dataclass(frozen=True)
class VocabGroups:
    """This rank's vocab-parallel group and the row shards of the group's positions."""

    size: int  # P
    group: dist.ProcessGroup
    host_group: dist.ProcessGroup  # the same ranks over gloo, for host tensors (the labels)
    position: int  # this rank's position in its group, 0..P-1
    bounds: tuple[int, ...]  # shard j = rows [bounds[j], bounds[j + 1]); bounds[-1] = V

    @property
    def rows(self) -> tuple[int, int]:
        return self.bounds[self.position], self.bounds[self.position + 1]


def vocab_groups(size: int, vocab_size: int) -> VocabGroups:
    """Split the ranks into groups of `size` consecutive ranks (a collective: every rank calls it,
    and every rank creates every group, as `torch.distributed.new_group` requires), each also as
    a gloo group for host tensors where the job's backend is NCCL (which sends device tensors
    only)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    problem = vocab_parallel_problem(size, world_size=world, vocab_size=vocab_size)
    if problem:
        raise ValueError(problem)
    host_backend = dist.get_backend() == "gloo"
    mine = None
    for start in range(0, world, size):
        ranks = list(range(start, start + size))
        group = dist.new_group(ranks)
        host_group = group if host_backend else dist.new_group(ranks, backend="gloo")
        if start <= rank < start + size:
            mine = group, host_group
    splits = torch.tensor_split(torch.arange(vocab_size), size)
    bounds = tuple([0] + [int(part[-1]) + 1 for part in splits])
    return VocabGroups(size, *mine, rank % size, bounds)


class ShardedHead:
    """This rank's rows of a ZeRO-3 partitioned lm_head weight [V_rows, H], and the way back."""

    def __init__(self, weight: nn.Parameter, groups: VocabGroups):
        if not hasattr(weight, "ds_tensor"):
            raise ValueError("ShardedHead needs a ZeRO-3 partitioned parameter (ds_tensor)")
        self.weight = weight
        self.groups = groups
        rank, world = dist.get_rank(), dist.get_world_size()
        self.world = world
        width = weight.ds_shape[1]
        self.width = width
        numel = weight.ds_numel
        part = weight.ds_tensor.numel()
        self.partition = (rank * part, min((rank + 1) * part, numel))
        partitions = [(q * part, min((q + 1) * part, numel)) for q in range(world)]

        def shard(q: int) -> tuple[int, int]:
            start, stop = groups.bounds[q % groups.size], groups.bounds[q % groups.size + 1]
            return start * width, stop * width

        # Flat ranges this rank sends to each rank q (of its partition), and receives from each q
        # (of its own shard); both in rank order, so received pieces line up in flat order.
        self.to_send = [_intersect(self.partition, shard(q)) for q in range(world)]
        self.to_receive = [_intersect(partitions[q], shard(rank)) for q in range(world)]

    @property
    def rows(self) -> int:
        start, stop = self.groups.rows
        return stop - start

    @torch.no_grad()
    def gather_rows(self) -> Tensor:
        """This rank's shard of the weight [rows, H], in the weight's dtype, from the partitions."""
        local = self.weight.ds_tensor.data.view(-1)
        begin = self.partition[0]
        send = torch.cat([local[start - begin : stop - begin] for start, stop in self.to_send])
        out = send.new_empty(self.rows * self.width)
        dist.all_to_all_single(out, send, _sizes(self.to_receive), _sizes(self.to_send))
        return out.view(self.rows, self.width)

    @torch.no_grad()
    def partition_grad(self, row_grad: Tensor) -> Tensor:
        """Every rank's `row_grad` [rows, H] summed into this rank's ZeRO-3 partition [S] (float32;
        the padding at the end of the last partition stays 0)."""
        send = row_grad.float().reshape(-1).contiguous()
        received = send.new_empty(sum(_sizes(self.to_receive_back)))
        dist.all_to_all_single(
            received, send, _sizes(self.to_receive_back), _sizes(self.to_send_back)
        )
        grad = torch.zeros(self.weight.ds_tensor.numel(), dtype=torch.float32, device=send.device)
        begin, offset = self.partition[0], 0
        for start, stop in self.to_receive_back:
            grad[start - begin : stop - begin] += received[offset : offset + stop - start]
            offset += stop - start
        return grad

    @torch.no_grad()
    def add_grad_to_partition(self, row_grad: Tensor, *, accumulate: bool) -> None:
        """Hand `row_grad` [rows, H] (summed over this step's micro-batches) to ZeRO-3: divided by
        the world size, summed over the groups into the partitions (`partition_grad`), and added
        to this rank's gradient partition (`accumulate`: the parameter also has gradients ZeRO-3
        reduced itself, as a tied embedding does) or put there (it has none)."""
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        grad = self.partition_grad(row_grad / self.world)
        if accumulate:
            grad += safe_get_local_grad(self.weight).view(-1).to(grad.device)
        safe_set_local_grad(self.weight, grad)

    # The way back is the way there reversed: send what was received, receive what was sent.
    @property
    def to_send_back(self) -> list[tuple[int, int]]:
        return self.to_receive

    @property
    def to_receive_back(self) -> list[tuple[int, int]]:
        return self.to_send


def group_loss(
    loss_fn: Callable[..., DistillationLossOutput], inputs: LossInputs, groups: VocabGroups
) -> DistillationLossOutput:
    """This rank's micro-batch loss, computed vocab-parallel by its group; the group's other
    micro-batches add only their gradient for this rank's rows (`inputs` holds this rank's
    hidden states and labels and its rows of both lm_heads).

    The members' hidden states and teacher hidden states are all-gathered on the device, their
    labels on the host (over `host_group`: the loss works out the valid tokens of each from host
    labels without waiting for the device, tail_kd/losses/fused.py); the group then
    computes one vocab-parallel loss per member's micro-batch, which is exactly that micro-batch's
    loss at P = 1 (its own mean over its tokens). This rank returns its own micro-batch's; the
    others enter as `loss - loss.detach()`, zero in value, carrying their gradient for this
    rank's rows. The hidden-state gradient reaching this rank's backbone is its own micro-batch's
    (the loss core's group mode gives every member the full hidden-state gradient).
    """
    hidden = inputs.student_hidden
    members = {
        "hidden": _all_gather(hidden.detach(), groups.group, groups.size),
        "teacher_hidden": _all_gather(inputs.teacher_hidden, groups.group, groups.size),
        "labels": _all_gather(inputs.labels.cpu(), groups.host_group, groups.size),
    }
    own, others = None, None
    for m in range(groups.size):
        mine = m == groups.position
        teacher_hidden = members["teacher_hidden"]
        member = inputs._replace(
            student_hidden=hidden if mine else _leaf_like(members["hidden"][m], hidden),
            teacher_hidden=None if teacher_hidden is None else teacher_hidden[m],
            labels=members["labels"][m],
        )
        out = loss_fn(*member, group=groups.group)
        if mine:
            own = out
        else:
            extra = out.loss - out.loss.detach()
            others = extra if others is None else others + extra
    if others is not None:
        own.loss = own.loss + others
    return own


def _leaf_like(x: Tensor, like: Tensor) -> Tensor:
    """`x` needing a gradient when `like` does (another member's hidden states: their gradient
    is that member's, and is dropped here)."""
    return x.requires_grad_(like.requires_grad)


def _all_gather(x: Tensor | None, group: dist.ProcessGroup, size: int) -> list[Tensor] | None:
    if x is None:
        return None
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous(), group=group)
    return out


def _intersect(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    start, stop = max(a[0], b[0]), min(a[1], b[1])
    return (start, stop) if start < stop else (start, start)


def _sizes(ranges: list[tuple[int, int]]) -> list[int]:
    return [stop - start for start, stop in ranges]
