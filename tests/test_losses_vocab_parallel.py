"""Vocab-parallel fused loss in real gloo process groups equals the single-process dense result."""

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import loss_and_grads, make_batch
from tail_kd.losses import dense_distillation_loss, fused_distillation_loss
from tail_kd.losses.vocab_parallel import top_k_values

CASES = [
    # (shard sizes, vocab_size, loss kwargs)
    ([10, 27], None, dict(divergence="tad", k=5, beta=2.0, normalize=True, chunk_size=4)),
    ([10, 27], None, dict(divergence="tad", k=12, beta=0.5, normalize=False, chunk_size=1000)),
    ([10, 27], None, dict(divergence="reverse_kl", k=3, beta=1.0, normalize=True, chunk_size=5)),
    ([5, 20, 12], None, dict(divergence="tad", k=5, beta=2.0, normalize=True, chunk_size=6)),
    (
        [5, 20, 12],
        None,
        dict(divergence="forward_kl", k=None, beta=1.0, normalize=True, chunk_size=7),
    ),
    ([5, 20, 12], None, dict(divergence="none", k=4, beta=1.0, normalize=True, chunk_size=3)),
    # padded rows: the last rank's shard is padding only (vocab 33 of 40 rows)
    ([20, 13, 7], 33, dict(divergence="tad", k=8, beta=2.0, normalize=True, chunk_size=5)),
    ([2, 38], 33, dict(divergence="tad", k=3, beta=2.0, normalize=True, chunk_size=100)),
    # compiled, as the trainer runs it on GPUs (a long sequence: the teacher pre-pass too)
    (
        [10, 27],
        None,
        dict(divergence="tad", k=5, beta=2.0, normalize=True, chunk_size=4, compile=True),
    ),
    (
        [20, 13, 7],
        33,
        dict(divergence="tad", k=8, beta=2.0, normalize=True, chunk_size=5, compile=True),
    ),
    (
        [20, 13, 7],
        33,
        dict(
            divergence="reverse_kl", k=None, beta=1.0, normalize=True, chunk_size=18, compile=True
        ),
    ),
]


