"""End to end on the CPU: the tiny recipe with 2 ranks through the DeepSpeed launcher.

Each launch (a ZeRO-3 teacher and student in 2 processes) costs ~15-30 s, mostly start-up, so the
runs are module fixtures shared by the tests that check them:

    full     8 steps, uninterrupted                      -> losses, TensorBoard, export
    stopped  the same run, --stop-after-steps 4          -> clean stop with a checkpoint
             (started through `tail-kd train --nproc 2`)
    resumed  `stopped` continued with --resume to step 8 -> same losses as `full`
    fused / dense   one SGD-like step each               -> same updated parameters
    vocab2   `full` with parallel.vocab_parallel_size=2, -> same curve and student as `full`
             stopped at step 4 and resumed
    4 ranks  an untied student, P = 1 and P = 2 (two groups of 2) -> same curve and student
    placements   `full` with a replicated teacher and a ZeRO-2 student,   -> same curve and
                 and with a ZeRO-1 student, each stopped and resumed;   student as `full`
                 the other pairs uninterrupted;                         (1e-5; P = 2 1e-4)
                 a replicated teacher with P = 2

All runs share one cache (tiny teacher, tokenised data), built by the first.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import EXIT_ABORT, RECIPE, REPO, Run
from tail_kd.checkpoint import DEEPSPEED_TAG, written_by
from tail_kd.cli import CPU_MALLOC
from tail_kd.config import load_recipe
from tail_kd.exit_status import EXIT_PREEMPTED, EXIT_USAGE
from tail_kd.monitor import EVAL_SCALARS, HIDDEN_SCALARS, TEACHER_SCALARS, TRAIN_SCALARS
from tail_kd.pair import load_models, plan_models
from tail_kd.run_dir import complete_checkpoints, find_checkpoint, read_done
from tail_kd.topology import free_port
from tail_kd.train import main

STEPS = 8
COMMON = [f"train.steps={STEPS}", "checkpoint.every=4", "eval.every=4"]
LOGGED = "deepspeed.comms_logger.enabled=true"  # comm/* bytes per step in TensorBoard
# One step whose update is proportional to the gradient: Adam's first step is
# lr * g / (|g| + eps), ~ g for eps = 1 >> |g|; no weight decay, clipping or schedule.
SGD_LIKE_STEP = [
    "train.steps=1",
    "train.warmup_steps=0",
    "train.lr=1.0",
    "train.min_lr_ratio=1.0",
    "train.weight_decay=0.0",
    "train.grad_clip=0.0",
    "deepspeed.optimizer.params.eps=1.0",
]


def launch(
    run_dir: Path, cache: Path, sets: list[str], *args: str, cli: bool = False, ranks: int = 2
) -> Run:
    """Train the tiny recipe with 2 CPU ranks (or `ranks`) into `run_dir`, with `--set` for each
    of `sets`, through the deepspeed launcher (or `tail-kd train --nproc 2` when `cli`)."""
    if cli:
        command = [sys.executable, "-m", "tail_kd.cli", "train", "--nproc", str(ranks)]
    else:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
        command += ["--master_port", str(free_port()), "--module", "tail_kd.train"]
    command += [str(RECIPE), "--output-dir", str(run_dir), *args]
    for override in [f"cache_dir={cache}", *sets]:
        command += ["--set", override]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **CPU_MALLOC}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # set by torch in this process; a job starts without
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return Run(run_dir, proc)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def full(workdir) -> Run:  # DeepSpeed's communication logger on: it changes no number
    return launch(workdir / "full", workdir / "cache", [*COMMON, LOGGED])


@pytest.fixture(scope="module")
def stopped(workdir, full) -> Run:  # after `full`, which builds the cache
    return launch(
        workdir / "stopped", workdir / "cache", COMMON, "--stop-after-steps", "4", cli=True
    )


@pytest.fixture(scope="module")
def resumed(workdir, stopped) -> Run:
    return launch(stopped.dir, workdir / "cache", COMMON, "--resume")


@pytest.fixture(scope="module")
def one_step(workdir, full) -> dict[str, Run]:
    return {
        "fused": launch(workdir / "fused", workdir / "cache", SGD_LIKE_STEP),
        "dense": launch(workdir / "dense", workdir / "cache", SGD_LIKE_STEP, "--reference-loss"),
    }


def test_full_run_learns_and_logs_every_scalar(full):
    full.assert_finished(STEPS)
    scalars = full.scalars()
    for name in HIDDEN_SCALARS:  # no hidden-state alignment in this recipe
        assert f"train/{name}" not in scalars, name
    for name in set(TRAIN_SCALARS) - HIDDEN_SCALARS:
        assert [step for step, _ in scalars[f"train/{name}"]] == list(range(1, STEPS + 1)), name
    for name in EVAL_SCALARS:
        assert [step for step, _ in scalars[f"eval/{name}"]] == [0, 4, 8], name
    loss = [value for _, value in scalars["train/loss"]]
    assert sum(loss[-2:]) / 2 < loss[0] - 0.1, loss
    eval_ce = [value for _, value in scalars["eval/ce"]]
    assert eval_ce[-1] < eval_ce[0] - 0.1, eval_ce
    assert all(0 < value < 1 for _, value in scalars["train/teacher_tail_mass"])
    assert [c.step for c in complete_checkpoints(full.dir)] == [4, 8]  # checkpoint.keep = 2
    assert "held-out: ce" in full.proc.stdout
    summary = full.proc.stdout.split("held-out: ce")[1]  # the teacher is random: the run says so
    assert "note: the tiny:// teacher has random weights: KL to it" in summary


def test_readme_names_every_scalar_a_run_logs():
    monitoring = (REPO / "README.md").read_text().split("## Monitoring")[1].split("\n## ")[0]
    for tag in [f"train/{n}" for n in TRAIN_SCALARS] + [f"eval/{n}" for n in EVAL_SCALARS]:
        assert f"`{tag}`" in monitoring, tag


def test_stop_after_steps_checkpoints_and_exits_cleanly(stopped):
    assert stopped.proc.returncode == 0 or EXIT_ABORT in stopped.proc.stderr, stopped.output
    assert "stopped after step 4" in stopped.proc.stdout, stopped.output
    assert [c.step for c in complete_checkpoints(stopped.dir)] == [4]
    assert read_done(stopped.dir) is None


def test_resume_reproduces_the_uninterrupted_run(full, resumed):
    resumed.assert_finished(STEPS)
    assert "resumed from" in resumed.proc.stdout, resumed.output
    reference, continued = full.scalars(), resumed.scalars()
    for name in set(TRAIN_SCALARS) - HIDDEN_SCALARS:
        if name == "tokens_per_sec":
            continue
        tag = f"train/{name}"
        # One continuous curve: each step once, the first 4 from the stopped run.
        assert [step for step, _ in continued[tag]] == list(range(1, STEPS + 1)), tag
        for (step, expected), (_, value) in zip(reference[tag], continued[tag]):
            assert value == pytest.approx(expected, abs=1e-6), (tag, step)
    for (_, expected), (_, value) in zip(reference["eval/ce"], continued["eval/ce"]):
        assert value == pytest.approx(expected, abs=1e-6)


def test_fused_step_updates_parameters_like_the_dense_reference(workdir, one_step):
    """One step on the fused path and on the dense path (full logits, autograd) give the same
    update: per tensor, to 1e-4 of its largest entry (what remains is float32 rounding of the
    parameters themselves, ~1e-9 here, against updates of 1e-4 to 6e-2)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    updated = {}
    for name, run in one_step.items():
        run.assert_finished(1)
        checkpoint = find_checkpoint(run.dir, step=1).path
        updated[name] = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    recipe = load_recipe(RECIPE, [f"cache_dir={workdir / 'cache'}", *SGD_LIKE_STEP])
    _, initial = load_models(recipe, plan_models(recipe), torch.float32)
    parameters = dict(initial.named_parameters(remove_duplicate=False))  # lm_head tied: both names
    assert sorted(updated["fused"]) == sorted(f"student.{name}" for name in parameters)
    for name, before in parameters.items():
        fused = updated["fused"][f"student.{name}"] - before.detach()
        dense = updated["dense"][f"student.{name}"] - before.detach()
        scale = dense.abs().max().item()
        assert scale > 1e-5, f"{name} was not updated"
        torch.testing.assert_close(fused, dense, rtol=0, atol=1e-4 * scale, msg=name)


