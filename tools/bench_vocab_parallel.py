#!/usr/bin/env python
"""Per-rank memory and time of the vocab-parallel loss step, for vocab-parallel sizes P.

For each P, P processes (gloo on the CPU, NCCL with --device cuda: one GPU per process) each hold
a 1/P row shard of the student's and the teacher's lm_head, the same hidden states, and run the
fused TAD loss forward + backward in the loss core's group mode, exactly as a vocab-parallel group
of the trainer does (tail_kd/sharded_heads.py). P = 1 is the whole vocabulary in one process.

Measured per rank: the peak memory above what the process held before the weights were made
(so the lm_head shards, their gradient, and the loss's chunk buffers all count), and the time of
the step. The lm_head and logit part should fall as 1/P.

    python tools/bench_vocab_parallel.py --sizes 1 2 4                    # V = 256000, H = 2048
    python tools/bench_vocab_parallel.py --sizes 1 2 --vocab 49152 --hidden 576 --json out.json

On the CPU the peak is the resident set's high-water mark (this tool sets MALLOC_MMAP_THRESHOLD_
so that freed buffers leave it); on a GPU it is the allocator's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import peak_memory


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="vocab-parallel sizes P")
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--hidden", type=int, default=2048, help="student and teacher width")
    p.add_argument("--tokens", type=int, default=512, help="tokens per step (one sequence)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--compile", action="store_true", help="compiled loss kernels")
    p.add_argument("--json", help="write the results to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks
    rows = []
    for size in args.sizes:
        queue = mp.get_context("spawn").SimpleQueue()
        port = _free_port()
        mp.spawn(_rank, args=(size, port, args, queue), nprocs=size, join=True)
        results = sorted((queue.get() for _ in range(size)), key=lambda r: r["rank"])
        rows.append({"size": size, "ranks": results})
    base = max(r["peak_bytes"] for r in rows[0]["ranks"]) if rows[0]["size"] == 1 else None
    print(
        f"\nV={args.vocab} H={args.hidden} tokens={args.tokens} chunk={args.chunk_size} "
        f"device={args.device} compiled={args.compile}"
    )
    print(
        f"{'P':>3} {'peak MiB per rank (max)':>24} {'vs P=1':>8} {'x P':>6} {'step s':>8} {'loss':>10}"
    )
    for row in rows:
        peak = max(r["peak_bytes"] for r in row["ranks"])
        seconds = max(r["seconds"] for r in row["ranks"])
        ratio = f"{peak / base:>8.3f}" if base else f"{'-':>8}"
        times_p = f"{peak / base * row['size']:>6.2f}" if base else f"{'-':>6}"
        loss = row["ranks"][0]["loss"]  # the same on every rank of a group
        print(
            f"{row['size']:>3} {peak / 2**20:>24.0f} {ratio} {times_p} {seconds:>8.2f} {loss:>10.6f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


def _rank(rank, size, port, args, queue):
    from tail_kd.losses import fused_distillation_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    group = None
    if size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
        group = dist.group.WORLD
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.hidden, generator=generator)
    teacher_hidden = torch.randn(1, args.tokens, args.hidden, generator=generator)
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=generator)
    bounds = [int(part[0]) for part in torch.tensor_split(torch.arange(args.vocab), size)] + [
        args.vocab
    ]
    rows = bounds[rank + 1] - bounds[rank]
    hidden, teacher_hidden, labels = (x.to(device) for x in (hidden, teacher_hidden, labels))
    baseline = peak_memory.reset_peak(device)
    # This rank's rows of the same random weights for every P (so the losses agree across P).
    student_weight = _rows(bounds[rank], bounds[rank + 1], args.hidden, 1, device).requires_grad_()
    teacher_weight = _rows(bounds[rank], bounds[rank + 1], args.hidden, 2, device)
    hidden.requires_grad_()
    start = time.perf_counter()
    out = fused_distillation_loss(
        hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        k=args.k,
        beta=2.0,
        vocab_size=args.vocab,
        group=group,
        chunk_size=args.chunk_size,
        compile=args.compile,
    )
    out.loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    queue.put(
        {
            "rank": rank,
            "rows": rows,
            "peak_bytes": peak_memory.peak(device) - baseline,
            "seconds": seconds,
            "loss": float(out.loss),
        }
    )
    if group is not None:
        dist.destroy_process_group()


def _rows(start, stop, width, seed, device, block=1024):
    """Rows [start, stop) of a random [V, width] matrix made block by block (block b from seed
    (seed, b)), so that any row range is the same numbers without making the whole matrix."""
    out = torch.empty(stop - start, width, device=device)
    for b in range(start // block, (stop - 1) // block + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + b)
        rows = torch.randn(block, width, generator=generator) * 0.05
        lo, hi = max(start - b * block, 0), min(stop - b * block, block)
        out[b * block + lo - start : b * block + hi - start] = rows[lo:hi]
    return out


def _free_port():
    from tail_kd.topology import free_port

    return free_port()


if __name__ == "__main__":
    sys.exit(main())
