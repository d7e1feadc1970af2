"""`tail-kd sweep` and `tail-kd report`: the points of a grid, the sweep directory's rules, a real
local sweep of the tiny recipe (2 methods x 2 seeds, one process each) and its report, checked
against the runs' own TensorBoard numbers. The Slurm job array (one task per point, one of them
preempted and resumed) is tested in tests/test_slurm.py."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys

import pytest

from helpers import REPO
from tail_kd.config import load_recipe
from tail_kd.monitor import read_scalars
from tail_kd.report import RunResult, group_runs
from tail_kd.run_dir import DONE_MARKER, complete_checkpoints, read_done
from tail_kd.sweep import Sweep, expand, main, parse_grid, point_main

RECIPE = REPO / "recipes" / "tiny" / "tad.yaml"
STEPS = 2
SETS = [f"train.steps={STEPS}", "eval.max_batches=1"]


def names(points) -> list[str]:
    return [point.name for point in points]


def test_points_cross_the_grid_with_the_seeds_and_the_baselines():
    points = expand({"loss.k": ["1", "5"], "loss.beta": ["1", "2"]}, ["kd"], [0, 1])
    per_seed = ["k1-beta1", "k1-beta2", "k5-beta1", "k5-beta2", "kd"]
    assert names(points) == [f"{n}-s{s}" for s in (0, 1) for n in per_seed]
    by_name = {p.name: p.sets for p in points}
    assert by_name["k5-beta2-s1"] == ("loss.k=5", "loss.beta=2", "loss.divergence=tad", "seed=1")
    assert by_name["kd-s0"] == ("loss.divergence=forward_kl", "seed=0")
    # Without baselines the recipe's divergence is left alone.
    assert expand({"loss.k": ["1"]}, [], [3])[0].sets == ("loss.k=1", "seed=3")


def test_baselines_cross_the_grid_keys_outside_the_loss():
    points = expand({"train.lr": ["1e-3", "2e-3"], "loss.k": ["1"]}, ["ce", "rkl"], [0])
    by_name = {p.name: p.sets for p in points}
    assert sorted(by_name) == sorted(
        ["lr1e-3-k1-s0", "lr2e-3-k1-s0", "ce-lr1e-3-s0", "ce-lr2e-3-s0", "rkl-lr1e-3-s0",
         "rkl-lr2e-3-s0"]
    )  # fmt: skip
    assert by_name["ce-lr2e-3-s0"] == ("loss.divergence=none", "train.lr=2e-3", "seed=0")


@pytest.mark.parametrize(
    "item, problem",
    [("loss.k", "expected KEY=V1,V2"), ("loss.k=1,,2", "expected KEY=V1,V2"),
     ("loss.k=1,1", "repeated")],
)  # fmt: skip
def test_a_bad_grid_is_refused(item, problem):
    from tail_kd.exit_status import UsageError

    with pytest.raises(UsageError, match=problem):
        parse_grid([item])
    with pytest.raises(UsageError, match="twice"):
        parse_grid(["loss.k=1", "loss.k=5"])


def test_every_point_is_checked_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "sweep"
    status = main([str(RECIPE), "--grid", "loss.k=1,0", "--out", str(out)])
    assert status == 2
    error = capsys.readouterr().err
    assert "point k0-s0 (loss.k=0 seed=0)" in error and "loss.k" in error
    assert not out.exists()


def test_a_sweep_directory_is_one_experiment(tmp_path, capsys):
    recipe = tmp_path / "tad.yaml"
    shutil.copy(RECIPE, recipe)
    out = tmp_path / "sweep"
    # Nothing to train: every point "finished" is not what we test here; --slurm without Slurm
    # fails after the sweep directory is written, which is all this test needs.
    args = [str(recipe), "--grid", "loss.beta=1,2", "--out", str(out)]
    from tail_kd.sweep import plan, build_parser

    sweep = plan(build_parser().parse_args(args))
    assert Sweep.load(out) == sweep and len(sweep.points) == 2
    assert plan(build_parser().parse_args(args)) == sweep  # the same command continues it

    assert main([*args[:2], "loss.beta=1,5", "--out", str(out)]) == 2
    assert "holds another sweep" in capsys.readouterr().err

    assert point_main([str(out), "1"]) == 0
    assert capsys.readouterr().out.splitlines() == sweep.train_args(sweep.points[1])
    assert point_main([str(out), "2"]) == 2
    assert "has 2 points; there is no point 2" in capsys.readouterr().err

    recipe.write_text(recipe.read_text().replace("beta: 2.0", "beta: 3.0"))
    assert point_main([str(out), "0"]) == 2
    assert f"{recipe} changed since the sweep" in capsys.readouterr().err
    assert main(args) == 2
    assert "changed since the sweep" in capsys.readouterr().err


def test_runs_are_grouped_by_method_and_named_by_what_differs(tmp_path):
    def result(seed: int, *sets: str) -> RunResult:
        recipe = load_recipe(RECIPE, [f"seed={seed}", f"output_dir={tmp_path / str(seed)}", *sets])
        return RunResult(tmp_path / f"{seed}{sets}", recipe.to_dict(), 20, True, {})

    runs = [
        result(0, "loss.divergence=forward_kl"),
        result(1, "loss.divergence=forward_kl"),
        result(0, "train.lr=1e-3"),
        result(0, "train.lr=2e-3", "loss.normalize=false"),
    ]
    groups, by_group = group_runs(runs)
    assert [g.name for g in groups] == [
        "kd-lr0.003",
        "tad-k10-b2-lr0.001",
        "tad-k10-b2-raw-lr0.002",
    ]
    assert groups[0].label == "vanilla KD (forward KL), train.lr=0.003"
    assert list(by_group["kd-lr0.003"]) == [0, 1]
    assert groups[1].tad == (10, 2.0) and groups[2].tad is None

    from tail_kd.exit_status import UsageError

    with pytest.raises(UsageError, match="the same seed 0"):
        group_runs([result(0), result(0, "run_name=again")])


# ---------------------------------------------------------------------------------------------
# A real sweep here and its report
# ---------------------------------------------------------------------------------------------


def tail_kd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tail_kd.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    sets = [arg for value in [*SETS, f"cache_dir={root / 'cache'}"] for arg in ("--set", value)]
    command = ["sweep", str(RECIPE), "--grid", "loss.beta=2", "--baselines", "kd",
               "--seeds", "0", "1", *sets, "--out", str(root / "sweep")]  # fmt: skip
    first = tail_kd(*command)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return {"root": root, "out": root / "sweep", "command": command, "first": first}


def test_a_local_sweep_trains_each_point_in_its_own_run(local_sweep):
    sweep = Sweep.load(local_sweep["out"])
    assert names(sweep.points) == ["beta2-s0", "kd-s0", "beta2-s1", "kd-s1"]
    for point in sweep.points:
        run = sweep.run_dir(point)
        assert read_done(run)["step"] == STEPS, point.name
        recipe = complete_checkpoints(run)[-1].trainer_state["recipe"]
        assert recipe["seed"] == int(point.name[-1])
        assert recipe["loss"]["divergence"] == ("forward_kl" if "kd" in point.name else "tad")
        assert recipe["loss"]["beta"] == 2.0
        assert (run / "tensorboard" / point.name).is_dir()  # run_name = the point's name

    again = tail_kd(*local_sweep["command"])  # the same command: nothing left to train
    assert again.returncode == 0 and "4 points (4 finished)" in again.stdout, again.stdout
    assert "[1/" not in again.stdout


def test_the_report_is_the_mean_and_spread_of_the_runs_own_numbers(local_sweep, tmp_path):
    out = local_sweep["out"]
    report = tail_kd("report", str(out))
    assert report.returncode == 0, report.stdout + report.stderr
    results = json.loads((out / "report" / "results.json").read_text())
    assert list(results["groups"]) == ["kd", "tad-k10-b2"]

    def last(point: str, tag: str) -> float:
        return read_scalars(out / "runs" / point / "tensorboard" / point)[tag][-1][1]

    for group, prefix in (("kd", "kd"), ("tad-k10-b2", "beta2")):
        for metric in ("ce", "kl_to_teacher", "full_ece"):
            values = [last(f"{prefix}-s{seed}", f"eval/{metric}") for seed in (0, 1)]
            stat = results["summary"][group][metric]
            assert stat["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert stat["std"] == pytest.approx(statistics.stdev(values), rel=1e-9)
    paired = results["paired"]["comparisons"]["tad-k10-b2"]["ce"]
    expected = [last(f"beta2-s{s}", "eval/ce") - last(f"kd-s{s}", "eval/ce") for s in (0, 1)]
    assert paired["diffs"] == pytest.approx(expected, rel=1e-12)
    assert paired["wins"] == sum(d < 0 for d in expected)
    readme = (out / "report" / "README.md").read_text()
    assert "| vanilla KD (forward KL) | 2 |" in readme and "| TAD K=10 beta=2 | 2 |" in readme
    for figure in ("loss_curves.png", "eval_curves.png", "metric_vs_k_beta.png"):
        assert (out / "report" / figure).stat().st_size > 0

    # Run directories named one by one, one of them not finished: left out and listed.
    unfinished = tmp_path / "kd-s0-copy"
    shutil.copytree(out / "runs" / "kd-s0", unfinished)
    (unfinished / DONE_MARKER).unlink()
    runs = sorted(map(str, (out / "runs").iterdir()))
    again = tail_kd("report", *runs, str(unfinished), "--out", str(tmp_path / "report"))
    assert again.returncode == 0, again.stdout + again.stderr
    other = json.loads((tmp_path / "report" / "results.json").read_text())
    assert other["summary"] == results["summary"]
    assert other["unfinished"] == {str(unfinished): STEPS}
    assert "kd-s0-copy (step 2)" in again.stdout
