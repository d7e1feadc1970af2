#!/usr/bin/env python
"""How long a user waits for the error message of a typical mistake, now and at an older commit.

Each mistake is one command (`python -m tail_kd.cli ...`), run from the repository's root with
that tree's package first on the path; the time is from start to exit (each exits with status 2
and one line of error). The baseline, in the same run, is a bare Python start-up (`python -c
pass`), so that the ratios do not depend on the machine's speed:

    unknown --set key      tail-kd train RECIPE --set train.lr_sched=1
    bad --set value        tail-kd train RECIPE --set train.lr=fast
    missing recipe         tail-kd train no/such/recipe.yaml
    missing data           tail-kd train RECIPE --set data.source=no/such/data.jsonl
    eval without data      tail-kd eval MODEL_FOLDER (a model, no --data)

    python tools/bench_errors.py                      # this tree only
    python tools/bench_errors.py --before HEAD~3      # and that commit, in a temporary worktree
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/tiny/tad.yaml"
MISTAKES = {
    "unknown --set key": ["train", RECIPE, "--set", "train.lr_sched=1"],
    "bad --set value": ["train", RECIPE, "--set", "train.lr=fast"],
    "missing recipe": ["train", "no/such/recipe.yaml"],
    "missing data": ["train", RECIPE, "--set", "data.source=no/such/data.jsonl"],
    "eval without data": ["eval", "{model}"],
}


def seconds(command: list[str], cwd: Path, env: dict[str, str], repeats: int) -> tuple[float, str]:
    """Median wall time of `command` over `repeats` runs, and its last line of stderr."""
    times, last = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        last = (proc.stderr.strip().splitlines() or [f"(exit {proc.returncode}, no stderr)"])[-1]
    return statistics.median(times), last


def measure(tree: Path, model: Path, repeats: int) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(tree), "TAIL_KD_CACHE": str(model.parent / "cache")}
    results = {}
    for name, args in MISTAKES.items():
        args = [a.format(model=model) for a in args]
        took, error = seconds([sys.executable, "-m", "tail_kd.cli", *args], tree, env, repeats)
        results[name] = {"seconds": round(took, 2), "error": error[:160]}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="REV", help="also measure this commit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = scratch / "model"  # a real model folder for `eval`: the tiny teacher
        from tail_kd.models import build_tiny_pair

        teacher, _ = build_tiny_pair(scratch / "cache" / "tiny")
        model.symlink_to(teacher)
        baseline, _ = seconds([sys.executable, "-c", "pass"], REPO, dict(os.environ), args.repeats)
        report = {
            "python_start_seconds": round(baseline, 3),
            "now": measure(REPO, model, args.repeats),
        }
        if args.before:
            worktree = scratch / "before"
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), args.before],
                           cwd=REPO, check=True)  # fmt: skip
            try:
                report["before"] = measure(worktree, model, args.repeats)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO)
    print(f"python start-up: {report['python_start_seconds']:.3f} s (the baseline)")
    print(
        f"{'mistake':20s} {'now s':>7s} {'x start':>8s}"
        + (f" {'before s':>9s} {'x start':>8s}" if args.before else "")
    )
    for name, now in report["now"].items():
        line = f"{name:20s} {now['seconds']:7.2f} {now['seconds'] / baseline:8.1f}"
        if args.before:
            before = report["before"][name]["seconds"]
            line += f" {before:9.2f} {before / baseline:8.1f}"
        print(line)
        print(f"{'':20s} {now['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
