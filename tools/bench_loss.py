#!/usr/bin/env python
"""Benchmark the distillation loss: time of forward+backward and extra peak memory, per variant.

Each variant runs in its own process on the same shapes and seeds, so that peaks do not leak from
one into the next:

    matmuls        the floor under every fused loss: per chunk, both models' lm_head matmuls and
                   the two gradient matmuls (hidden states, weight), with no loss math at all
    dense          full [N, V] logits for both models + the dense TAD reference, autograd
    liger          Liger-Kernel's LigerFusedLinearJSDLoss, beta=0 (forward KL) + CE, eager
    liger_compiled the same with torch.compile (Liger's default)
    fused_kl       this project's fused loss, divergence="forward_kl" (vanilla KD) + CE, eager
    fused_tad      this project's fused loss, divergence="tad" (K, beta=2, normalised) + CE, eager
    *_compiled     the same with compile=True (each chunk's work through torch.compile)

Time: the median of --iters steps after a warm-up; with --rounds R every variant is timed R times,
round robin, and keeps its fastest median (a shared or throttled machine drifts between runs).
Memory: the peak above what the inputs hold (CUDA: max_memory_allocated; CPU: the process's peak
resident set, VmHWM). On the CPU time and memory come from separate processes: the timing runs
with the malloc settings `tail-kd train` gives CPU ranks (glibc keeps freed buffers), the memory
run with glibc told to return every large block at once, so that the resident set follows the
live tensors (which would slow the timing). Usage:

    python tools/bench_loss.py                       # 2x1024 tokens, H=576, V=49152 and 151936
    python tools/bench_loss.py --vocab 49152 --iters 5 --rounds 3 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import peak_memory
from tail_kd.cli import CPU_MALLOC

VARIANTS = (
    "matmuls",
    "dense",
    "liger",
    "liger_compiled",
    "fused_kl",
    "fused_kl_compiled",
    "fused_tad",
    "fused_tad_compiled",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument(
        "--chunk-size", type=int, default=1024, help="tokens per chunk (all fused variants)"
    )
    p.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time each variant this many times, round robin; keep the fastest",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: VARIANT:VOCAB:time|memory|both
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Worker side: one variant, one vocabulary size, in a fresh process.


def build_loss(name, args):
    """A function (s_hidden, s_weight, t_hidden, t_weight, labels) -> scalar loss."""
    if name == "matmuls":
        return matmul_floor(args.chunk_size)
    if name == "dense":
        from tail_kd.losses import dense_distillation_loss

        return lambda sh, sw, th, tw, labels: (
            dense_distillation_loss(sh, sw, th, tw, labels, k=args.k, beta=args.beta).loss
        )
    if name.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=1.0,
            weight_soft_loss=1.0,
            beta=0.0,
            compiled=name == "liger_compiled",
            chunk_size=args.chunk_size,
        )
        return lambda sh, sw, th, tw, labels: liger(
            sh.flatten(0, 1), sw, th.flatten(0, 1), tw, labels.flatten()
        )
    from tail_kd.losses import fused_distillation_loss

    divergence = "forward_kl" if name.startswith("fused_kl") else "tad"
    k = args.k if divergence == "tad" else None
    return lambda sh, sw, th, tw, labels: (
        fused_distillation_loss(
            sh,
            sw,
            th,
            tw,
            labels,
            k=k,
            beta=args.beta,
            divergence=divergence,
            chunk_size=args.chunk_size,
            compile=name.endswith("_compiled"),
        ).loss
    )


def matmul_floor(chunk_size):
    """The four matmuls per chunk that every fused loss does, with the cheapest stand-in for the
    loss between them: logit gradient = student logits - teacher logits (one elementwise pass)."""

    class MatmulFloor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, sh, sw, th, tw):
            h, t_h = sh.flatten(0, 1), th.flatten(0, 1)
            grad_h, grad_w = torch.empty_like(h), torch.zeros_like(sw)
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                g = (h[rows] @ sw.T).sub_(t_h[rows] @ tw.T)
                grad_h[rows] = g @ sw
                grad_w.addmm_(g.T, h[rows])
            ctx.grads = grad_h.view_as(sh), grad_w
            return sh.new_zeros(())

        @staticmethod
        def backward(ctx, _):
            return *ctx.grads, None, None

    return lambda sh, sw, th, tw, labels: MatmulFloor.apply(sh, sw, th, tw)


def run_worker(args, name, vocab, measure):
    """Time (median of --iters steps) and/or peak memory of one variant, after a warm-up step."""
    device = torch.device(device_type(args))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    scale = 2.0 / args.hidden**0.5  # logits with a standard deviation of about 2
    sh = randn(args.batch, args.seq_len, args.hidden).requires_grad_(True)
    sw = randn(vocab, args.hidden, scale=scale).requires_grad_(True)
    th, tw = randn(args.batch, args.seq_len, args.hidden), randn(vocab, args.hidden, scale=scale)
    labels = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g).to(device)
    loss_fn = build_loss(name, args)

    def step():
        sh.grad = sw.grad = None
        loss = loss_fn(sh, sw, th, tw, labels)
        loss.backward()
        return float(loss)

    result = {
        "variant": name,
        "vocab": vocab,
        "loss": step(),  # the warm-up step (and compilation)
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }
    baseline = peak_memory.reset_peak(device)
    times = []
    for _ in range(args.iters if measure != "memory" else 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if measure != "memory":
        result["time_ms"] = 1e3 * statistics.median(times)
    if measure != "time":
        result["peak_extra_mb"] = (peak_memory.peak(device) - baseline) / 2**20
    return result


def device_type(args):
    """ "cuda" or "cpu": --device, where auto means a GPU when there is one."""
    return (
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return "cpu"


# ---------------------------------------------------------------------------------------------
# Driver side: one process per (vocabulary, variant), then the ratio table.


# What glibc is told in each kind of CPU process (see the module docstring).
TIMING_MALLOC = CPU_MALLOC
MEMORY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_in_subprocess(argv, name, vocab, measure):
    cmd = [sys.executable, __file__, *argv, "--worker", f"{name}:{vocab}:{measure}"]
    env = dict(os.environ, **(TIMING_MALLOC if measure == "time" else MEMORY_MALLOC))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"variant": name, "vocab": vocab, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all(argv, args):
    """One result per (vocabulary, variant): the fastest of --rounds timings, and the memory."""
    runs = (["time", "memory"] if device_type(args) == "cpu" else ["both"]) + ["time"] * (
        args.rounds - 1
    )
    results = {}
    for measure in runs:
        for vocab in args.vocab:
            for name in args.variants:
                print(f"{measure}: {name} at V={vocab} ...", file=sys.stderr, flush=True)
                new = run_in_subprocess(argv, name, vocab, measure)
                old = results.setdefault((vocab, name), {"variant": name, "vocab": vocab})
                if "error" in new or "error" in old:
                    old.setdefault("error", f"{measure}: {new.get('error')}")
                    continue
                if "time_ms" in old and "time_ms" in new:
                    new["time_ms"] = min(old["time_ms"], new["time_ms"])
                old.update(new)
    return list(results.values())


def print_table(results, args):
    print(
        f"\nshapes: {args.batch}x{args.seq_len} tokens, H={args.hidden}, K={args.k}, beta={args.beta}, "
        f"chunk={args.chunk_size}; device: {results[0].get('device')}, dtype {results[0].get('dtype')}"
    )
    header = (
        f"{'vocab':>7} {'variant':<18} {'loss':>8} {'time ms':>9} {'- matmuls':>9} {'peak MB':>8} "
        f"{'t/liger':>7} {'t/fused_kl':>10} {'mem/liger':>9} {'mem/dense':>9}"
    )
    print(header)
    print("-" * len(header))

    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b else "-"

    for vocab in args.vocab:
        rows = {r["variant"]: r for r in results if r["vocab"] == vocab and "error" not in r}
        time_of = {name: r.get("time_ms") for name, r in rows.items()}
        mem_of = {name: r.get("peak_extra_mb") for name, r in rows.items()}

        def best(names, of):
            return min((of[n] for n in names if of.get(n) is not None), default=None)

        liger_t, liger_m = (
            best(("liger", "liger_compiled"), time_of),
            best(("liger", "liger_compiled"), mem_of),
        )
        fused_kl_t = best(("fused_kl", "fused_kl_compiled"), time_of)
        floor = time_of.get("matmuls")
        for r in results:
            if r["vocab"] != vocab:
                continue
            if "error" in r:
                print(f"{vocab:>7} {r['variant']:<18} failed: {r['error']}")
                continue
            t, m = r.get("time_ms"), r.get("peak_extra_mb")
            above = f"{t - floor:.1f}" if t is not None and floor is not None else "-"
            print(
                f"{vocab:>7} {r['variant']:<18} {r['loss']:>8.4f} {t:>9.1f} {above:>9} {m:>8.0f} "
                f"{ratio(t, liger_t):>7} {ratio(t, fused_kl_t):>10} {ratio(m, liger_m):>9} "
                f"{ratio(m, mem_of.get('dense')):>9}"
            )
    print(
        "- matmuls: time above the matmuls-only floor (the loss's own work); t/liger, mem/liger: against the "
        f"best Liger variant (eager or compiled); t/fused_kl: against the faster fused_kl variant; "
        f"time: fastest of {args.rounds} round(s), each the median of {args.iters} steps."
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        name, vocab, measure = args.worker.split(":")
        print(json.dumps(run_worker(args, name, int(vocab), measure)))
        return
    results = measure_all(argv, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    print_table(results, args)


if __name__ == "__main__":
    main()