def _worker(rank, world, init_file, out_dir, cases, default_device=None):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for i, (sizes, vocab_size, kwargs) in enumerate(cases):
            s_hidden, s_weight, t_hidden, t_weight, labels = _batch(sum(sizes), vocab_size)
            lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
            # Tensors made without `device=` inside the loss land on `default_device`.
            with torch.device(default_device) if default_device else contextlib.nullcontext():
                result = loss_and_grads(
                    fused_distillation_loss,
                    s_hidden,
                    s_weight[lo:hi],
                    t_hidden,
                    t_weight[lo:hi],
                    labels,
                    ce_weight=1.0,
                    vocab_size=vocab_size,
                    group=dist.group.WORLD,
                    **kwargs,
                )
            torch.save(result, os.path.join(out_dir, f"case{i}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _batch(rows, vocab_size):
    s_hidden, s_weight, t_hidden, t_weight, labels = make_batch(
        batch=2, length=9, rows=rows, seed=7
    )
    return s_hidden, s_weight, t_hidden, t_weight, labels.clamp(max=(vocab_size or rows) - 1)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_single_process(tmp_path, world):
    """One process group per world size runs every case; each rank's results are checked."""
    cases = [case for case in CASES if len(case[0]) == world]
    mp.spawn(
        _worker, args=(world, str(tmp_path / "init"), str(tmp_path), cases), nprocs=world, join=True
    )
    for i, (sizes, vocab_size, kwargs) in enumerate(cases):
        batch = _batch(sum(sizes), vocab_size)
        reference_kwargs = {
            key: value for key, value in kwargs.items() if key not in ("chunk_size", "compile")
        }
        ref_loss, ref_grad_h, ref_grad_w = loss_and_grads(
            dense_distillation_loss,
            *batch,
            ce_weight=1.0,
            vocab_size=vocab_size,
            **reference_kwargs,
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


def test_collectives_run_on_the_device_of_the_inputs(tmp_path):
    """On GPUs the group is NCCL's, which refuses host tensors: every tensor the loss sends through
    a collective must be made on the device of its inputs, not on the default device. Emulated
    here the other way round: the inputs are on the CPU, the default device is `meta` (a tensor
    made without `device=` lands there, and gloo cannot send it), and the results must still be
    the single-process ones."""
    cases = [
        ([10, 27], None, dict(divergence="tad", k=5, beta=2.0, normalize=True, chunk_size=4)),
        (
            [10, 27],
            None,
            dict(divergence="reverse_kl", k=3, beta=1.0, normalize=True, chunk_size=5),
        ),
        ([10, 27], None, dict(divergence="none", k=4, beta=1.0, normalize=True, chunk_size=7)),
    ]
    init, world = str(tmp_path / "init"), 2
    mp.spawn(_worker, args=(world, init, str(tmp_path), cases, "meta"), nprocs=world, join=True)
    for i, (sizes, vocab_size, kwargs) in enumerate(cases):
        reference = {key: value for key, value in kwargs.items() if key != "chunk_size"}
        expected = loss_and_grads(
            dense_distillation_loss, *_batch(sum(sizes), vocab_size), vocab_size=vocab_size,
            **reference,
        )  # fmt: skip
        for rank in range(world):
            loss, grad_h, grad_w = torch.load(tmp_path / f"case{i}-rank{rank}.pt")
            lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
            torch.testing.assert_close(loss, expected[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grad_h, expected[1], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grad_w, expected[2][lo:hi], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Row shards of a ZeRO-3 partitioned weight (tail_kd/sharded_heads.py)
# ---------------------------------------------------------------------------------------------


def _partitioned(full, rank, world):
    """A stand-in for a ZeRO-3 parameter: flattened, rank `rank` holding elements [r S, (r+1) S),
    the last partition zero-padded, as `param.ds_tensor` is."""
    part = -(-full.numel() // world)
    flat = torch.zeros(part * world)
    flat[: full.numel()] = full.reshape(-1)
    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_tensor = flat[rank * part : (rank + 1) * part].clone()
    weight.ds_shape, weight.ds_numel = full.shape, full.numel()
    return weight


def _sharded_head_worker(rank, world, init_file, out_dir, size, vocab):
    from tail_kd.sharded_heads import ShardedHead, vocab_groups

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        full = torch.arange(float((vocab + 3) * 7)).view(vocab + 3, 7)  # 3 padding rows
        groups = vocab_groups(size, vocab)
        head = ShardedHead(_partitioned(full, rank, world), groups)
        rows = head.gather_rows()
        row_grad = torch.full_like(rows, float(rank + 1))  # each rank's own gradient value
        torch.save(
            {"bounds": groups.bounds, "rows": rows, "partition": head.partition_grad(row_grad)},
            os.path.join(out_dir, f"head-rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, size", [(3, 3), (4, 2), (6, 3)])
def test_row_shards_of_zero_partitions(tmp_path, world, size):
    """Partitions that cut rows (S is no multiple of the width 7), several groups: each rank
    receives exactly its rows, and the gradients of every group add up in the right partitions."""
    vocab = 41
    mp.spawn(_sharded_head_worker, args=(world, str(tmp_path / "init"), str(tmp_path), size, vocab),
             nprocs=world, join=True)  # fmt: skip
    full = torch.arange(float((vocab + 3) * 7)).view(vocab + 3, 7)
    expected = torch.zeros(vocab + 3, 7)  # row gradients summed over ranks, as partitions hold them
    results = [torch.load(tmp_path / f"head-rank{rank}.pt") for rank in range(world)]
    for rank, result in enumerate(results):
        bounds = result["bounds"]
        assert bounds[0] == 0 and bounds[-1] == vocab and len(bounds) == size + 1
        start, stop = bounds[rank % size], bounds[rank % size + 1]
        torch.testing.assert_close(result["rows"], full[start:stop], rtol=0, atol=0)
        expected[start:stop] += rank + 1
    flat = torch.cat([result["partition"] for result in results])
    torch.testing.assert_close(flat[: full.numel()], expected.reshape(-1), rtol=0, atol=0)
    assert not flat[full.numel() :].any()
