"""`tail-kd report RUN_DIR... [--out DIR] [--baseline NAME]`: results table and plots of a set of
runs (a sweep's, a study's, or any you name), mean +- spread over seeds.

    tail-kd report runs/sweep                   # a sweep directory: all its points' runs
    tail-kd report runs/kd-* runs/tad-*         # any run directories

Each run is read from what training left in its directory: the recipe it trained with (in its
newest complete checkpoint) and its TensorBoard curves (`train/*`, and `eval/*`: the held-out
metrics of tail_kd.eval at each evaluation, and the benchmarks of `eval.tasks`, `eval/tasks/*`,
written at the last step). Nothing is recomputed. Only finished runs are tabled; the others are
listed with their step.

Groups: runs whose recipes differ only in bookkeeping (seed, names, output and cache folders,
log and checkpoint settings) are seeds of one group. A group is named and labelled by its
objective (`ce`, `kd`, `rkl`, `tad-k10-b2`, `tad-k10-b2-raw`: as in tools/study.py) and by the
other recipe values that differ between groups (`-lr0.001`).

For a metric m with values x_1..x_n over a group's n seeds the table shows the mean and the
sample standard deviation, x_bar +- sqrt(sum (x_i - x_bar)^2 / (n - 1)); the best group per
metric in bold. Paired comparison: each group against a baseline group (vanilla KD when there is
one, else `--baseline`), seed by seed on the seeds both have: on how many seeds it is better, and
the mean and standard deviation of the differences d_s = m(group, s) - m(baseline, s).

Outputs in `--out` (default: <sweep dir>/report, or ./report): README.md (settings, tables,
figures), results.json (everything, per seed), results.md (the tables), and the PNG plots (with
matplotlib installed: `pip install tail-kd[study]`).

tools/study.py builds its own reports from these same pieces (`Group`, `summarise`, the tables,
the comparisons and the plots).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tail_kd.exit_status import EXIT_USAGE, UsageError
from tail_kd.run_dir import complete_checkpoints, is_run_dir, read_done, write_json

__all__ = [
    "METRICS",
    "LOWER_IS_BETTER",
    "Group",
    "RunResult",
    "read_run",
    "group_runs",
    "mean_std",
    "summarise",
    "markdown_table",
    "paired_comparisons",
    "paired_table",
    "comparisons",
    "save_figure",
    "plot_curves",
    "plot_eval_curves",
    "plot_k_beta",
    "main",
]

# Held-out metrics, in table order (tail_kd.eval.metrics and tail_kd/eval/maths.py).
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
# The table's columns: (metric, header, decimals, factor). Benchmarks (`tasks/<name>`) follow.
COLUMNS = (
    ("ce", "CE (nats)", 3, 1),
    ("perplexity", "perplexity", 1, 1),
    ("kl_to_teacher", "KL to teacher", 3, 1),
    ("top1_accuracy", "top-1 acc (%)", 1, 100),
    ("top1_agreement", "top-1 agree (%)", 1, 100),
    ("ece", "ECE (%)", 2, 100),
    ("full_ece", "Full-ECE (%)", 2, 100),
    ("gsm_accuracy", "maths acc (%)", 1, 100),
    ("gsm_strict_accuracy", "maths, #### only (%)", 1, 100),
)
# What the paired comparison covers: (metric, words, factor, unit).
COMPARED = (
    ("ce", "held-out CE", 1, "nats"),
    ("kl_to_teacher", "KL to the teacher", 1, "nats"),
    ("top1_accuracy", "top-1 accuracy", 100, "points"),
    ("ece", "top-1 ECE", 100, "points"),
    ("full_ece", "Full-ECE", 100, "points"),
)
BASELINE_LABELS = {
    "none": ("ce", "CE only"),
    "forward_kl": ("kd", "vanilla KD (forward KL)"),
    "reverse_kl": ("rkl", "reverse KL"),
}
# Recipe values that do not make runs different methods.
BOOKKEEPING = (
    "seed",
    "run_name",
    "output_dir",
    "cache_dir",
    "data.cache_dir",
    "log.",
    "checkpoint.",
)
OBJECTIVE = ("loss.divergence", "loss.k", "loss.beta", "loss.normalize")


# ---------------------------------------------------------------------------------------------
# Groups and runs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Runs of one method (seeds apart): a short name, a label for tables, its `loss.*` values
    (divergence; k, beta and normalize for TAD) and any other recipe values that set it apart."""

    name: str
    label: str
    loss: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tad(self) -> tuple[int, float] | None:
        """(K, beta) of a normalised TAD group (a point of the K x beta grid), else None."""
        if self.loss.get("divergence") != "tad" or not self.loss.get("normalize", True):
            return None
        return self.loss["k"], self.loss["beta"]


