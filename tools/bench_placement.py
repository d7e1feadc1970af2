"""Step time of each teacher placement, side by side, in one run: real `tail-kd train --nproc N`
runs of a recipe, one per `parallel.teacher_placement`, one after the other on the same machine.

    python tools/bench_placement.py recipes/quickstart.yaml --nproc 2 --steps 6 [--set ...]

Each run trains `--steps` optimizer steps (no evaluation, no checkpoint until the last step);
the speed is the median of `train/tokens_per_sec` over the steps after the first (which also
compiles and, under ZeRO-3, records the module trace). Both runs see the same batches, so the
step-time ratio to ZeRO-3 is the inverse ratio of the speeds. Prints a table, and writes it as
JSON with `--json`. On the CPU both placements run the same arithmetic; what differs is ZeRO-3's gathering
of the teacher's weights at every forward (and its hooks).
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

PLACEMENTS = ("zero3", "replicated")


def run(recipe: str, placement: str, args, work: Path) -> dict:
    out = work / placement
    sets = [f"parallel.teacher_placement={placement}", f"train.steps={args.steps}",
            "eval.every=0", "checkpoint.every=0", "log.every=1",
            *args.overrides]  # fmt: skip
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path)
    add_override_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-placement-") as work:
        results = {
            placement: run(args.recipe, placement, args, Path(work)) for placement in PLACEMENTS
        }
    base = results["zero3"]["tokens_per_sec"]
    print(
        f"{args.recipe}, {args.nproc} ranks, {args.steps} steps (median of steps 2..{args.steps})"
    )
    print("| teacher placement | tokens / s | step time / ZeRO-3's |\n|---|---|---|")
    for placement, result in results.items():
        result["step_time_ratio_to_zero3"] = base / result["tokens_per_sec"]
        print(f"| {placement} | {result['tokens_per_sec']:.1f} | "
              f"{result['step_time_ratio_to_zero3']:.3f} |")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"recipe": args.recipe, "nproc": args.nproc, **results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
