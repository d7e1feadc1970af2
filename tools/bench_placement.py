"""Step time of each placement, side by side, in one run: real `tail-kd train --nproc N` runs of
a recipe, one per (teacher placement, student ZeRO stage), one after the other on one machine.

    python tools/bench_placement.py recipes/quickstart.yaml --nproc 2 --steps 6 [--set ...]
    python tools/bench_placement.py RECIPE --nproc 8 --placements zero3/3 replicated/1 --gpu h100

Each run trains `--steps` optimizer steps (no evaluation, no checkpoint until the last step);
the speed is the median of `train/tokens_per_sec` over the steps after the first (which also
compiles and, under ZeRO-3, records the module trace). All runs see the same batches, so the
step-time ratio to the ZeRO-3/ZeRO-3 run (today's default everywhere but on GPUs) is the inverse
ratio of the speeds. With `--gpu NAME|auto|TFLOPS` it also prints the MFU: tokens/s x the matmul FLOPs
per token of `tail-kd plan`'s time model (tail_kd/cost_model.py) / (ranks x peak). For the phase
split of one placement, run tools/bench_train.py with its `--set parallel.*` values. Prints a
table, and writes it as JSON with `--json`.

On the CPU every placement runs the same arithmetic; what differs is what ZeRO gathers and
reduces, and when (tail_kd/placement.py), and ZeRO-3's hooks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tail_kd.config import add_override_argument, load_recipe  # noqa: E402
from tail_kd.monitor import read_scalars  # noqa: E402

BASELINE = "zero3/3"
PLACEMENTS = (BASELINE, "replicated/3", "zero3/2", "zero3/1", "replicated/2", "replicated/1")


def settings(placement: str) -> list[str]:
    """`replicated/1` -> the recipe values that select it."""
    teacher, stage = placement.split("/")
    return [f"parallel.teacher_placement={teacher}", f"parallel.student_zero_stage={stage}"]


def run(recipe: str, placement: str, args, work: Path) -> dict:
    out = work / placement.replace("/", "-")
    sets = [*settings(placement), f"train.steps={args.steps}", "eval.every=0",
            "checkpoint.every=0", "log.every=1", *args.overrides]  # fmt: skip
    command = [sys.executable, "-m", "tail_kd.cli", "train", recipe, "--nproc", str(args.nproc),
               "--output-dir", str(out), "--overwrite"]  # fmt: skip
    for value in sets:
        command += ["--set", value]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{placement}: tail-kd train failed\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    scalars = read_scalars(out / "tensorboard" / load_recipe(recipe, sets).run_name)
    rates = [value for step, value in scalars["train/tokens_per_sec"] if step > 1]
    return {"tokens_per_sec": statistics.median(rates), "steps_timed": len(rates)}


def flops_per_token(recipe_path: str, overrides: list[str], nproc: int) -> float:
    """The time model's matmul FLOPs per trained token (tail_kd/cost_model.py)."""
    from tail_kd.cost_model import micro_batch_flops
    from tail_kd.memory_plan import NO_TEACHER, model_shape, plan_configs, setup_of

    recipe = load_recipe(recipe_path, overrides)
    teacher, student = plan_configs(recipe)
    setup = setup_of(recipe, device="cuda", gpus=nproc, gpus_per_node=nproc)
    teacher = NO_TEACHER if teacher is None else model_shape(teacher)
    flops = micro_batch_flops(model_shape(student), teacher, setup, setup.micro_batch_size)
    return flops["total"] / (setup.micro_batch_size * setup.seq_len)


def peak_tflops(gpu: str) -> float:
    """`--gpu`: a name of `tail-kd plan --gpu`, `auto` (this machine's GPU 0) or TFLOP/s."""
    from tail_kd.cost_model import GPUS

    if gpu == "auto":
        import torch

        name = torch.cuda.get_device_name(0).lower()
        known = [key for key in GPUS if key in name]
        if not known:
            sys.exit(f"--gpu auto: {name} is not one of {', '.join(GPUS)}; give its peak TFLOP/s")
        return GPUS[known[0]]
    return GPUS.get(gpu.lower()) or float(gpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--placements",
        nargs="+",
        default=list(PLACEMENTS),
        help=f"TEACHER/STAGE pairs (default: all six; {BASELINE} is always run, as the baseline)",
    )
    parser.add_argument(
        "--gpu", help="for the MFU: a GPU name of `tail-kd plan --gpu`, auto, or its peak TFLOP/s"
    )
    parser.add_argument("--json", type=Path)
    add_override_argument(parser)
    args = parser.parse_args()
    placements = [BASELINE] + [p for p in args.placements if p != BASELINE]
    for placement in placements:  # a bad pair fails here, before any run
        load_recipe(args.recipe, [*settings(placement), *args.overrides])
    with tempfile.TemporaryDirectory(prefix="bench-placement-") as work:
        results = {p: run(args.recipe, p, args, Path(work)) for p in placements}
    base = results[BASELINE]["tokens_per_sec"]
    peak = None
    if args.gpu:
        peak = peak_tflops(args.gpu)
        per_token = flops_per_token(args.recipe, args.overrides, args.nproc)
    print(
        f"{args.recipe}, {args.nproc} ranks, {args.steps} steps (median of steps 2..{args.steps})"
    )
    header = "| teacher | student | tokens / s | step time / ZeRO-3 + ZeRO-3's |"
    print(header + (" MFU |" if peak else "") + "\n" + "|---" * (4 + bool(peak)) + "|")
    for placement, result in results.items():
        teacher, stage = placement.split("/")
        result["step_time_ratio_to_zero3"] = base / result["tokens_per_sec"]
        line = (f"| {teacher} | ZeRO-{stage} | {result['tokens_per_sec']:.1f} | "
                f"{result['step_time_ratio_to_zero3']:.3f} |")  # fmt: skip
        if peak:
            result["mfu"] = result["tokens_per_sec"] * per_token / (args.nproc * peak * 1e12)
            line += f" {result['mfu']:.1%} |"
        print(line)
    if args.json:
        args.json.write_text(
            json.dumps({"recipe": args.recipe, "nproc": args.nproc, **results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
