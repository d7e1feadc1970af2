"""Teacher once, many students (tail_kd/teacher_cache.py, `tail-kd cache-teacher`), on the CPU with
the tiny recipe and the hidden-state alignment of its teacher's layer 2 and final states (so two
states stored per token, and the alignment read from the cache as well):

    written   `tail-kd cache-teacher --nproc 2`          -> every stored row equals the teacher's
                                                            output_hidden_states, computed here
    online    8 steps with the online teacher (fp32)
    cached    the same from the cache, stopped after     -> the same train/* and eval/* scalars
              step 4 and resumed                            and the same student, to 1e-5
    vocab2    cached with vocab-parallel heads (P = 2)   -> the same run as online
    refusals  no cache, a manifest of other inputs, an interrupted write: each refused before any
              model loads, naming the field and the fix; a written entry is never written again
    plan      `tail-kd plan`: the disk per token, and no teacher backbone in the GPU estimate
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import RECIPE, REPO, Run
from tail_kd.config import load_recipe
from tail_kd.exit_status import EXIT_USAGE
from tail_kd.monitor import EVAL_SCALARS, TRAIN_SCALARS
from tail_kd.teacher_cache import CacheSpec, StatesWriter, WithTeacherStates, problem, spec_of
from test_train import COMMON, STEPS, final_student, launch

ALIGNED = ["loss.hidden_weight=1.0", "loss.hidden_layers=[[2, 1], [-1, -1]]"]  # layers 4 and 2
ONLINE = [*COMMON, *ALIGNED]
CACHED = [*ONLINE, "teacher.cached_states=true"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture(scope="module")
def written(workdir) -> subprocess.CompletedProcess:
    """The tiny recipe's teacher states, written by 2 ranks (the first command on this cache:
    it also builds the tiny teacher and the tokenised data)."""
    command = [sys.executable, "-m", "tail_kd.cli", "cache-teacher", str(RECIPE), "--nproc", "2"]
    command += set_args([f"cache_dir={workdir / 'cache'}", *ALIGNED])
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def set_args(values: list[str]) -> list[str]:
    """`--set VALUE` for each value."""
    return [arg for value in values for arg in ("--set", value)]


def spec_for(workdir, *sets: str):
    return spec_of(load_recipe(RECIPE, [f"cache_dir={workdir / 'cache'}", *ALIGNED, *sets]))


def test_stored_states_are_the_teachers_hidden_states(workdir, written):
    """Every row of both splits, read back from the files, against the teacher run here with
    transformers alone (a batch of 64 rows at a time, not the writers' 2): its final states
    (output_hidden_states[4]) and its layer 2's."""
    from transformers import AutoModelForCausalLM

    from tail_kd.data.prepared import prepare_datasets
    from tail_kd.pair import plan_models

    recipe = load_recipe(RECIPE, [f"cache_dir={workdir / 'cache'}", *ALIGNED])
    spec = spec_of(recipe)
    assert problem(spec) is None
    assert spec.key["states"] == [4, 2]
    assert spec.bytes_per_token == 2 * 64 * 4  # S = 2 states of H_t = 64, float32
    assert f"{spec.entry}: " in written.stdout
    plan = plan_models(recipe)
    teacher = AutoModelForCausalLM.from_pretrained(plan.teacher_dir, dtype=torch.float32).eval()
    prepared = prepare_datasets(recipe.data, plan.tokenizer, recipe.data.cache_dir, recipe.seed)
    worst = 0.0
    for split, dataset in (("train", prepared.train), ("eval", prepared.eval)):
        stored = np.fromfile(spec.entry / f"{split}.bin", dtype=np.float32)
        stored = torch.from_numpy(stored).view(len(dataset), 2, recipe.data.seq_len, 64)
        for start in range(0, len(dataset), 64):
            rows = dataset[start : start + 64]
            with torch.no_grad():
                out = teacher(
                    input_ids=rows["input_ids"],
                    attention_mask=rows["attention_mask"],
                    output_hidden_states=True,
                )
            expected = torch.stack([out.hidden_states[4], out.hidden_states[2]], dim=1)
            got = stored[start : start + len(expected)]
            worst = max(worst, (got - expected).abs().max().item())
    print(f"stored vs dense teacher: max |difference| {worst:.3g}")
    assert worst <= 1e-6


@pytest.fixture(scope="module")
def online(workdir, written) -> Run:
    return launch(workdir / "online", workdir / "cache", ONLINE)


@pytest.fixture(scope="module")
def cached(workdir, written) -> Run:
    stopped = launch(workdir / "cached", workdir / "cache", CACHED, "--stop-after-steps", "4")
    assert "stopped after step 4" in stopped.proc.stdout, stopped.output
    return launch(stopped.dir, workdir / "cache", CACHED, "--resume")


def assert_same_curves(reference: Run, other: Run, tolerance: float, tmp_path) -> float:
    """Every train/* scalar but tokens/s at every step, every eval/* at every evaluation and
    the final student, to `tolerance` (relative for values above 1); the largest difference."""
    other.assert_finished(STEPS)
    expected, got = reference.scalars(), other.scalars()
    tags = [f"train/{name}" for name in set(TRAIN_SCALARS) - {"tokens_per_sec"}]
    tags += [f"eval/{name}" for name in EVAL_SCALARS]
    worst = 0.0
    for tag in tags:
        assert [step for step, _ in got[tag]] == [step for step, _ in expected[tag]], tag
        for (step, want), (_, value) in zip(expected[tag], got[tag]):
            assert value == pytest.approx(want, rel=tolerance, abs=tolerance), (tag, step)
            worst = max(worst, abs(value - want) / max(1.0, abs(want)))
    want = final_student(reference, tmp_path / "reference")
    have = final_student(other, tmp_path / "other")
    assert sorted(have) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(have[name], tensor, rtol=0, atol=tolerance, msg=name)
        worst = max(worst, (have[name] - tensor).abs().max().item())
    return worst


def test_a_run_from_the_cache_is_the_online_run(online, cached, tmp_path):
    online.assert_finished(STEPS)
    assert "resumed from" in cached.proc.stdout, cached.output
    assert "its lm_head alone kept" in cached.proc.stdout, cached.output
    worst = assert_same_curves(online, cached, 1e-5, tmp_path)
    print(f"cached vs online: largest difference {worst:.3g}")


def test_vocab_parallel_heads_from_the_cache(workdir, online, tmp_path):
    """The teacher's lm_head rows are read from its (lm_head-only) engine's partitions."""
    run = launch(workdir / "vocab2", workdir / "cache", [*CACHED, "parallel.vocab_parallel_size=2"])
    worst = assert_same_curves(online, run, 1e-4, tmp_path)  # P = 2 sums in another order
    print(f"cached P=2 vs online P=1: largest difference {worst:.3g}")


# ---------------------------------------------------------------------------------------------
# Refusals, in this process: each before the process group exists, so before any model loads
# ---------------------------------------------------------------------------------------------


def refused(workdir, capsys, *sets: str) -> str:
    """`tail-kd train` of the tiny recipe with `sets`: exit 2, and nothing of a run written."""
    from tail_kd.train import main

    run_dir = workdir / "refused"
    args = [str(RECIPE), "--output-dir", str(run_dir)]
    args += set_args(
        [f"cache_dir={workdir / 'cache'}", *ALIGNED, "teacher.cached_states=true", *sets]
    )
    assert main(args) == EXIT_USAGE
    assert not run_dir.exists()  # set_up_run, which writes the student's spec first, never ran
    error = capsys.readouterr().err
    assert "teacher.cached_states" in error and "tail-kd cache-teacher" in error, error
    return error


def test_a_missing_cache_is_refused(workdir, written, capsys):
    # bfloat16 states are another entry than the float32 ones written
    error = refused(workdir, capsys, "teacher.dtype=bfloat16")
    assert f"no teacher states in {spec_for(workdir, 'teacher.dtype=bfloat16').entry}" in error


def test_a_manifest_of_other_inputs_is_refused(workdir, written, capsys):
    """The float32 entry put where the bfloat16 one belongs: its manifest names the float32 key."""
    written_spec, wanted = spec_for(workdir), spec_for(workdir, "teacher.dtype=bfloat16")
    shutil.copytree(written_spec.entry, wanted.entry)
    try:
        error = refused(workdir, capsys, "teacher.dtype=bfloat16")
        assert "was written for another dtype than this recipe's" in error
        # cache-teacher leaves it as it is
        from tail_kd.cache_teacher import main

        sets = [f"cache_dir={workdir / 'cache'}", *ALIGNED, "teacher.dtype=bfloat16"]
        assert main([str(RECIPE), *set_args(sets)]) == EXIT_USAGE
        assert f"delete {wanted.entry} to write it again" in capsys.readouterr().err
        assert (wanted.entry / "manifest.json").read_text() == (
            written_spec.entry / "manifest.json"
        ).read_text()
    finally:
        shutil.rmtree(wanted.entry)


def test_the_key_follows_the_teachers_weights_not_its_folder(workdir, written, capsys):
    """A copy of the teacher's folder is the same teacher; changed weights are another."""
    from tail_kd.models import build_tiny_pair

    copy = workdir / "teacher-copy"
    shutil.copytree(build_tiny_pair(workdir / "cache" / "tiny")[0], copy)
    assert problem(spec_for(workdir, f"teacher.path={copy}")) is None
    (weights,) = copy.glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    error = refused(workdir, capsys, f"teacher.path={copy}")
    assert f"no teacher states in {spec_for(workdir, f'teacher.path={copy}').entry}" in error


def test_an_interrupted_write_is_never_read(workdir, written, capsys):
    """A write that stopped after some rows (no commit): the run is refused, and the next write
    starts afresh."""
    spec = spec_for(workdir, "teacher.dtype=bfloat16")
    writer = StatesWriter.begin(spec)
    _, states, length, hidden = spec.shapes["train"]
    writer.write("train", 0, torch.ones(2, states, length, hidden, dtype=torch.bfloat16))
    error = refused(workdir, capsys, "teacher.dtype=bfloat16")
    assert f"({writer.folder} is an interrupted write, not used)" in error
    again = StatesWriter.begin(spec)  # what cache-teacher does, holding the entry's lock
    rows = np.fromfile(again.folder / "train.bin", dtype=np.int16)
    assert not rows.any()  # the interrupted write's rows are gone: a fresh, zeroed file
    assert [path.name for path in spec.entry.parent.glob(f".{spec.entry.name}.tmp-*")] == [
        again.folder.name
    ]
    shutil.rmtree(again.folder)


def test_a_written_entry_is_not_written_again(workdir, written, capsys):
    from tail_kd.cache_teacher import main

    spec = spec_for(workdir)
    before = {path.name: path.stat().st_mtime_ns for path in spec.entry.iterdir()}
    sets = [f"cache_dir={workdir / 'cache'}", *ALIGNED]
    assert main([str(RECIPE), *set_args(sets)]) == 0
    assert f"teacher states already written: {spec.entry}" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in spec.entry.iterdir()} == before