def test_each_rank_flushes_the_checkpoint_files_it_wrote(full):
    """`written_by` splits a real 2-rank checkpoint between the ranks: each rank's ZeRO shards and
    rank state are its own, the files naming no rank are rank 0's, every file has one owner."""
    checkpoint = find_checkpoint(full.dir, step=STEPS).path
    every = {path for path in checkpoint.rglob("*") if path.is_file()}
    mine = {rank: set(written_by(checkpoint, rank)) for rank in (0, 1)}
    assert mine[0] | mine[1] == every and not mine[0] & mine[1]
    assert sorted(path.name for path in mine[1]) == [
        "rank-00001.json",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


def test_export_loads_generates_and_reproduces_the_logged_eval(full, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tail_kd.data.prepared import build_datasets
    from tail_kd.export import export

    umask = os.umask(0o022)  # the usual one: colleagues may read what you write
    try:
        out = export(full.dir, tmp_path / "student")
    finally:
        os.umask(umask)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir()} == {
        path.name: "0o644" for path in out.iterdir()
    }  # safetensors files included (transformers writes them 0600)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    prompt = tokenizer("In the beginning", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8

    # The eval set is 8 sequences, all seen by the final evaluation (2 ranks x 2 batches x 2).
    recipe = load_recipe(RECIPE, [f"cache_dir={full.dir.parent / 'cache'}"])
    _, eval_set = build_datasets(recipe.data, tokenizer, recipe.data.cache_dir, recipe.seed)
    batch = {
        key: torch.stack([eval_set[i][key] for i in range(len(eval_set))]) for key in eval_set[0]
    }
    with torch.no_grad():
        ce = model(**batch).loss.item()
    ((_, logged),) = [point for point in full.scalars()["eval/ce"] if point[0] == STEPS]
    assert ce == pytest.approx(logged, rel=1e-4)


def test_sigusr1_stops_all_ranks_after_one_step_with_a_checkpoint(workdir, full):
    """A preemption signal to `tail-kd train --nproc 2` reaches both ranks; they agree on the step
    to stop after, checkpoint it, and exit with EXIT_PREEMPTED."""
    run_dir = workdir / "preempted"
    command = [sys.executable, "-m", "tail_kd.cli", "train", "--nproc", "2", str(RECIPE)]
    command += ["--output-dir", str(run_dir), "--set", f"cache_dir={workdir / 'cache'}"]
    command += ["--set", "train.steps=1000", "--set", "checkpoint.every=0", "--set", "eval.every=0"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **CPU_MALLOC}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGUSR1)
    output = "".join(lines)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, output
    (checkpoint,) = complete_checkpoints(run_dir)
    assert f"stopped by a signal after step {checkpoint.step}" in output
    assert 2 <= checkpoint.step < 1000 and read_done(run_dir) is None


