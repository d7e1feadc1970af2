"""`tail-kd sweep`: a grid of recipe values (the paper's K x beta ablation), one training run per
point and seed, one after another here or as a Slurm job array.

    tail-kd sweep RECIPE --grid loss.k=1,5,10,20 loss.beta=0.5,1,2,5,10 --baselines \\
                  --seeds 0 1 2 --out runs/k-beta [--set KEY=VALUE ...] [--nproc N]
    tail-kd sweep ... --slurm [--sbatch "--partition=gpu --time=12:00:00"] [--max-parallel P]
    tail-kd report runs/k-beta                  # the table and plots (tail_kd/report.py)

Points. The Cartesian product of the `--grid` values (KEY=V1,V2,...: any recipe field), times the
seeds (`--seeds`, default the recipe's `seed`). `--baselines` adds CE only, vanilla KD and reverse
KL (`--baselines kd rkl`: those named), per seed; the grid's `loss.*` keys are TAD's and are left
at the recipe's values for them, its other keys are crossed in. With baselines the grid points
train `loss.divergence=tad` (unless the grid sets it). Each point is one `tail-kd train RECIPE`
with `--set` of its values, `run_name=<point>` and its own run directory OUT/runs/<point>:

    k5-beta2-s0    loss.k=5 loss.beta=2 seed=0 (loss.divergence=tad)
    kd-s0          loss.divergence=forward_kl seed=0

Every point's recipe is checked before anything runs or is submitted.

The sweep directory OUT holds sweep.json: the recipe (absolute path and sha256), the working
directory the runs start in (the recipe's relative paths are relative to it), the shared `--set`
values, the grid, the points. The first `tail-kd sweep` writes it; running the same command again
continues the sweep: finished points are skipped and the others resume from their newest
complete checkpoint (a point that never started starts). Other arguments for an existing OUT are
refused, and so is a recipe file that changed since the sweep began: a sweep is one experiment.

Here (the default): the unfinished points one after another, each `tail-kd train --nproc N` (or
one process without --nproc). With --slurm: one `sbatch --array=<unfinished points>
slurm/sweep.sbatch OUT` (job logs in OUT/logs/); each array task asks `python -m tail_kd.sweep
point OUT INDEX` for its training arguments and trains like slurm/train_single_gpu.sbatch
(preemption: checkpoint, requeue, resume in the same run directory).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from tail_kd.config import RecipeError, add_override_argument, load_recipe
from tail_kd.exit_status import EXIT_USAGE, UsageError
from tail_kd.run_dir import run_status, write_json

__all__ = ["BASELINES", "Point", "Sweep", "parse_grid", "expand", "main"]

SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"
# The paper's baselines (MiniPLM, a data-selection method, is not part of this project).
BASELINES = {"ce": "none", "kd": "forward_kl", "rkl": "reverse_kl"}
SBATCH_SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "sweep.sbatch"


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its name (its run directory's) and its `--set` values."""

    name: str
    sets: tuple[str, ...]


@dataclass(frozen=True)
class Sweep:
    """A sweep directory's sweep.json (module docstring)."""

    root: Path
    recipe: str  # absolute path
    recipe_sha256: str
    workdir: str  # absolute: where the runs start
    sets: tuple[str, ...]  # --set values of every point
    grid: dict[str, list[str]]
    baselines: tuple[str, ...]
    seeds: tuple[int, ...]
    points: tuple[Point, ...]

    @staticmethod
    def is_sweep_dir(path: Path) -> bool:
        return (Path(path) / SWEEP_FILE).is_file()

    @classmethod
    def load(cls, root: Path) -> Sweep:
        data = json.loads((Path(root) / SWEEP_FILE).read_text())
        points = tuple(Point(p["name"], tuple(p["sets"])) for p in data.pop("points"))
        return cls(
            root=Path(root),
            recipe=data["recipe"],
            recipe_sha256=data["recipe_sha256"],
            workdir=data["workdir"],
            sets=tuple(data["sets"]),
            grid=data["grid"],
            baselines=tuple(data["baselines"]),
            seeds=tuple(data["seeds"]),
            points=points,
        )

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "root"}
        write_json(self.root / SWEEP_FILE, data)

    def same_experiment(self, other: Sweep) -> bool:
        keys = ("recipe", "sets", "grid", "baselines", "seeds", "points")
        return all(getattr(self, key) == getattr(other, key) for key in keys)

    def run_dir(self, point: Point) -> Path:
        return self.root.resolve() / RUNS_DIR / point.name

    def run_dirs(self) -> list[Path]:
        return [self.run_dir(point) for point in self.points]

    def train_args(self, point: Point) -> list[str]:
        """`tail-kd train` arguments of `point` (without `--nproc`)."""
        args = [self.recipe, "--output-dir", str(self.run_dir(point)), "--resume"]
        for value in (*self.sets, *point.sets, f"run_name={point.name}"):
            args += ["--set", value]
        return args

    def check_recipe(self) -> None:
        """UsageError when the recipe file is gone or changed since the sweep began."""
        path = Path(self.recipe)
        if not path.is_file():
            raise UsageError(f"{self.root / SWEEP_FILE}: its recipe {path} no longer exists")
        if _sha256(path) != self.recipe_sha256:
            raise UsageError(
                f"{path} changed since the sweep in {self.root} began: its points would not "
                "train the same recipe. Restore the file, or start a new sweep (another --out)"
            )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """["loss.k=1,5", "loss.beta=1,2"] -> {"loss.k": ["1", "5"], "loss.beta": ["1", "2"]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        split = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(split):
            raise UsageError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. loss.k=1,5,10)")
        if key in grid:
            raise UsageError(f"--grid names {key} twice: give all its values in one KEY=V1,V2")
        if len(set(split)) < len(split):
            raise UsageError(f"--grid {item!r}: a value is repeated")
        grid[key] = split
    return grid


def _token(key: str, value: str) -> str:
    """`loss.beta`, `0.5` -> `beta0.5`: a file-name-safe part of a point's name."""
    return key.rsplit(".", 1)[-1] + re.sub(r"[^A-Za-z0-9.+-]+", "_", value)


