#!/usr/bin/env python
"""Benchmark the distillation loss: time of forward+backward and extra peak memory, per variant.

Each variant runs in its own process on the same shapes and seeds, so that peaks do not leak from
one into the next:

    dense          full [N, V] logits for both models + the dense TAD reference, autograd
    liger          Liger-Kernel's LigerFusedLinearJSDLoss, beta=0 (forward KL) + CE, eager
    liger_compiled the same with torch.compile (Liger's default)
    fused_kl       this project's fused loss, divergence="forward_kl" (vanilla KD) + CE, eager
    fused_tad      this project's fused loss, divergence="tad" (K, beta=2, normalised) + CE, eager
    *_compiled     the same with compile=True (its elementwise passes through torch.compile)

Memory is the peak above what the inputs hold (CUDA: max_memory_allocated; CPU: the process's
peak resident set, VmHWM, reset before the measured iterations, with glibc told to return every
large block to the system at once so that the resident set follows the live tensors). Usage:

    python tools/bench_loss.py                       # 2x1024 tokens, H=576, V=49152 and 151936
    python tools/bench_loss.py --vocab 49152 --iters 5 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("dense", "liger", "liger_compiled", "fused_kl", "fused_kl_compiled", "fused_tad", "fused_tad_compiled")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk (all fused variants)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Worker side: one variant, one vocabulary size, in a fresh process.


def build_loss(name, args, torch):
    """A function (s_hidden, s_weight, t_hidden, t_weight, labels) -> scalar loss."""
    if name == "dense":
        from tail_kd.losses import tad_divergence

        def dense(sh, sw, th, tw, labels):
            s_logits, t_logits = sh @ sw.T, th @ tw.T
            mask = labels != -100
            ce = torch.nn.functional.cross_entropy(s_logits.flatten(0, 1).float(), labels.flatten())
            div = tad_divergence(s_logits, t_logits, mask, k=args.k, beta=args.beta)
            return ce + div.sum() / mask.sum()

        return dense
    if name.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=0.0,
                                        compiled=name == "liger_compiled", chunk_size=args.chunk_size)
        return lambda sh, sw, th, tw, labels: liger(sh.flatten(0, 1), sw, th.flatten(0, 1), tw, labels.flatten())
    from tail_kd.losses import fused_tad_loss

    divergence = "forward_kl" if name.startswith("fused_kl") else "tad"
    k = args.k if divergence == "tad" else None
    return lambda sh, sw, th, tw, labels: fused_tad_loss(
        sh, sw, th, tw, labels, k=k, beta=args.beta, divergence=divergence, chunk_size=args.chunk_size,
        compile=name.endswith("_compiled"),
    ).loss


class PeakMemory:
    """Peak memory above a baseline: CUDA allocator statistics, or the CPU process's VmHWM."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def _current_and_peak(self):
        if self.cuda:
            return self.torch.cuda.memory_allocated(), self.torch.cuda.max_memory_allocated()
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

    def reset(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set
                f.write("5")
        self.baseline = self._current_and_peak()[0]

    def extra_peak(self):
        return self._current_and_peak()[1] - self.baseline


def run_worker(args, name, vocab):
    import torch

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
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
    loss_fn = build_loss(name, args, torch)
    memory = PeakMemory(torch, device)

    def step():
        sh.grad = sw.grad = None
        loss = loss_fn(sh, sw, th, tw, labels)
        loss.backward()
        return float(loss)

    step()  # warm-up (and compilation)
    memory.reset()
    times = []
    for _ in range(args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "variant": name, "vocab": vocab, "loss": loss, "time_ms": 1e3 * statistics.median(times),
        "peak_extra_mb": memory.extra_peak() / 2**20, "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
    }


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return "cpu"


# ---------------------------------------------------------------------------------------------
# Driver side: one process per (vocabulary, variant), then the ratio table.


def run_in_subprocess(argv, name, vocab):
    cmd = [sys.executable, __file__, *argv, "--worker", f"{name}:{vocab}"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"variant": name, "vocab": vocab, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results, args):
    print(f"\nshapes: {args.batch}x{args.seq_len} tokens, H={args.hidden}, K={args.k}, beta={args.beta}, "
          f"chunk={args.chunk_size}; device: {results[0].get('device')}, dtype {results[0].get('dtype')}")
    header = f"{'vocab':>7} {'variant':<15} {'loss':>9} {'time ms':>9} {'peak MB':>9} {'t/liger':>8} {'t/fused_kl':>10} {'mem/liger':>9} {'mem/dense':>9}"
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        rows = {r["variant"]: r for r in results if r["vocab"] == vocab and "error" not in r}
        ligers = [rows[v] for v in ("liger", "liger_compiled") if v in rows]
        best_liger_t = min((r["time_ms"] for r in ligers), default=None)
        best_liger_m = min((r["peak_extra_mb"] for r in ligers), default=None)
        fused_kl_t = min((rows[v]["time_ms"] for v in ("fused_kl", "fused_kl_compiled") if v in rows), default=None)
        for r in results:
            if r["vocab"] != vocab:
                continue
            if "error" in r:
                print(f"{vocab:>7} {r['variant']:<15} failed: {r['error']}")
                continue

            def ratio(a, b):
                return f"{a / b:.2f}" if b else "-"

            print(f"{vocab:>7} {r['variant']:<15} {r['loss']:>9.4f} {r['time_ms']:>9.1f} {r['peak_extra_mb']:>9.0f} "
                  f"{ratio(r['time_ms'], best_liger_t):>8} {ratio(r['time_ms'], fused_kl_t):>10} "
                  f"{ratio(r['peak_extra_mb'], best_liger_m):>9} {ratio(r['peak_extra_mb'], rows.get('dense', {}).get('peak_extra_mb')):>9}")
    print("t/liger, mem/liger: against the best Liger variant (eager or compiled); t/fused_kl: against the "
          "faster fused_kl variant.")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        name, vocab = args.worker.split(":")
        print(json.dumps(run_worker(args, name, int(vocab))))
        return
    results = []
    for vocab in args.vocab:
        for name in args.variants:
            print(f"running {name} at V={vocab} ...", file=sys.stderr, flush=True)
            results.append(run_in_subprocess(argv, name, vocab))
    print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