def test_output_dir_of_another_run_is_refused(full, capsys):
    status = main([str(RECIPE), "--output-dir", str(full.dir)])
    assert status == EXIT_USAGE
    assert "already holds a run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Vocab-parallel lm_heads (tail_kd/sharded_heads.py)
# ---------------------------------------------------------------------------------------------


def final_student(run: Run, out: Path) -> dict[str, torch.Tensor]:
    """The exported student's tensors (every name, tied ones included)."""
    from transformers import AutoModelForCausalLM

    from tail_kd.export import export

    model = AutoModelForCausalLM.from_pretrained(export(run.dir, out))
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}


CURVES = ("train/loss", "train/ce", "train/divergence", "train/grad_norm", "eval/ce")


def assert_same_run(
    reference: Run,
    other: Run,
    steps: int,
    tmp_path: Path,
    curves: tuple[str, ...] = CURVES,
    tolerance: float = 1e-4,
) -> None:
    """Same loss curve, gradient norms and held-out CE (`curves`), and the same final student, to
    `tolerance`."""
    other.assert_finished(steps)
    expected, got = reference.scalars(), other.scalars()
    for tag in curves:
        assert [step for step, _ in got[tag]] == [step for step, _ in expected[tag]], tag
        for (step, want), (_, value) in zip(expected[tag], got[tag]):
            assert value == pytest.approx(want, rel=tolerance, abs=1e-6), (tag, step)
    want = final_student(reference, tmp_path / "reference")
    have = final_student(other, tmp_path / "other")
    assert sorted(have) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(have[name], tensor, rtol=0, atol=tolerance, msg=name)