def expand(
    grid: dict[str, list[str]], baselines: Sequence[str], seeds: Sequence[int]
) -> list[Point]:
    """The points, seed-major order (every point of seed 0 first: an interrupted sweep has a
    first complete seed early)."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    methods: list[tuple[str, dict[str, str]]] = []
    for combo in combos:
        values = dict(combo)
        if baselines and "loss.divergence" not in values:
            values["loss.divergence"] = "tad"
        methods.append(("-".join(_token(k, v) for k, v in combo.items()), values))
    crossed = {k: v for k, v in grid.items() if not k.startswith("loss.")}
    others = [dict(zip(crossed, values)) for values in itertools.product(*crossed.values())]
    for baseline in baselines:
        for combo in others:
            name = "-".join([baseline, *(_token(k, v) for k, v in combo.items())])
            methods.append((name, {"loss.divergence": BASELINES[baseline], **combo}))
    return [
        Point(f"{name}-s{seed}", (*(f"{k}={v}" for k, v in values.items()), f"seed={seed}"))
        for seed in seeds
        for name, values in methods
    ]


def plan(args: argparse.Namespace) -> Sweep:
    """The sweep the command line asks for, every point's recipe checked; the one already in
    `--out` when it is the same experiment (UsageError when it is another)."""
    recipe_path = Path(args.recipe).resolve()
    base = load_recipe(recipe_path, args.overrides)  # the recipe and the shared --set
    grid = parse_grid(args.grid or [])
    baselines = tuple(dict.fromkeys(args.baselines or ()))
    if not grid and not baselines:
        raise UsageError("nothing to sweep: give --grid KEY=V1,V2,... and/or --baselines")
    seeds = tuple(dict.fromkeys(args.seeds)) if args.seeds else (base.seed,)
    points = expand(grid, baselines, seeds)
    for point in points:
        try:
            load_recipe(recipe_path, [*args.overrides, *point.sets])
        except RecipeError as error:
            raise RecipeError(f"point {point.name} ({' '.join(point.sets)}): {error}") from None
    sweep = Sweep(
        root=Path(args.out),
        recipe=str(recipe_path),
        recipe_sha256=_sha256(recipe_path),
        workdir=os.getcwd(),
        sets=tuple(args.overrides),
        grid=grid,
        baselines=baselines,
        seeds=seeds,
        points=tuple(points),
    )
    if Sweep.is_sweep_dir(sweep.root):
        existing = Sweep.load(sweep.root)
        if not existing.same_experiment(sweep):
            raise UsageError(
                f"{sweep.root} holds another sweep ({existing.root / SWEEP_FILE}): continue it "
                "with the command that began it, or choose another --out"
            )
        existing.check_recipe()
        return existing
    if sweep.root.exists() and any(sweep.root.iterdir()):
        raise UsageError(f"--out {sweep.root} is not empty and holds no sweep: choose another")
    sweep.save()
    return sweep


def report_states(sweep: Sweep) -> list[int]:
    """Print each point's state; return the indices of the unfinished ones."""
    unfinished, counts = [], {}
    for index, point in enumerate(sweep.points):
        status = run_status(sweep.run_dir(point))
        counts[status.state] = counts.get(status.state, 0) + 1
        if status.state != "finished":
            unfinished.append(index)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    print(f"sweep {sweep.root}: {len(sweep.points)} points ({summary})", flush=True)
    return unfinished


