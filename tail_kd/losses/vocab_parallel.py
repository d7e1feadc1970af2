"""Per-token reductions over a vocabulary that may be split across ranks.

In vocab-parallel mode each rank of a process group holds a contiguous slice of the lm_head rows
(rank order = vocabulary order) and therefore a slice [c, V_r] of every logit row. A softmax-based
loss then needs, per token, only a handful of numbers combined over ranks (as in Megatron-LM's
vocab-parallel cross-entropy):

    logsumexp_V x   = logsumexp_r ( logsumexp_{V_r} x )             (all-gather c numbers per rank)
    K-th largest x  = K-th largest of the union of every rank's local top-K
    sum_V f(x)      = sum_r sum_{V_r} f(x)                           (all-reduce)

`VocabShards` does these for a group, and the same arithmetic with no communication when the
group is None (the whole vocabulary on one process), so the loss has one code path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["VocabShards", "top_k_values"]


class VocabShards:
    """Where this rank's vocabulary rows sit, and per-token reductions across the group.

    Args:
        local_rows: number of lm_head rows this rank holds (padding rows included).
        vocab_size: global number of real tokens; rows with global index >= vocab_size are padding
            and are dropped from every softmax. None: every row is a real token.
        group: the vocab-parallel process group, or None for a single process.
        device: where the group's collectives run: the device of the logits (a GPU's NCCL group
            refuses host tensors).
    """

    def __init__(
        self,
        local_rows: int,
        vocab_size: int | None,
        group: dist.ProcessGroup | None,
        device: torch.device,
    ):
        self.group = group
        self.device = device
        sizes = self._all_gather_ints(local_rows)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.offset = sum(sizes[: self.rank])
        total = sum(sizes)
        self.vocab_size = total if vocab_size is None else vocab_size
        if self.vocab_size > total:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {total} lm_head rows passed")
        # Rows [0, kept) of the local shard are real tokens.
        self.kept = max(0, min(local_rows, self.vocab_size - self.offset))

    def check_same_rows(self, rows: int, vocab_size: int | None, name: str) -> None:
        """ValueError unless a weight of `rows` local rows holds the same tokens as this one."""
        other = VocabShards(rows, vocab_size, self.group, self.device)
        if (other.offset, other.kept) != (self.offset, self.kept):
            raise ValueError(
                f"{name} and student_weight must hold the same token rows on each rank: student "
                f"rows [{self.offset}, {self.offset + self.kept}), {name} rows "
                f"[{other.offset}, {other.offset + other.kept}); pass vocab_size to drop padding "
                "rows"
            )

    def _all_gather_ints(self, value: int) -> list[int]:
        if self.group is None:
            return [value]
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(out, t, group=self.group)
        return torch.cat(out).tolist()

    def _all_gather(self, x: Tensor) -> Tensor:
        """[c, n] on every rank -> [world, c, n]."""
        if self.group is None:
            return x.unsqueeze(0)
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(out, x.contiguous(), group=self.group)
        return torch.stack(out)

    def logsumexp(self, local_lse: Tensor) -> Tensor:
        """Combine per-rank log-sum-exps [c, n] into the global ones [c, n]."""
        return self._all_gather(local_lse).logsumexp(0)

    def sum_(self, x: Tensor) -> Tensor:
        """Sum per-rank partial sums across the group, in place."""
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def kth_largest(self, local_logits: Tensor, k: int) -> Tensor:
        """The K-th largest value of each row over the whole vocabulary [c] (-inf if K > V)."""
        c, n = local_logits.shape
        local_top = top_k_values(local_logits, min(k, n))
        if local_top.shape[-1] < k:  # fewer than K local rows: pad with -inf
            pad = local_top.new_full((c, k - local_top.shape[-1]), float("-inf"))
            local_top = torch.cat([local_top, pad], dim=-1)
        if self.group is None:
            return local_top[:, -1]
        candidates = self._all_gather(local_top).permute(1, 0, 2).reshape(c, -1)
        return candidates.topk(k, dim=-1).values[:, -1]

    def local_labels(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Global label ids [c] -> (index into the local shard, whether this rank owns the label)."""
        local = labels - self.offset
        owned = (local >= 0) & (local < self.kept)
        return local.clamp(0, max(self.kept - 1, 0)), owned


def top_k_values(x: Tensor, k: int, block: int = 128) -> Tensor:
    """The k largest values of each row of x [c, n], in descending order [c, k]; exact.

    Two stages, because one top-k over a 150k-wide row is slow: the row is cut into blocks, and
    only the k blocks with the largest maxima (plus the ragged end) are searched. That loses
    nothing: if one of the k largest values v_i lay in a block outside those k, each of the k
    chosen blocks would hold a value >= its maximum >= v_i, so v_i could not be among the k
    largest (ties included, since only values are returned).
    """
    c, n = x.shape
    n_blocks = n // block
    # Measured: 2.7x faster than one topk on a 2-core CPU at V=152k, but 2.2x slower on an H200,
    # where torch.topk's radix select is already one pass over the row.
    if x.is_cuda or n_blocks <= 2 * k:
        return x.topk(k, dim=-1).values
    blocks = x[:, : n_blocks * block].view(c, n_blocks, block)
    best = blocks.amax(-1).topk(k, dim=-1).indices
    candidates = blocks.gather(1, best.unsqueeze(-1).expand(c, k, block)).view(c, k * block)
    return torch.cat([candidates, x[:, n_blocks * block :]], 1).topk(k, dim=-1).values