def assert_logged_bytes_as_planned(run: Run, cache: Path, sets: list[str]) -> None:
    """DeepSpeed's communication logger (on in `sets`; it changes no number) counted, at each step,
    the bytes per collective that `tail-kd plan`'s time model predicts (tail_kd/cost_model.py),
    within 10%. Not at step 1, nor the first after an evaluation (eval.every 4): a ZeRO-3 engine
    records its module trace again there, gathering module by module."""
    from tail_kd.cost_model import Hardware, step_cost
    from tail_kd.memory_plan import model_shape, plan_configs, setup_of

    recipe = load_recipe(RECIPE, [f"cache_dir={cache}", *sets])
    teacher, student = plan_configs(recipe)
    setup = setup_of(recipe, device="cpu", gpus=2, gpus_per_node=2)
    predicted = step_cost(model_shape(student), model_shape(teacher), setup, Hardware())
    scalars = run.scalars()
    logged = {tag.removeprefix("comm/") for tag in scalars if tag.startswith("comm/")}
    assert logged <= set(predicted["logged_bytes_per_step"]) | {"broadcast"}, logged
    for name, value in predicted["logged_bytes_per_step"].items():
        measured = [v for step, v in scalars[f"comm/{name}"] if (step - 1) % 4 != 0]
        assert len(measured) == 6, (name, scalars[f"comm/{name}"])
        assert all(v == pytest.approx(value, rel=0.10) for v in measured), (name, value, measured)


def test_the_zero3_pair_sends_the_bytes_planned(workdir, full):
    """`full`: a ZeRO-3 teacher and student, gathered heads, 2 micro-batches per step."""
    assert_logged_bytes_as_planned(full, workdir / "cache", COMMON)


def test_a_replicated_teacher_and_a_zero2_student_train_the_same_student(workdir, full, tmp_path):
    """parallel.teacher_placement: replicated (a whole teacher on each rank, no ZeRO-3 engine) and
    parallel.student_zero_stage: 2 (whole weights; gradients and optimizer states partitioned):
    the same curves and exported student as `full`'s ZeRO-3 pair to 1e-5, through a stop at step 4
    and a resume; the bytes of the ZeRO-2 collectives as planned."""
    sets = [*COMMON, "parallel.teacher_placement=replicated", "parallel.student_zero_stage=2"]
    run_dir = workdir / "replicated-zero2"
    stopped = launch(run_dir, workdir / "cache", [*sets, LOGGED], "--stop-after-steps", "4")
    assert "placement: teacher replicated, student ZeRO-2" in stopped.proc.stdout, stopped.output
    resumed = launch(run_dir, workdir / "cache", [*sets, LOGGED], "--resume")
    assert "resumed from" in resumed.proc.stdout, resumed.output
    assert_same_run(full, resumed, STEPS, tmp_path, tolerance=1e-5)
    assert_logged_bytes_as_planned(resumed, workdir / "cache", sets)
    assert (
        "placement: teacher zero3, student ZeRO-3 (parallel.teacher_placement: auto, "
        "parallel.student_zero_stage: auto, parallel.hpz_partition_size: auto)" in full.proc.stdout
    )


def test_a_zero1_student_trains_the_same_student(workdir, full, tmp_path):
    """parallel.student_zero_stage: 1 (whole weights and gradients, optimizer states partitioned)
    beside a ZeRO-3 teacher: the same curves and exported student to 1e-5, through a stop and a
    resume; the gradients all-reduced once per step, as planned."""
    sets = [*COMMON, "parallel.student_zero_stage=1"]
    run_dir = workdir / "zero1"
    stopped = launch(run_dir, workdir / "cache", [*sets, LOGGED], "--stop-after-steps", "4")
    assert "placement: teacher zero3, student ZeRO-1" in stopped.proc.stdout, stopped.output
    resumed = launch(run_dir, workdir / "cache", [*sets, LOGGED], "--resume")
    assert_same_run(full, resumed, STEPS, tmp_path, tolerance=1e-5)
    assert_logged_bytes_as_planned(resumed, workdir / "cache", sets)