def run_here(sweep: Sweep, unfinished: list[int], nproc: int | None) -> int:
    """Train the unfinished points one after another; 0 when every point has finished."""
    failed = []
    for done, index in enumerate(unfinished, 1):
        point = sweep.points[index]
        command = [sys.executable, "-m", "tail_kd.cli", "train", *sweep.train_args(point)]
        command += [] if nproc is None else ["--nproc", str(nproc)]
        print(f"[{done}/{len(unfinished)}] {point.name}: {shlex.join(command[2:])}", flush=True)
        status = subprocess.run(command, cwd=sweep.workdir).returncode
        if run_status(sweep.run_dir(point)).state != "finished":
            print(f"{point.name}: training stopped with status {status}", file=sys.stderr)
            failed.append(point.name)
    if failed:
        print(f"not finished: {', '.join(failed)}; run the same command again to resume them")
        return 1
    print(f"every point has finished: tail-kd report {sweep.root}")
    return 0


def _array_spec(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (sbatch --array)."""
    ranges = []
    for _, run in itertools.groupby(enumerate(indices), lambda pair: pair[1] - pair[0]):
        values = [v for _, v in run]
        ranges.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(ranges)


def submit(sweep: Sweep, unfinished: list[int], sbatch: Sequence[str], parallel: int | None) -> int:
    """One Slurm job array over the unfinished points (slurm/sweep.sbatch)."""
    if shutil.which("sbatch") is None:
        raise UsageError("--slurm: sbatch is not on PATH (run this on a Slurm login node)")
    if not SBATCH_SCRIPT.is_file():
        raise UsageError(f"--slurm needs {SBATCH_SCRIPT}: install tail-kd from a clone of its "
                         "repository (pip install -e .)")  # fmt: skip
    array = _array_spec(unfinished) + (f"%{parallel}" if parallel else "")
    logs = sweep.root.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = [
        "sbatch", "--parsable", f"--array={array}", f"--job-name=tail-kd-sweep-{sweep.root.name}",
        f"--output={logs}/%x-%A_%a.out", f"--chdir={sweep.workdir}", *sbatch,
        str(SBATCH_SCRIPT), str(sweep.root.resolve()),
    ]  # fmt: skip
    env = {**os.environ, "TAIL_KD_REPO": str(SBATCH_SCRIPT.parent.parent)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"error: {shlex.join(command)} failed:\n{proc.stderr}", file=sys.stderr)
        return proc.returncode
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job array {job} ({len(unfinished)} points: {array}); logs in {logs}")
    print(f"watch: squeue -j {job}; tensorboard --logdir {sweep.root / RUNS_DIR}; "
          f"when done: tail-kd report {sweep.root}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tail-kd sweep",
        description="One training run per grid point and seed (tail_kd/sweep.py).",
    )
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument(
        "--grid",
        nargs="+",
        metavar="KEY=V1,V2",
        help="recipe field and its values, e.g. loss.k=1,5",
    )
    parser.add_argument(
        "--baselines", nargs="*", choices=sorted(BASELINES), metavar="NAME",
        help="add CE only (ce), vanilla KD (kd), reverse KL (rkl): all three, or those named",
    )  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the recipe's)")
    add_override_argument(parser)
    parser.add_argument("--out", required=True, type=Path, help="the sweep directory")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--nproc", type=int, metavar="N", help="ranks per point, here")
    where.add_argument("--slurm", action="store_true", help="submit a Slurm job array instead")
    parser.add_argument(
        "--sbatch", action="append", default=[], metavar="ARGS",
        help="with --slurm: sbatch options, e.g. \"--partition=gpu --time=8:00:00\"",
    )  # fmt: skip
    parser.add_argument(
        "--max-parallel", type=int, metavar="P", help="with --slurm: at most P tasks at a time"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["point"]:
        return point_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.sbatch or args.max_parallel) and not args.slurm:
        parser.error("--sbatch and --max-parallel go with --slurm")
    if args.baselines == []:  # `--baselines` alone: all of them
        args.baselines = list(BASELINES)
    try:
        sweep = plan(args)
        unfinished = report_states(sweep)
        if not unfinished:
            print(f"every point has finished: tail-kd report {sweep.root}")
            return 0
        if args.slurm:
            sbatch = [option for group in args.sbatch for option in shlex.split(group)]
            return submit(sweep, unfinished, sbatch, args.max_parallel)
        return run_here(sweep, unfinished, args.nproc)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


def point_main(argv: Sequence[str]) -> int:
    """`python -m tail_kd.sweep point OUT INDEX`: the training arguments of point INDEX, one per
    line (slurm/sweep.sbatch reads them)."""
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m tail_kd.sweep point SWEEP_DIR INDEX", file=sys.stderr)
        return EXIT_USAGE
    root, index = Path(argv[0]), int(argv[1])
    try:
        if not Sweep.is_sweep_dir(root):
            raise UsageError(f"{root}: no {SWEEP_FILE} (not a sweep directory)")
        sweep = Sweep.load(root)
        if index >= len(sweep.points):
            raise UsageError(f"{root} has {len(sweep.points)} points; there is no point {index}")
        sweep.check_recipe()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(sweep.train_args(sweep.points[index])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
