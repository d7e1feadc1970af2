"""Vocab-parallel fused loss in real gloo process groups equals the single-process dense result."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tail_kd.losses import fused_tad_loss
from tail_kd.losses.vocab_parallel import top_k_values
from test_losses_fused import dense_reference, loss_and_grads, make_batch

CASES = [
    # (shard sizes, vocab_size, loss kwargs)
    ([10, 27], None, dict(divergence="tad", k=5, beta=2.0, normalize=True, chunk_size=4)),
    ([10, 27], None, dict(divergence="tad", k=12, beta=0.5, normalize=False, chunk_size=1000)),
    ([10, 27], None, dict(divergence="reverse_kl", k=3, beta=1.0, normalize=True, chunk_size=5)),
    ([5, 20, 12], None, dict(divergence="tad", k=5, beta=2.0, normalize=True, chunk_size=6)),
    ([5, 20, 12], None, dict(divergence="forward_kl", k=None, beta=1.0, normalize=True, chunk_size=7)),
    ([5, 20, 12], None, dict(divergence="none", k=4, beta=1.0, normalize=True, chunk_size=3)),
    # padded rows: the last rank's shard is padding only (vocab 33 of 40 rows)
    ([20, 13, 7], 33, dict(divergence="tad", k=8, beta=2.0, normalize=True, chunk_size=5)),
    ([2, 38], 33, dict(divergence="tad", k=3, beta=2.0, normalize=True, chunk_size=100)),
]


def _worker(rank, world, init_file, out_dir, cases):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for i, (sizes, vocab_size, kwargs) in enumerate(cases):
            s_hidden, s_weight, t_hidden, t_weight, labels = _batch(sum(sizes), vocab_size)
            lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
            result = loss_and_grads(
                fused_tad_loss, s_hidden, s_weight[lo:hi], t_hidden, t_weight[lo:hi], labels,
                ce_weight=1.0, vocab_size=vocab_size, group=dist.group.WORLD, **kwargs,
            )
            torch.save(result, os.path.join(out_dir, f"case{i}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _batch(rows, vocab_size):
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch(batch=2, length=9, rows=rows, seed=7)
    return s_hidden, s_weight, t_hidden, t_weight, labels.clamp(max=(vocab_size or rows) - 1)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_single_process(tmp_path, world):
    """One process group per world size runs every case; each rank's results are checked."""
    cases = [case for case in CASES if len(case[0]) == world]
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), cases), nprocs=world, join=True)
    for i, (sizes, vocab_size, kwargs) in enumerate(cases):
        batch = _batch(sum(sizes), vocab_size)
        reference_kwargs = {key: value for key, value in kwargs.items() if key != "chunk_size"}
        ref_loss, ref_grad_h, ref_grad_w = loss_and_grads(
            dense_reference, *batch, ce_weight=1.0, vocab_size=vocab_size, **reference_kwargs
        )
        for rank in range(world):
            loss, grad_h, grad_w = torch.load(tmp_path / f"case{i}-rank{rank}.pt")
            lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
            msg = f"case {sizes} {vocab_size} {kwargs}, rank {rank}"
            torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12, msg=msg)
            torch.testing.assert_close(grad_h, ref_grad_h, rtol=1e-10, atol=1e-12, msg=msg)
            # This rank's rows of the full weight gradient; padding rows get exactly zero.
            expected = torch.zeros_like(grad_w)
            real_hi = min(hi, vocab_size or hi)
            if real_hi > lo:
                expected[: real_hi - lo] = ref_grad_w[lo:real_hi]
            torch.testing.assert_close(grad_w, expected, rtol=1e-10, atol=1e-12, msg=msg)


@pytest.mark.parametrize("n, k", [(5000, 10), (5000, 1), (1300, 50), (129, 3), (300, 10), (40, 40)])
def test_block_top_k_values_equal_torch_topk(n, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(16, n, generator=g)
    x[3] = torch.randint(0, 5, (n,), generator=g).float()  # massive ties
    x[4, :] = 1.0
    x[5, -7:] = 100.0  # the largest values in the ragged end
    torch.testing.assert_close(top_k_values(x, k), x.topk(k, dim=-1).values, rtol=0, atol=0)
    bf = x.bfloat16()
    torch.testing.assert_close(top_k_values(bf, k), bf.topk(k, dim=-1).values, rtol=0, atol=0)