@pytest.mark.parametrize("teacher, stage", [("replicated", 1), ("zero3", 2)])
def test_the_other_placements_train_the_same_student(workdir, full, tmp_path, teacher, stage):
    """The pairs the tests around do not cover (a replicated teacher with a ZeRO-3 student is
    `test_a_replicated_teacher_with_vocab_parallel_heads`), uninterrupted: the same curves and
    exported student as the ZeRO-3 pair to 1e-5."""
    sets = [
        *COMMON,
        f"parallel.teacher_placement={teacher}",
        f"parallel.student_zero_stage={stage}",
    ]
    run = launch(workdir / f"{teacher}-zero{stage}", workdir / "cache", sets)
    assert f"placement: teacher {teacher}, student ZeRO-{stage}" in run.proc.stdout, run.output
    assert_same_run(full, run, STEPS, tmp_path, tolerance=1e-5)


def test_a_replicated_teacher_with_vocab_parallel_heads(workdir, full, tmp_path):
    """The rows of a replicated teacher's lm_head are read where they are (no all_to_all); each
    step's all-gathers are the student's alone."""
    sets = [*COMMON, "parallel.teacher_placement=replicated", "parallel.vocab_parallel_size=2"]
    run = launch(workdir / "replicated-vp", workdir / "cache", [*sets, LOGGED])
    assert_same_run(full, run, STEPS, tmp_path)
    assert_logged_bytes_as_planned(run, workdir / "cache", sets)


def test_vocab_parallel_heads_train_the_same_student(workdir, full, tmp_path):
    """2 ranks, one group of 2, the tied tiny student (its lm_head is its embedding, which also
    gets ZeRO-3's own gradients), 2 micro-batches accumulated per step; stopped after 4 steps and
    resumed (the rows are read again from the loaded partitions)."""
    sets = [*COMMON, "parallel.vocab_parallel_size=2"]
    stopped = launch(workdir / "vocab2", workdir / "cache", sets, "--stop-after-steps", "4")
    assert [c.step for c in complete_checkpoints(stopped.dir)] == [4], stopped.output
    resumed = launch(stopped.dir, workdir / "cache", sets, "--resume")
    assert "resumed from" in resumed.proc.stdout, resumed.output
    assert_same_run(full, resumed, STEPS, tmp_path)


def test_compiled_vocab_parallel_loss_trains_the_same_student(workdir, full, tmp_path):
    """What GPUs run by default (`loss.kernels: auto` compiles each chunk), with the chunk's
    graph split at the vocab-parallel collectives: the same run as the eager, P = 1 one. Its
    compiled code is kept in the recipe's cache_dir."""
    sets = [*COMMON, "parallel.vocab_parallel_size=2", "loss.kernels=compiled"]
    assert_same_run(full, launch(workdir / "compiled", workdir / "cache", sets), STEPS, tmp_path)
    # the compiled graphs are cached with the recipe's caches, where a requeued job finds them
    assert any((workdir / "cache" / "torch_compile").rglob("*.py"))