def test_prepare_data_check_reports_the_states(workdir, written, capsys):
    from tail_kd.prepare import main

    sets = set_args([f"cache_dir={workdir / 'cache'}", *ALIGNED, "teacher.cached_states=true"])
    assert main([str(RECIPE), "--check", *sets]) == 0
    assert "states   ready" in capsys.readouterr().out
    assert main([str(RECIPE), "--check", *sets, "--set", "teacher.dtype=bfloat16"]) == 1
    out = capsys.readouterr().out
    assert "states   MISSING" in out and f"run `tail-kd cache-teacher {RECIPE}`" in out


def test_bfloat16_rows_round_trip_and_a_written_entry_is_never_replaced(tmp_path):
    """The store alone: bf16 rows written by two writers in any order read back bit for bit,
    a second commit onto a written entry fails without touching it, a damaged file is named."""
    spec = CacheSpec(tmp_path / "entry", {"k": 1}, {"train": (5, 2, 3, 4)}, torch.bfloat16, "t")
    states = torch.randn(5, 2, 3, 4).bfloat16()
    writer = StatesWriter.begin(spec)
    StatesWriter(spec, writer.folder).write("train", 3, states[3:])  # another rank's rows
    writer.write("train", 0, states[:3])
    writer.sync()
    writer.commit()
    assert problem(spec) is None and spec.bytes_per_token == 2 * 4 * 2
    items = WithTeacherStates([{"input_ids": torch.arange(3)}] * 5, spec, "train")
    for index in range(5):
        item = items[index]
        assert item["teacher_states"].dtype == torch.bfloat16
        assert torch.equal(item["teacher_states"], states[index]) and "input_ids" in item
    manifest = (spec.entry / "manifest.json").read_text()
    with pytest.raises(OSError):
        StatesWriter.begin(spec).commit()
    assert (spec.entry / "manifest.json").read_text() == manifest
    with open(spec.entry / "train.bin", "r+b") as file:
        file.truncate(10)
    assert problem(spec) == f"{spec.entry / 'train.bin'} does not match its manifest (damaged)"


