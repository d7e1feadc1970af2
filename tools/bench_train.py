#!/usr/bin/env python
"""Benchmark a training step: the KD step against a student-only step, and where the time goes.

One process builds the recipe's teacher and student exactly as `tail-kd train` does (the engines
of the placement it chooses, or of `--set parallel.teacher_placement=... parallel.student_zero_
stage=...`; the recipe's batch and sequence length) and then times, on the same micro-batches:

    teacher forward      what a plain teacher forward computes: the teacher's engine (input ids
                         -> final hidden states), then logits for every token
    step <divergence>    teacher forward + student forward + fused loss + backward + optimizer step,
                         for each loss in --losses (tad, forward_kl, reverse_kl)
    student-only (CE)    student forward + CE (fused, no teacher) + backward + optimizer step

and splits each KD step into its phases (device synchronised at each boundary): the teacher's
backbone forward, the student's backbone forward, the fused loss (both lm_head matmuls, the divergence and
the gradients it forms in the same pass), the backward through the student, the optimizer step.

Tokens per second count the tokens of the micro-batch. Model FLOPs utilisation (MFU) counts the
model's useful FLOPs per step (PaLM, Chowdhery et al. 2022, appendix B, per token):

    student   6 N_s + 12 L_s H_s T      (forward + backward; N without the embedding and lm_head)
    lm_heads  6 V H_s + 2 V H_t         (student logits forward + both gradients; teacher logits)
    teacher   2 N_t + 4 L_t H_t T       (forward only; + 2 V H_t for the plain forward's logits)

against the device's peak (--peak-tflops; known GPUs by name, bf16 dense). The ratios that matter:
TAD / forward KL (the TAD step should cost what the vanilla-KD step costs) and the KD overhead
over the student-only step against the teacher forward alone.

With `--memory`, it also reports the peak memory of the whole run (loading included) next to
`tail-kd plan`'s estimate for the same recipe and micro-batch (tail_kd/memory_plan.py): on a GPU
the CUDA allocator's peak, on the CPU the peak resident set above the one before the models load
(run it with MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the resident set).

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
import peak_memory

from tail_kd.config import add_override_argument


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe")
    add_override_argument(p)
    p.add_argument(
        "--steps", type=int, default=5, help="timed steps per variant, after one warm-up"
    )
    p.add_argument("--losses", nargs="+", default=["tad", "forward_kl"])
    p.add_argument(
        "--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: known GPUs)"
    )
    p.add_argument(
        "--memory", action="store_true", help="compare the peak memory with tail-kd plan's estimate"
    )
    p.add_argument("--json", help="write the results to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    from tail_kd.config import load_recipe
    from tail_kd.distributed import init_distributed
    from tail_kd.topology import discover_topology

    # One rank, one micro-batch per optimizer step: each timed step is one forward + backward.
    recipe = load_recipe(args.recipe, args.overrides)
    recipe.train.global_batch_size = recipe.train.micro_batch_size
    ctx = init_distributed(recipe.device, discover_topology())

    from tail_kd.data.loader import DistillationLoader
    from tail_kd.data.prepared import build_datasets
    import deepspeed

    from tail_kd.deepspeed_config import model_dtype
    from tail_kd.distiller import Distiller, loss_function
    from tail_kd.heads import lm_head
    from tail_kd.pair import load_models, plan_models
    from tail_kd.placement import choose_placement

    plan = plan_models(recipe)
    train_set, _ = build_datasets(recipe.data, plan.tokenizer, recipe.data.cache_dir, recipe.seed)
    loader = DistillationLoader(train_set, recipe.train.micro_batch_size, 0, 1, recipe.seed)
    baseline = peak_memory.reset_peak(ctx.device)
    teacher, student = load_models(recipe, plan, model_dtype(recipe.teacher.dtype, ctx.device.type))
    device = ctx.device.type
    placement = choose_placement(recipe, ctx, plan.teacher_config, plan.student_config)
    distiller = Distiller(
        teacher,
        student,
        recipe=recipe,
        ctx=ctx,
        vocab_size=plan.vocab_size,
        loss_fn=loss_function(recipe.loss, plan, device, recipe.data),
        placement=placement,
    )
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
        """What a plain teacher forward computes: hidden states, then logits for every token."""
        with torch.no_grad():
            hidden, *_ = distiller.teacher(
                batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device)
            )
            head = lm_head(distiller.teacher_model)
            with deepspeed.zero.GatheredParameters([head]):
                torch.nn.functional.linear(hidden, head.data)

    phases = PhaseClock(sync)

    def kd_step(batch):
        with phases("forward"):
            out = distiller.forward(batch)
        with phases("backward"):
            distiller.backward(out["loss"])
        with phases("optimizer_step"):
            engine.step()

    def student_only_step(batch):
        out = engine(
            *(batch[key].to(ctx.device) for key in ("input_ids", "attention_mask", "labels")),
            None,
            None,
        )  # no teacher: CE only (the loss bound by use_loss("none"))
        engine.backward(out["loss"])
        engine.step()

    def use_loss(divergence, **bound):
        recipe.loss.divergence = divergence
        loss = functools.partial(loss_function(recipe.loss, plan, device, recipe.data), **bound)
        engine.module.loss_fn = phases.wrap("loss", loss)

    teacher_engine = distiller.teacher
    distiller.teacher = phases.wrap("teacher_backbone", teacher_engine)
    tokens = batches[0]["attention_mask"].numel()
    results = {"teacher_forward": timed(teacher_forward)}
    splits = {}
    for divergence in args.losses:
        use_loss(divergence)
        phases.reset()
        results[f"step_{divergence}"] = timed(kd_step)
        splits[divergence] = phases.split(skip_first=True)
    use_loss("none", k=None)  # CE without top-K diagnostics: the loss needs no teacher at all
    results["student_only"] = timed(student_only_step)

    flops = step_flops(plan, distiller.teacher_model.config, tokens, recipe.data.seq_len)
    peak = args.peak_tflops or peak_tflops(device)
    print(
        f"\n{args.recipe}: micro-batch {recipe.train.micro_batch_size} x {recipe.data.seq_len} tokens, "
        f"device {_device_name(device)}, {torch.get_num_threads()} threads"
    )
    print(f"{'phase':<22} {'seconds':>9} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7}")
    for name, seconds in results.items():
        work = flops["teacher"] if name == "teacher_forward" else flops["kd_step"]
        if name == "student_only":
            work = flops["student_only"]
        mfu = f"{work / seconds / 1e12 / peak:>7.1%}" if peak else f"{'-':>7}"
        print(
            f"{name:<22} {seconds:>9.3f} {tokens / seconds:>10.0f} {work / seconds / 1e12:>9.3f} {mfu}"
        )
    for divergence, split in splits.items():
        total = sum(split.values())
        print(f"\nKD step ({divergence}) by phase:")
        for name, seconds in split.items():
            print(f"  {name:<20} {seconds:>9.3f} s {seconds / total:>6.1%}")
    if "step_tad" in results and "step_forward_kl" in results:
        print(f"TAD step / forward-KL step: {results['step_tad'] / results['step_forward_kl']:.3f}")
    for divergence in args.losses:
        print(
            f"{divergence} step / student-only step: "
            f"{results[f'step_{divergence}'] / results['student_only']:.3f}"
        )
    if "step_tad" in results:
        overhead = results["step_tad"] - results["student_only"]
        print(
            f"KD overhead over student-only: {overhead:.3f} s = "
            f"{overhead / results['teacher_forward']:.2f} x the teacher forward "
            f"({results['teacher_forward']:.3f} s)"
        )
    report = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "tokens": tokens,
        "device": _device_name(device),
        "seconds": results,
        "phases": splits,
        "flops_per_step": flops,
        "peak_tflops": peak,
    }
    if args.memory:
        report["memory"] = compare_with_plan(
            recipe, plan, device, placement, peak_memory.peak(ctx.device) - baseline
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


class PhaseClock:
    """Wall time per named phase of a step, the device synchronised at each boundary.

    `with clock("backward"): ...` times a block; `clock.wrap(name, fn)` times every call of `fn`
    (nested phases are subtracted from the enclosing one, so the split adds up to the step)."""

    def __init__(self, sync):
        self.sync = sync
        self.steps = []
        self.stack = []

    def reset(self):
        self.steps = []

    def __call__(self, name):
        return _Phase(self, name)

    def wrap(self, name, fn):
        clock = self

        class Timed:
            def __call__(self, *args, **kwargs):
                with clock(name):
                    return fn(*args, **kwargs)

            def __getattr__(self, attr):
                return getattr(fn, attr)

        return Timed()

    def split(self, skip_first):
        """Median seconds per phase over the recorded steps (a step starts at each `forward`)."""
        steps = self.steps[1:] if skip_first else self.steps
        names = dict.fromkeys(name for step in steps for name in step)
        return {name: statistics.median(step.get(name, 0.0) for step in steps) for name in names}


class _Phase:
    def __init__(self, clock, name):
        self.clock, self.name = clock, name

    def __enter__(self):
        if self.name == "forward" or not self.clock.steps:
            self.clock.steps.append({})
        self.clock.sync()
        self.start, self.inner = time.perf_counter(), 0.0
        self.clock.stack.append(self)

    def __exit__(self, *exc):
        self.clock.sync()
        elapsed = time.perf_counter() - self.start
        self.clock.stack.pop()
        if self.clock.stack:
            self.clock.stack[-1].inner += elapsed
        name = "student_backbone" if self.name == "forward" else self.name
        step = self.clock.steps[-1]
        step[name] = step.get(name, 0.0) + elapsed - self.inner


def step_flops(plan, teacher_config, tokens, seq_len):
    """Model FLOPs of a KD step, a student-only step and a teacher forward (module docstring)."""

    def body(config):  # parameters without the embedding and lm_head; layers; width
        from tail_kd.memory_plan import model_shape

        shape = model_shape(config)
        heads = 1 if config.tie_word_embeddings else 2
        return (
            shape.parameters - heads * shape.vocab_rows * shape.hidden,
            shape.layers,
            shape.hidden,
        )

    (n_s, l_s, h_s), (n_t, l_t, h_t) = body(plan.student_config), body(teacher_config)
    vocab = plan.vocab_size
    student = tokens * (6 * n_s + 12 * l_s * h_s * seq_len + 6 * vocab * h_s)
    teacher = tokens * (2 * n_t + 4 * l_t * h_t * seq_len)
    teacher_logits = tokens * 2 * vocab * h_t
    return {
        "kd_step": student + teacher + teacher_logits,
        "student_only": student,
        "teacher": teacher + teacher_logits,
    }


# bf16 dense peak TFLOP/s by device name (vendor data sheets; SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def compare_with_plan(recipe, plan, device, placement, measured):
    """Print and return tail-kd plan's estimate for this one-rank run, at the placement it ran
    with, against the measured peak."""
    import dataclasses

    from tail_kd.memory_plan import estimate, model_shape, setup_of, with_placement

    setup = with_placement(
        setup_of(recipe, device=device, gpus=1, gpus_per_node=1),
        dataclasses.astuple(placement),
    )
    teacher = model_shape(plan.teacher_config)
    parts = estimate(
        model_shape(plan.student_config), teacher, setup, recipe.train.micro_batch_size
    )
    print(
        f"\npeak memory: measured {measured / 2**20:.0f} MiB, tail-kd plan estimates "
        f"{parts['total'] / 2**20:.0f} MiB (estimate / measured = {parts['total'] / measured:.2f})"
    )
    for name, value in parts.items():
        print(f"  {name:<22} {value / 2**20:>9.0f} MiB")
    return {"measured_bytes": measured, "estimate_bytes": parts}


if __name__ == "__main__":
    sys.exit(main())