@pytest.fixture(scope="module")
def untied_student(workdir, full) -> Path:
    """A config-only student folder: the derived tiny student with its own (untied) lm_head."""
    from transformers import AutoConfig

    from tail_kd.models import build_tiny_pair, derive_student_config

    teacher = AutoConfig.from_pretrained(build_tiny_pair(workdir / "cache" / "tiny")[0])
    config = derive_student_config(teacher, num_layers=2, hidden_size=32)
    config.tie_word_embeddings = False
    folder = workdir / "untied-student"
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def student_with_tokenizer(workdir, full) -> Path:
    """A student folder as a CE-only run without a teacher needs it: the derived tiny student's
    config and the tiny tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from tail_kd.models import build_tiny_pair, derive_student_config

    teacher_dir = build_tiny_pair(workdir / "cache" / "tiny")[0]
    folder = workdir / "student-with-tokenizer"
    derive_student_config(
        AutoConfig.from_pretrained(teacher_dir), num_layers=2, hidden_size=32
    ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(folder)
    return folder


def test_a_ce_only_run_needs_no_teacher(workdir, student_with_tokenizer, tmp_path):
    """CE only, the student made from its config: with a teacher (which then only adds the
    teacher diagnostics) and without any (`teacher=null`: none is loaded, no teacher scalars are
    logged, the student's tokenizer tokenises the data): the same student, step for step."""
    sets = [*COMMON, "loss.divergence=none", "student.init=config",
            f"student.path={student_with_tokenizer}"]  # fmt: skip
    with_teacher = launch(workdir / "ce-with-teacher", workdir / "cache", sets)
    alone = launch(workdir / "ce-alone", workdir / "cache", [*sets, "teacher=null"])
    with_teacher.assert_finished(STEPS)
    assert_same_run(with_teacher, alone, STEPS, tmp_path)
    logged = {tag.split("/", 1)[1] for tag in alone.scalars()}
    assert logged & TEACHER_SCALARS == set(), logged
    assert {"teacher_tail_mass", "kl_to_teacher"} <= {
        tag.split("/", 1)[1] for tag in with_teacher.scalars()
    }
    assert "held-out: ce" in alone.proc.stdout and "kl_to_teacher" not in alone.proc.stdout


def test_vocab_parallel_with_two_groups_of_an_untied_student(workdir, untied_student, tmp_path):
    """4 ranks: P = 2 (two groups, whose row gradients ZeRO-3's partitions sum) against P = 1."""
    steps = 4
    sets = [f"train.steps={steps}", "checkpoint.every=0", "eval.every=2", "student.init=config",
            f"student.path={untied_student}"]  # fmt: skip
    runs = {
        size: launch(
            workdir / f"untied-p{size}",
            workdir / "cache",
            [*sets, f"parallel.vocab_parallel_size={size}"],
            ranks=4,
        )  # fmt: skip
        for size in (1, 2)
    }
    runs[1].assert_finished(steps)
    assert_same_run(runs[1], runs[2], steps, tmp_path)


def test_vocab_parallel_size_must_divide_the_ranks(workdir, full):
    run = launch(
        workdir / "vocab3", workdir / "cache", ["parallel.vocab_parallel_size=3"], cli=True
    )
    assert run.proc.returncode == EXIT_USAGE, run.output
    assert "parallel.vocab_parallel_size: 3 does not divide the 2 ranks" in run.output


# The hidden-state alignment: the derived student (2 layers, width 32) against the teacher (4
# layers, width 64), so through learned projections; its layer 1 with the teacher's layer 2, and
# the final states.
HIDDEN = [*COMMON, "loss.hidden_weight=1.0", "loss.hidden_layers=[[2, 1], [-1, -1]]"]


@pytest.fixture(scope="module")
def hidden(workdir, full) -> Run:
    return launch(workdir / "hidden", workdir / "cache", HIDDEN)


def test_hidden_alignment_trains_with_the_student_and_stays_out_of_the_export(hidden, tmp_path):
    """train/hidden_cosine is logged and rises (the projections and the student learn to align),
    train/loss = ce + divergence + hidden_weight * (1 - hidden_cosine) at every step, the
    projections are in the checkpoint and not in the exported student, which equals the
    checkpoint's student weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    hidden.assert_finished(STEPS)
    scalars = {tag: [value for _, value in values] for tag, values in hidden.scalars().items()}
    cosine = scalars["train/hidden_cosine"]
    assert len(cosine) == STEPS and cosine[-1] > cosine[0] + 0.1, cosine
    for loss, ce, divergence, cos in zip(
        scalars["train/loss"], scalars["train/ce"], scalars["train/divergence"], cosine
    ):
        assert loss == pytest.approx(ce + divergence + (1 - cos), rel=1e-5)
    checkpoint = find_checkpoint(hidden.dir, step=STEPS).path
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    projections = {name: t.shape for name, t in state.items() if name.startswith("align.")}
    assert projections == {
        "align.projections.0.weight": (64, 32),
        "align.projections.1.weight": (64, 32),
    }
    exported = final_student(hidden, tmp_path / "student")
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, state[f"student.{name}"], rtol=0, atol=0, msg=name)


def test_hidden_alignment_with_vocab_parallel_heads_and_a_resume(workdir, hidden, tmp_path):
    """The same run with the heads split over the 2 ranks, stopped after 4 steps and resumed (the
    projections come back from the checkpoint): the same curves, alignment included."""
    sets = [*HIDDEN, "parallel.vocab_parallel_size=2"]
    stopped = launch(workdir / "hidden-vp", workdir / "cache", sets, "--stop-after-steps", "4")
    assert [c.step for c in complete_checkpoints(stopped.dir)] == [4], stopped.output
    resumed = launch(stopped.dir, workdir / "cache", sets, "--resume")
    assert_same_run(hidden, resumed, STEPS, tmp_path, (*CURVES, "train/hidden_cosine"))