# ---------------------------------------------------------------------------------------------
# tail-kd plan
# ---------------------------------------------------------------------------------------------


def test_plan_states_the_disk_per_token_and_drops_the_teacher_backbone(tmp_path, capsys):
    """The paper's recipe (Qwen1.5-1.8B, H_t = 2048, bf16, its final states aligned: stored
    once): 4 KiB per token; with cached states a ZeRO-3 teacher costs its lm_head's partition
    and the states of the batch."""
    from tail_kd.memory_plan import main

    paper = REPO / "recipes" / "paper" / "qwen1.5-1.8b-to-1.2b.yaml"
    plans = {}
    for cached in (False, True):
        out = tmp_path / f"{cached}.json"
        main([str(paper), "--json", str(out), "--set", f"teacher.cached_states={cached}",
              "--set", "parallel.teacher_placement=zero3"])  # fmt: skip
        plans[cached] = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "teacher states on disk  4096 B per token" in text
    assert "3.73 TiB per 1B tokens" in text
    online, cached = plans[False]["bytes"], plans[True]["bytes"]
    teacher, setup = plans[True]["teacher"], plans[True]["setup"]
    assert plans[True]["teacher_cache_bytes_per_token"] == 2048 * 2
    assert cached["teacher_parameters"] == 2 * teacher["vocab_rows"] * 2048 // setup["gpus"]
    tokens = setup["micro_batch_size"] * setup["seq_len"]
    assert cached["teacher_activations"] == tokens * 4096
    assert cached["teacher_parameters"] < online["teacher_parameters"] / 6
    for name in ("student_model_states", "lm_heads", "loss_chunk", "student_activations"):
        assert cached[name] == online[name], name


def test_hidden_alignment_stores_each_teacher_layer_once():
    from tail_kd.teacher_cache import state_indices

    loss = load_recipe(RECIPE, ["loss.hidden_weight=1", "loss.hidden_layers=[[2, 1], [-1, -1]]"])
    assert state_indices(loss.loss, 4, 2) == (4, 2)
    assert state_indices(load_recipe(RECIPE, ["loss.hidden_weight=1"]).loss, 4, 2) == (4,)
    assert state_indices(load_recipe(RECIPE).loss, 4, 2) == (4,)


def test_cache_teacher_needs_a_teacher(tmp_path, capsys):
    from tail_kd.cache_teacher import main

    assert main([str(RECIPE), "--set", "teacher=null", "--set", "loss.divergence=none",
                 "--set", "student.init=config", "--set", "student.path=x"]) == EXIT_USAGE  # fmt: skip
    assert "no teacher section" in capsys.readouterr().err
