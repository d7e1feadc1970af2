"""The `tail-kd` command: `train`, `status`, `export`, `eval`, `prepare-data`, `cache-teacher`,
`plan`, `sweep` and `report`.

    tail-kd train RECIPE.yaml [--nproc N] [train options]    (see `python -m tail_kd.train -h`)
    tail-kd status RUN_DIR [--json | --shell]
    tail-kd export RUN_DIR OUT_DIR [--step N] [--dtype bfloat16]
    tail-kd eval MODEL_OR_RUN [--data RECIPE_OR_FILE] [--teacher PATH] [--gsm N] [--out FILE]
    tail-kd prepare-data RECIPE.yaml [--set KEY=VALUE ...]
    tail-kd cache-teacher RECIPE.yaml [--set KEY=VALUE ...] [--nproc N]
    tail-kd plan RECIPE.yaml [--gpus N] [--gpu-memory GB] [--gpu h100] [--tokens T] [--set ...]
    tail-kd sweep RECIPE.yaml --grid KEY=V1,V2 ... [--baselines] [--seeds S ...] --out DIR
                  [--nproc N | --slurm]                      (see tail_kd/sweep.py)
    tail-kd report RUN_OR_SWEEP_DIR... [--out DIR]

`train` runs in this process for one rank. With `--nproc N` it validates the recipe, then starts N
local ranks through the DeepSpeed launcher (`deepspeed --num_gpus N --module tail_kd.train ...`,
with `DS_ACCELERATOR=cpu` and `CPU_MALLOC` when the recipe runs on the CPU) and returns its exit
status; SIGUSR1 and SIGTERM sent to `tail-kd` are passed on to the ranks (see tail_kd/train.py for
what they do); a finished run whose recipe names `eval.tasks` is then benchmarked (`tail-kd eval
RUN_DIR --final`). For multi-node jobs use the launchers directly (slurm/).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import psutil

__all__ = ["main", "CPU_MALLOC", "launch_ranks"]

USAGE = __doc__.split("\n\n")[1]

# On the CPU, glibc hands every freed block over 32 MiB back to the kernel, which zeroes the pages
# again at the next allocation: the loss's [tokens, vocab] buffers then cost as much system time as
# computing them (SmolLM2 quickstart: 1.4 s of 3.4 s per micro-batch). Keeping freed memory in the
# heap halves the loss's time. Set for the ranks that `--nproc` starts, unless already set; export
# them yourself for other launchers on the CPU.
CPU_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command == "status":
        from tail_kd.run_dir import main as status_main

        return status_main(rest)
    if command == "export":
        from tail_kd.export import main as export_main

        return export_main(rest)
    if command == "eval":
        from tail_kd.eval.command import main as eval_main

        return eval_main(rest)
    if command == "prepare-data":
        from tail_kd.prepare import main as prepare_main

        return prepare_main(rest)
    if command == "cache-teacher":
        from tail_kd.cache_teacher import main as cache_teacher_main

        return cache_teacher_main(rest)
    if command == "plan":
        from tail_kd.memory_plan import main as plan_main

        return plan_main(rest)
    if command == "sweep":
        from tail_kd.sweep import main as sweep_main

        return sweep_main(rest)
    if command == "report":
        from tail_kd.report import main as report_main

        return report_main(rest)
    print(f"tail-kd: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


def _train(argv: list[str]) -> int:
    from tail_kd import train
    from tail_kd.config import RecipeError
    from tail_kd.exit_status import EXIT_USAGE
    from tail_kd.run_dir import read_done

    parser = train.build_parser(prog="tail-kd train")
    parser.add_argument(
        "--nproc", type=int, metavar="N", help="start N local ranks through the DeepSpeed launcher"
    )
    args = parser.parse_args(argv)
    options, nproc = train.TrainOptions.from_namespace(args), args.nproc
    if nproc is None:
        return train.run(options)
    try:  # the recipe and its batch split, checked before any process starts
        recipe = train.load_options_recipe(options)
        recipe.check_world_size(nproc)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    from tail_kd.distributed import resolve_device

    launcher = launch_ranks(
        "tail_kd.train", _without_nproc(argv), nproc, resolve_device(recipe.device)
    )
    _forward_signals_to_ranks(launcher)
    status = launcher.wait()
    if status == 0 and recipe.eval.tasks and read_done(Path(recipe.output_dir)) is not None:
        from tail_kd.eval.command import main as eval_main

        return eval_main([recipe.output_dir, "--final"])  # the recipe's benchmarks
    return status


def launch_ranks(module: str, argv: list[str], nproc: int, device: str) -> subprocess.Popen:
    """`python -m module argv` on `nproc` local ranks through the DeepSpeed launcher (started,
    not waited for), with `DS_ACCELERATOR=cpu` and `CPU_MALLOC` (unless set) on the CPU."""
    from tail_kd.topology import free_port

    env = dict(os.environ)
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", **{k: v for k, v in CPU_MALLOC.items() if k not in env})
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
        "--master_port", str(free_port()), "--module", module, *argv,
    ]  # fmt: skip
    return subprocess.Popen(command, env=env)


def _without_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N` (the ranks' own command line)."""
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    return rest


def _forward_signals_to_ranks(launcher: subprocess.Popen) -> None:
    """Pass SIGUSR1/SIGTERM on to the rank processes only: the DeepSpeed launcher processes in
    between would die of SIGUSR1, and on SIGTERM kill the ranks 30 s later, checkpoint or not."""

    def is_rank(process: psutil.Process) -> bool:
        cmdline = process.cmdline()
        return "-m" in cmdline[:-1] and cmdline[cmdline.index("-m") + 1] == "tail_kd.train"

    def forward(signum: int, _frame: object) -> None:
        for process in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if is_rank(process):
                    process.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)


if __name__ == "__main__":
    sys.exit(main())