@dataclass(frozen=True)
class RunResult:
    """One run as training left it (module docstring)."""

    run_dir: Path
    recipe: dict[str, Any]
    step: int  # the newest complete checkpoint's
    finished: bool
    curves: dict[str, list[tuple[int, float]]]  # TensorBoard tag -> [(step, value)]

    @property
    def seed(self) -> int:
        return self.recipe["seed"]

    @property
    def metrics(self) -> dict[str, float]:
        """`eval/<name>` at the newest step that logged it, as <name> (`tasks/arc_easy`, ...)."""
        return {
            tag.removeprefix("eval/"): max(values)[1]
            for tag, values in self.curves.items()
            if tag.startswith("eval/") and values
        }


def read_run(run_dir: str | Path) -> RunResult:
    """What `run_dir` holds (UsageError when it is no run with a complete checkpoint)."""
    from tail_kd.monitor import read_scalars

    run_dir = Path(run_dir)
    checkpoints = complete_checkpoints(run_dir)
    if not is_run_dir(run_dir) or not checkpoints:
        raise UsageError(f"{run_dir}: not a run directory with a complete checkpoint")
    state = checkpoints[-1].trainer_state
    recipe = state["recipe"]
    logs = Path(state["tensorboard"]["log_dir"])
    if not logs.is_dir():  # the run was moved since: its own folder
        logs = run_dir / "tensorboard" / recipe["run_name"]
    done = read_done(run_dir)
    return RunResult(
        run_dir=run_dir,
        recipe=recipe,
        step=checkpoints[-1].step,
        finished=done is not None and done["step"] >= recipe["train"]["steps"],
        curves=read_scalars(logs) if logs.is_dir() else {},
    )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"k": 10}} -> {"loss.k": 10} (lists as tuples, hashable)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _method(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe values that tell methods apart (`BOOKKEEPING` left out)."""
    return {
        key: value
        for key, value in _flat(recipe).items()
        if not any(key == b or (b.endswith(".") and key.startswith(b)) for b in BOOKKEEPING)
    }


def _objective(loss: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Name, label and `Group.loss` of an objective; for TAD, K and beta named always and `-raw`
    for the un-normalised form."""
    divergence = loss["divergence"]
    if divergence in BASELINE_LABELS:
        return (*BASELINE_LABELS[divergence], {"divergence": divergence})
    name = f"tad-k{loss['k']}-b{loss['beta']:g}" + ("" if loss["normalize"] else "-raw")
    label = f"TAD K={loss['k']} beta={loss['beta']:g}" + (
        "" if loss["normalize"] else ", not normalised"
    )
    keys = ("divergence", "k", "beta", "normalize")
    return name, label, {key: loss[key] for key in keys}


def _token(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.]+", "_", text)


def group_runs(results: Iterable[RunResult]) -> tuple[list[Group], dict[str, dict[int, RunResult]]]:
    """The runs' groups (baselines first, then TAD by K and beta, then the rest) and, per group
    name, its runs by seed. Two runs of one group with the same seed: UsageError."""
    by_method: dict[tuple, list[RunResult]] = {}
    for result in results:
        key = tuple(sorted(_method(result.recipe).items(), key=lambda kv: kv[0]))
        by_method.setdefault(key, []).append(result)
    methods = [dict(key) for key in by_method]
    varying = {k for k in set().union(*methods) if len({repr(m.get(k)) for m in methods}) > 1}
    groups, runs = [], {}
    for key, members in by_method.items():
        values = dict(key)
        loss = {k.removeprefix("loss."): values[k] for k in OBJECTIVE}
        name, label, objective = _objective(loss)
        others = {k: values.get(k) for k in sorted(varying - set(OBJECTIVE))}
        name += "".join(f"-{k.rsplit('.', 1)[-1]}{_token(v)}" for k, v in others.items())
        label += "".join(f", {k}={v}" for k, v in others.items())
        while name in runs:  # the same objective, different in keys the name leaves out
            name += "+"
        seeds: dict[int, RunResult] = {}
        for result in members:
            if result.seed in seeds:
                raise UsageError(
                    f"{seeds[result.seed].run_dir} and {result.run_dir} are the same method with "
                    f"the same seed {result.seed}: report one of them"
                )
            seeds[result.seed] = result
        groups.append(Group(name, label, objective, others))
        runs[name] = dict(sorted(seeds.items()))

    def order(group: Group) -> tuple:
        baselines = list(BASELINE_LABELS)
        divergence = group.loss["divergence"]
        rank = baselines.index(divergence) if divergence in baselines else len(baselines)
        return (rank, group.tad or (math.inf, math.inf), group.name)

    groups.sort(key=order)
    return groups, {g.name: runs[g.name] for g in groups}


# ---------------------------------------------------------------------------------------------
# Statistics and tables
# ---------------------------------------------------------------------------------------------


def mean_std(values: Iterable[float | None]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value); None and NaN are dropped."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def metric_names(runs: dict[str, dict[int, dict]]) -> list[str]:
    """The metrics any run has: `METRICS` order, then the benchmarks (their average last)."""
    found = {name for per_seed in runs.values() for r in per_seed.values() for name in r["metrics"]}
    tasks = sorted(n for n in found if n.startswith("tasks/") and n != "tasks/average")
    return [m for m in METRICS if m in found] + tasks + [n for n in ["tasks/average"] if n in found]


def summarise(groups: Sequence[Group], runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per group with runs: label, loss, seeds, and {"mean", "std"} of every metric of
    `metric_names`. `runs`: group name -> seed -> {"metrics": {name: value}, ...}."""
    names = metric_names(runs)
    summary = {}
    for group in groups:
        per_seed = runs.get(group.name, {})
        if not per_seed:
            continue
        entry = {"label": group.label, "loss": group.loss, "seeds": sorted(per_seed)}
        for name in names:
            mean, std = mean_std([r["metrics"].get(name, math.nan) for r in per_seed.values()])
            entry[name] = {"mean": mean, "std": std}
        entry["train_seconds"] = mean_std([r.get("train_seconds") for r in per_seed.values()])[0]
        summary[group.name] = entry
    return summary


def _cell(stat: dict, digits: int, scale: float = 1.0) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return _number(mean * scale, digits) + (
        f" ± {_number(std * scale, digits)}" if std is not None else ""
    )


def _number(value: float, digits: int) -> str:
    """`digits` decimals, or two significant digits for a value too small to show with them."""
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10**-digits else f"{value:.2g}"


def _columns(summary: dict[str, dict]) -> list[tuple[str, str, int, float]]:
    """`COLUMNS` that some group has a value for, then one per benchmark."""

    def present(metric: str) -> bool:
        return any(metric in e and math.isfinite(e[metric]["mean"]) for e in summary.values())

    columns = [c for c in COLUMNS if present(c[0])]
    tasks = [m for e in summary.values() for m in e if m.startswith("tasks/")]
    for metric in dict.fromkeys(tasks):
        header = "benchmarks avg" if metric == "tasks/average" else metric.removeprefix("tasks/")
        columns.append((metric, f"{header} (%)", 1, 100))
    return columns


def markdown_table(summary: dict[str, dict], teacher: dict[str, Any] | None = None) -> str:
    """Mean +- standard deviation per group and metric (metrics nobody has are left out), the
    best group in bold, the teacher (an evaluation report) as a reference row."""
    columns = _columns(summary)
    header = (
        "| method | seeds | " + " | ".join(c[1] for c in columns) + " |\n"
        + "|---" * (len(columns) + 2) + "|\n"
    )  # fmt: skip
    best = _best(summary, [c[0] for c in columns])
    rows = []
    for name, entry in summary.items():
        cells = [
            f"**{cell}**" if best.get(metric) == name else cell
            for metric, cell in (
                (metric, _cell(entry.get(metric, {"mean": math.nan, "std": None}), digits, factor))
                for metric, _, digits, factor in columns
            )
        ]
        rows.append(f"| {entry['label']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    if teacher is not None:
        m = {**teacher["metrics"], "kl_to_teacher": 0.0, "top1_agreement": 1.0}
        cells = [
            _number(m[metric] * factor, digits) if metric in m else "n/a"
            for metric, _, digits, factor in columns
        ]
        rows.append("| *teacher (reference)* | - | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def _best(summary: dict[str, dict], metrics: Sequence[str]) -> dict[str, str]:
    """The best group per metric (by mean), for bold cells; none for a tie."""
    best = {}
    for metric in metrics:
        scored = [
            (entry[metric]["mean"], name)
            for name, entry in summary.items()
            if metric in entry and math.isfinite(entry[metric]["mean"])
        ]
        if metric == "gsm_accuracy":
            scored = [s for s in scored if s[0] > 0]
        if scored:
            pick = min if metric in LOWER_IS_BETTER else max
            value, name = pick(scored)
            if sum(v == value for v, _ in scored) == 1:
                best[metric] = name
    return best


def paired_comparisons(
    runs: dict[str, dict[int, dict]], baseline: str = "kd", compared: Iterable[str] | None = None
) -> dict[str, dict]:
    """Each group of `compared` (default: all but the baseline) against `baseline`, seed by seed
    (the seeds both have): per `COMPARED` metric, on how many seeds it is better, and the mean and
    sample standard deviation of its value minus the baseline's."""
    base = runs.get(baseline, {})
    names = [n for n in runs if n != baseline] if compared is None else list(compared)
    paired = {}
    for name in names:
        per_seed = runs.get(name, {})
        seeds = sorted(set(per_seed) & set(base))
        if not seeds:
            continue
        entry: dict[str, Any] = {"seeds": seeds}
        for metric, *_ in COMPARED:
            if any(metric not in r["metrics"] for r in (*per_seed.values(), *base.values())):
                continue
            diffs = [per_seed[s]["metrics"][metric] - base[s]["metrics"][metric] for s in seeds]
            mean, std = mean_std(diffs)
            wins = sum(d < 0 if metric in LOWER_IS_BETTER else d > 0 for d in diffs)
            entry[metric] = {"wins": wins, "mean_diff": mean, "std_diff": std, "diffs": diffs}
        paired[name] = entry
    return paired


def paired_table(paired: dict[str, dict], labels: dict[str, str], what: str = "TAD setting") -> str:
    """`paired_comparisons` as a table: wins / seeds, then the mean difference +- its std."""
    metrics = [c for c in COMPARED if any(c[0] in e for e in paired.values())]
    header = (
        f"| {what} | " + " | ".join(f"{words} ({unit})" for _, words, _, unit in metrics)
        + " |\n" + "|---" * (len(metrics) + 1) + "|\n"
    )  # fmt: skip
    rows = []
    for name, entry in paired.items():
        cells = []
        for metric, _, factor, _ in metrics:
            stat = entry.get(metric)
            if stat is None:
                cells.append("n/a")
                continue
            spread = f" ± {stat['std_diff'] * factor:.3f}" if stat["std_diff"] is not None else ""
            cells.append(
                f"{stat['wins']}/{len(entry['seeds'])} better, "
                f"{stat['mean_diff'] * factor:+.3f}{spread}"
            )
        rows.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def comparisons(
    paired: dict[str, dict], baseline: str = "vanilla KD", what: str = "TAD settings"
) -> list[str]:
    """One plain statement per metric, computed from `paired_comparisons`."""
    lines = []
    for metric, words, _, _ in COMPARED:
        entries = {n: e for n, e in paired.items() if metric in e}
        if not entries:
            continue
        every = [n for n, e in entries.items() if e[metric]["wins"] == len(e["seeds"])]
        none = [n for n, e in entries.items() if e[metric]["wins"] == 0]
        seeds = {len(e["seeds"]) for e in entries.values()}
        lines.append(
            f"- {words}: better than {baseline} on every seed: "
            f"{', '.join(every) or 'none'}; on no seed: {', '.join(none) or 'none'} "
            f"({len(entries)} {what}, {'/'.join(map(str, sorted(seeds)))} seeds each)."
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib)
# ---------------------------------------------------------------------------------------------


def method_colors(groups: Sequence[Group]) -> dict[str, Any]:
    import matplotlib

    base = {"ce": "black", "kd": "tab:blue", "rkl": "tab:orange", "tad-k10-b2-raw": "tab:brown"}
    others = [g.name for g in groups if g.name not in base]
    cmap = matplotlib.colormaps["viridis"]
    for i, name in enumerate(others):
        base[name] = cmap(0.15 + 0.8 * i / max(len(others) - 1, 1))
    return base


def save_figure(fig, out: Path, name: str, title: str | None = None) -> str:
    """Title `fig`, write it to out/name (PNG), close it; return `name`."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_curves(groups: Sequence[Group], curves: dict[str, dict], out: Path) -> list[str]:
    """Loss curves (train loss, CE and KL to the teacher per step) and tail masses over training,
    of one run per group (`curves`: group name -> TensorBoard tag -> [(step, value)])."""
    import matplotlib.pyplot as plt

    colors, written = method_colors(groups), []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for group in groups:
        tags = curves.get(group.name)
        if not tags:
            continue
        style = dict(color=colors[group.name], label=group.label, lw=1.5)
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
    written.append(
        save_figure(fig, out, "loss_curves.png", "Loss curves (first seed of each method)")
    )

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for group in groups:
        tags = curves.get(group.name)
        if not tags:
            continue
        k = group.loss.get("k", 10)
        style = dict(color=colors[group.name], lw=1.5)
        panel = axes[1] if group.tad and k != 10 else axes[0]
        if "train/student_tail_mass" in tags:
            steps, values = zip(*tags["train/student_tail_mass"], strict=True)
            panel.plot(steps, values, label=f"{group.label}: student", **style)
        if "train/teacher_tail_mass" in tags:
            steps, values = zip(*tags["train/teacher_tail_mass"], strict=True)
            panel.plot(steps, values, ls="--", label=f"{group.label}: teacher", **style)
    axes[0].set_title("tail mass outside the teacher's top-10 (K = 10)", fontsize=10)
    axes[1].set_title("TAD with other K (tail outside the top-K)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("probability mass")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    title = "Teacher (dashed) and student (solid) tail mass on training batches"
    written.append(save_figure(fig, out, "tail_mass.png", title))
    return written


def plot_eval_curves(groups: Sequence[Group], curves: dict[str, dict[int, dict]], out: Path):
    """Held-out CE and KL to the teacher during training (the trainer's `eval/*`), the mean over
    seeds per group, to show whether the students have converged; None if no run has them."""
    import matplotlib.pyplot as plt

    colors = method_colors(groups)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = False
    for group in groups:
        per_seed = [tags for tags in curves.get(group.name, {}).values() if "eval/ce" in tags]
        if not per_seed:
            continue
        for ax, tag in zip(axes, ("eval/ce", "eval/kl_to_teacher"), strict=True):
            series = [dict(tags[tag]) for tags in per_seed if tag in tags]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if steps:
                means = [sum(s[step] for s in series) / len(series) for step in steps]
                ax.plot(steps, means, "o-", ms=3, color=colors[group.name], label=group.label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(
        axes, ("held-out CE (nats)", "held-out KL(teacher || student) (nats)"), strict=True
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    title = "During training, on the trainer's held-out sequences (mean over seeds)"
    return save_figure(fig, out, "eval_curves.png", title)


def plot_k_beta(groups: Sequence[Group], summary: dict[str, dict], out: Path) -> str | None:
    """Each metric against K, one line per beta, with the baselines as horizontal lines; None
    without normalised TAD groups (or when other settings vary between them)."""
    import matplotlib.pyplot as plt

    tads = [g for g in groups if g.tad and g.name in summary and not g.settings]
    if not tads:
        return None
    panels = [
        (metric, title)
        for metric, title in (
            ("ce", "held-out CE (nats)"),
            ("kl_to_teacher", "KL to teacher (nats)"),
            ("ece", "ECE"),
            ("full_ece", "Full-ECE"),
        )  # fmt: skip
        if metric in summary[tads[0].name]
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    baseline_style = {"ce": ("black", "CE only"), "kd": ("tab:blue", "vanilla KD"),
                      "rkl": ("tab:orange", "reverse KL")}  # fmt: skip
    betas = sorted({g.tad[1] for g in tads})
    palette = ["tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive"]
    for ax, (metric, title) in zip(axes[0], panels, strict=True):
        for i, beta in enumerate(betas):
            points = sorted((g.tad[0], summary[g.name][metric]) for g in tads if g.tad[1] == beta)
            ax.errorbar(
                [k for k, _ in points],
                [s["mean"] for _, s in points],
                yerr=[s["std"] or 0.0 for _, s in points],
                marker="os^vD*"[i % 6],
                capsize=3,
                color=palette[i % len(palette)],
                label=f"TAD beta={beta:g}",
            )
        for name, (color, label) in baseline_style.items():
            if name in summary and metric in summary[name]:
                ax.axhline(summary[name][metric]["mean"], color=color, ls="--", lw=1, label=label)
        ax.set_xticks(sorted({g.tad[0] for g in tads}))
        ax.set_xlabel("K (teacher top-K kept as separate categories)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    title = (
        "TAD against K and beta (normalised; bars: +-1 standard deviation over seeds), "
        "baselines dashed; lower is better"
    )
    return save_figure(fig, out, "metric_vs_k_beta.png", title)


# ---------------------------------------------------------------------------------------------
# `tail-kd report`
# ---------------------------------------------------------------------------------------------


def run_dirs(paths: Sequence[str]) -> list[Path]:
    """The run directories named: a sweep directory (tail_kd/sweep.py) stands for those of its
    points that have a checkpoint."""
    from tail_kd.sweep import Sweep

    found = []
    for path in map(Path, paths):
        if Sweep.is_sweep_dir(path):
            every = Sweep.load(path).run_dirs()
            started = [d for d in every if complete_checkpoints(d)]
            if len(started) < len(every):
                print(f"{path}: {len(every) - len(started)} of {len(every)} points have no "
                      "checkpoint yet")  # fmt: skip
            found += started
        elif is_run_dir(path):
            found.append(path)
        else:
            raise UsageError(f"{path}: neither a run directory nor a sweep directory")
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tail-kd report", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or sweep directories")
    parser.add_argument(
        "--out", type=Path, help="report folder (default: <sweep>/report, else ./report)"
    )
    parser.add_argument(
        "--baseline", default="kd", help="the group the others are compared with (default kd)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = run_dirs(args.runs)
        results = [read_run(path) for path in paths]
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    finished = [r for r in results if r.finished]
    pending = [r for r in results if not r.finished]
    if not finished:
        print(f"error: none of the {len(results)} runs has finished yet", file=sys.stderr)
        return 1
    try:
        groups, by_group = group_runs(finished)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or _default_out(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        name: {seed: {"metrics": r.metrics, "run_dir": str(r.run_dir)} for seed, r in per.items()}
        for name, per in by_group.items()
    }
    summary = summarise(groups, runs)
    labels = {g.name: g.label for g in groups}
    baseline = args.baseline if args.baseline in runs else None
    paired = paired_comparisons(runs, baseline) if baseline else {}
    table = markdown_table(summary)
    paired_md = paired_table(paired, labels, what="method") if paired else ""
    figures = _figures(groups, by_group, summary, out)
    write_json(
        out / "results.json",
        {
            "runs": [str(p) for p in paths],
            "groups": {
                g.name: {"label": g.label, "loss": g.loss, "settings": g.settings} for g in groups
            },  # fmt: skip
            "summary": summary,
            "paired": {"baseline": baseline, "comparisons": paired},
            "per_seed": runs,
            "unfinished": {str(r.run_dir): r.step for r in pending},
        },
    )
    (out / "results.md").write_text(table + ("\n" + paired_md if paired_md else ""))
    shared = _shared_settings(finished)
    lines = [
        f"# Report: {len(finished)} runs in {len(groups)} groups",
        "",
        "Written by `tail-kd report " + " ".join(args.runs) + "`. Metrics: the runs' held-out "
        "evaluation at their last step (`eval/*` in TensorBoard), mean ± sample standard "
        "deviation over seeds; best in bold.",
        "",
        table,
    ]
    if paired:
        lines += [
            f"## Each method against {labels[baseline]}, seed by seed",
            "",
            "On how many seeds it is better, and its value minus the baseline's (mean ± standard "
            "deviation over the seeds):",
            "",
            paired_md,
            *comparisons(paired, labels[baseline], "methods"),
            "",
        ]
    if pending:
        lines += ["## Not finished (left out)", ""]
        lines += [f"- {r.run_dir}: step {r.step} of {r.recipe['train']['steps']}" for r in pending]
        lines.append("")
    lines += ["## Settings every run shares", ""]
    lines += [f"- `{key}`: {value}" for key, value in shared.items()]
    lines += ["", "## Figures", "", *[f"![{name}]({name})" for name in figures], ""]
    (out / "README.md").write_text("\n".join(lines))
    print(table)
    if paired_md:
        print(paired_md)
    if pending:
        print(f"{len(pending)} runs not finished, left out: " + ", ".join(
            f"{r.run_dir.name} (step {r.step})" for r in pending))  # fmt: skip
    print(f"wrote {out}/README.md, results.json, results.md" + "".join(f", {f}" for f in figures))
    return 0


def _default_out(paths: Sequence[str]) -> Path:
    """<sweep dir>/report for one sweep directory, else ./report."""
    from tail_kd.sweep import Sweep

    one = Path(paths[0])
    return one / "report" if len(paths) == 1 and Sweep.is_sweep_dir(one) else Path("report")


def _figures(groups, by_group: dict[str, dict[int, RunResult]], summary, out: Path) -> list[str]:
    """The plots, or none (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("note: no plots: matplotlib is not installed (pip install tail-kd[study])")
        return []
    curves = {name: {seed: r.curves for seed, r in per.items()} for name, per in by_group.items()}
    figures = plot_curves(groups, {n: c[min(c)] for n, c in curves.items()}, out)
    figures += [f for f in (plot_eval_curves(groups, curves, out),) if f]
    figures += [f for f in (plot_k_beta(groups, summary, out),) if f]
    return figures


def _shared_settings(results: Sequence[RunResult]) -> dict[str, Any]:
    """The recipe values (bookkeeping left out) that every run has in common."""
    methods = [_method(r.recipe) for r in results]
    return {
        key: value
        for key, value in methods[0].items()
        if all(repr(m.get(key)) == repr(value) for m in methods[1:])
    }


if __name__ == "__main__":
    sys.exit(main())
