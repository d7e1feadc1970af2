"""tools/study.py --setup own-teacher --scale quick: the whole study, end to end, in minutes.

The quick scale is the full study made small (tools/own_teacher.py "quick"): Genesis and Exodus
as the corpus, a 1024-piece tokenizer trained on it, a 2-layer teacher pretrained here by a
CE-only run without a teacher, then CE only, vanilla KD and TAD students (one seed) and the
report. What must hold is what the full study relies on: every step ran through `tail-kd train`,
the teacher was trained (it beats every student on the held-out documents) without loading a
teacher of its own, held-out documents were never trained on, and a second run reuses everything.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from tail_kd.monitor import TEACHER_SCALARS, read_scalars


def study(work: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "tools/study.py", "--setup", "own-teacher", "--scale", "quick",
               "--work", str(work), "--out", str(out), "--jobs", "2"]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    proc = study(root / "work", root / "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "proc": proc}


def test_the_quick_study_trains_a_teacher_then_compares_methods(quick):
    root = quick["root"]
    results = json.loads((root / "out" / "results.json").read_text())
    assert sorted(results["summary"]) == ["ce", "kd", "tad-k10-b2"]
    teacher_ce = results["teacher"]["metrics"]["ce"]
    assert all(entry["ce"]["mean"] > teacher_ce for entry in results["summary"].values())
    assert set(results["paired"]) == {"tad-k10-b2"}
    assert results["paired"]["tad-k10-b2"]["seeds"] == [0]
    readme = (root / "out" / "README.md").read_text()
    assert "Each TAD setting against vanilla KD, seed by seed" in readme
    for figure in ("eval_curves.png", "loss_curves.png", "reliability.png"):
        assert (root / "out" / figure).stat().st_size > 0, figure


def test_two_jobs_train_two_students_at_a_time(quick):
    """--jobs 2: some two student runs overlapped in time (each run's span: its DONE file's
    modification time minus the training seconds the study recorded)."""
    spans = []
    for timing in (quick["root"] / "work").glob("*/train_time.json"):
        end = (timing.parent / "DONE").stat().st_mtime
        spans.append((end - json.loads(timing.read_text())["seconds"], end))
    assert len(spans) == 3
    spans.sort()
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_the_teacher_was_pretrained_without_a_teacher(quick):
    run = quick["root"] / "work" / "teacher-run"
    scalars = read_scalars(run / "tensorboard" / "own-teacher-pretraining")
    logged = {tag.split("/", 1)[1] for tag in scalars}
    assert "ce" in logged and not logged & TEACHER_SCALARS
    ce = [value for _, value in scalars["train/ce"]]
    assert ce[-1] < ce[0] - 0.5  # it learned
    assert (quick["root"] / "work" / "teacher" / "model.safetensors").is_file()


def test_held_out_documents_are_whole_and_never_trained_on(quick):
    corpus = quick["root"] / "work" / "corpus"
    train = {p.name for p in (corpus / "train").iterdir()}
    held = {p.name for p in (corpus / "held_out").iterdir()}
    assert held and train and not train & held
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert sum(d["split"] == "held_out" for d in manifest["documents"]) == len(held)


def test_a_second_run_reuses_every_run_and_evaluation(quick):
    root = quick["root"]
    proc = study(root / "work", root / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not re.search(r"\] (train|pretrain|evaluate) ", proc.stdout), proc.stdout
