#!/usr/bin/env python
"""Benchmark a training step: the KD step against a student-only step, and where the time goes.

One process builds the recipe's teacher and student exactly as `tail-kd train` does (ZeRO-3
engines, the recipe's batch and sequence length) and then times, on the same micro-batches:

    teacher forward      the ZeRO-3 inference engine: input ids -> final hidden states
    step <divergence>    teacher forward + student forward + fused loss + backward + optimizer step,
                         for each loss in --losses (tad, forward_kl, reverse_kl)
    student-only (CE)    student forward + CE (fused, no teacher) + backward + optimizer step

With `--memory`, it also reports the peak memory of the whole run (loading included) next to
`tail-kd plan`'s estimate for the same recipe and micro-batch (tail_kd/memory_plan.py): on a GPU
the CUDA allocator's peak, on the CPU the peak resident set above the one before the models load
(run it with MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the resident set).

Tokens per second count the tokens of the micro-batch. The ratios are the ones that matter:
TAD / forward KL (the TAD step should cost what the vanilla-KD step costs) and the KD overhead
over the student-only step against the teacher forward alone.

    python tools/bench_train.py recipes/tiny/tad.yaml
    python tools/bench_train.py recipes/quickstart.yaml --steps 3 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings

import torch

from tail_kd.config import add_override_argument


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    add_override_argument(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant, after one warm-up")
    p.add_argument("--losses", nargs="+", default=["tad", "forward_kl"])
    p.add_argument("--memory", action="store_true", help="compare the peak memory with tail-kd plan's estimate")
    p.add_argument("--json", help="write the results to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    from tail_kd.config import load_recipe
    from tail_kd.distributed import discover_topology, init_distributed

    # One rank, one micro-batch per optimizer step: each timed step is one forward + backward.
    recipe = load_recipe(args.recipe, args.overrides)
    recipe.train.global_batch_size = recipe.train.micro_batch_size
    ctx = init_distributed(recipe.device, discover_topology())

    from tail_kd.data import DistillationLoader, build_datasets
    from tail_kd.engines import Distiller, loss_function, model_dtype
    from tail_kd.pair import load_models, plan_models

    plan = plan_models(recipe, ctx)
    train_set, _ = build_datasets(recipe.data, plan.teacher_tokenizer, recipe.data.cache_dir, recipe.seed)
    loader = DistillationLoader(train_set, recipe.train.micro_batch_size, 0, 1, recipe.seed)
    baseline = reset_peak_memory(ctx.device.type)
    teacher, student = load_models(recipe, plan, model_dtype(recipe.teacher.dtype, ctx.device.type))
    device = ctx.device.type
    distiller = Distiller(teacher, student, recipe, ctx, loss_function(recipe, plan.vocab_size, device))
    engine = distiller.student
    batches = [next(loader) for _ in range(args.steps + 1)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(step_fn):
        step_fn(batches[0])  # warm-up (and compilation)
        times = []
        for batch in batches[1:]:
            sync()
            start = time.perf_counter()
            step_fn(batch)
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def teacher_forward(batch):
        with torch.no_grad():
            distiller.teacher(batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device))

    def kd_step(batch):
        out = distiller.forward(batch)
        engine.backward(out["loss"])
        engine.step()

    def student_only_step(batch):
        out = engine(*(batch[key].to(ctx.device) for key in ("input_ids", "attention_mask", "labels")),
                     None, None)
        engine.backward(out["loss"])
        engine.step()

    def use_loss(divergence, **bound):
        recipe.loss.divergence = divergence
        engine.module.loss_fn = functools.partial(loss_function(recipe, plan.vocab_size, device), **bound)

    tokens = batches[0]["attention_mask"].numel()
    results = {"teacher_forward": timed(teacher_forward)}
    for divergence in args.losses:
        use_loss(divergence)
        results[f"step_{divergence}"] = timed(kd_step)
    use_loss("none", k=None)  # CE without top-K diagnostics: the loss needs no teacher at all
    results["student_only"] = timed(student_only_step)

    print(f"\n{args.recipe}: micro-batch {recipe.train.micro_batch_size} x {recipe.data.seq_len} tokens, "
          f"device {device}, {torch.get_num_threads()} threads")
    print(f"{'phase':<22} {'seconds':>9} {'tokens/s':>10}")
    for name, seconds in results.items():
        print(f"{name:<22} {seconds:>9.3f} {tokens / seconds:>10.0f}")
    if "step_tad" in results and "step_forward_kl" in results:
        print(f"TAD step / forward-KL step: {results['step_tad'] / results['step_forward_kl']:.3f}")
    if "step_tad" in results:
        overhead = results["step_tad"] - results["student_only"]
        print(f"KD overhead over student-only: {overhead:.3f} s = "
              f"{overhead / results['teacher_forward']:.2f} x the teacher forward "
              f"({results['teacher_forward']:.3f} s)")
    report = {"recipe": args.recipe, "overrides": args.overrides, "tokens": tokens, "device": device,
              "seconds": results}
    if args.memory:
        report["memory"] = compare_with_plan(recipe, plan, device, peak_memory(device) - baseline)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def reset_peak_memory(device):
    """Start measuring the peak here; return the baseline that the peak is measured above."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets the resident set's high-water mark
        f.write("5")
    return _proc_status_bytes("VmRSS")


def peak_memory(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def compare_with_plan(recipe, plan, device, measured):
    """Print and return tail-kd plan's estimate for this one-rank run against the measured peak."""
    from transformers import AutoConfig

    from tail_kd.memory_plan import estimate, model_shape, setup_of

    setup = setup_of(recipe, device=device, gpus=1, gpus_per_node=1)
    teacher = model_shape(AutoConfig.from_pretrained(plan.teacher_dir))
    parts = estimate(model_shape(plan.student_config), teacher, setup, recipe.train.micro_batch_size)
    print(f"\npeak memory: measured {measured / 2**20:.0f} MiB, tail-kd plan estimates "
          f"{parts['total'] / 2**20:.0f} MiB (estimate / measured = {parts['total'] / measured:.2f})")
    for name, value in parts.items():
        print(f"  {name:<22} {value / 2**20:>9.0f} MiB")
    return {"measured_bytes": measured, "estimate_bytes": parts}


if __name__ == "__main__":
    sys.exit(main())
