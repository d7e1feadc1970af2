"""What a run does when things go wrong, and what survives (docs/FAULTS.md links here).

Bad input is checked in this process: the real `set_up_run` with a one-rank stand-in for the
process group and `load_models` replaced by a tripwire, so each error must come before any model
is loaded. The faults are real runs of the tiny recipe on the CPU (~20-30 s each):

    nonfinite   1 rank; NaN loss at step 2, NaN gradient at steps 4-5 (the `debug:` knobs),
                train.max_skipped_steps=2                      -> skips counted, stop, exit 3
    resumed     nonfinite's run dir plus the debris of a run killed in the middle of writing
                checkpoints, continued with --resume           -> resumes from the newest complete
    disk full   1 rank, output dir on a 16 MiB tmpfs filled after the first checkpoint
                (root only: mounts a tmpfs)                    -> exit 74, previous one intact
    rank lost   2 ranks started as srun starts them (no launcher to clean up); kill -9 of rank 1
                mid-run                                        -> rank 0 exits 4 within the timeout

plus two processes that only join a process group, to see a hung rank time out.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import EXIT_ABORT, RECIPE, REPO, Run
from tail_kd import run_setup
from tail_kd.checkpoint import DEEPSPEED_TAG
from tail_kd.cli import CPU_MALLOC
from tail_kd.config import RecipeError, load_recipe
from tail_kd.data.sources import DataError
from tail_kd.exit_status import EXIT_CHECKPOINT_WRITE, EXIT_DIVERGED, EXIT_RANK_LOST, EXIT_USAGE
from tail_kd.run_dir import complete_checkpoints, find_checkpoint, read_done
from tail_kd.topology import free_port
from tail_kd.train import main, parse_options

# A shorter tiny run: 1 rank, 2 micro-batches of 2 sequences per step, no evaluation.
SMALL = ["train.global_batch_size=4", "eval.every=0", "train.warmup_steps=1"]


def command(run_dir: Path, cache: Path, sets: list[str], *args: str) -> list[str]:
    line = [sys.executable, "-m", "tail_kd.train", str(RECIPE), "--output-dir", str(run_dir)]
    for override in [f"cache_dir={cache}", *SMALL, *sets]:
        line += ["--set", override]
    return line + list(args)


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **CPU_MALLOC, **extra}


def launch(run_dir: Path, cache: Path, sets: list[str], *args: str, **env: str) -> Run:
    """One rank in one process, no launcher (`env`: extra environment variables)."""
    proc = subprocess.run(
        command(run_dir, cache, sets, *args),
        cwd=REPO,
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Run(run_dir, proc)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cache(workdir) -> Path:
    return workdir / "cache"


# --------------------------------------------------------------------------------------------
# Bad input: an error naming the field or file, before any model is loaded
# --------------------------------------------------------------------------------------------


def one_rank() -> SimpleNamespace:
    """The DistContext of a single process without a process group."""
    return SimpleNamespace(
        rank=0,
        world_size=1,
        topology=SimpleNamespace(local_world_size=1),
        is_main=True,
        device=torch.device("cpu"),
        barrier=lambda: None,
        broadcast=lambda obj: obj,
        any=lambda flag: flag,
    )


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Data and model files, each wrong in one way."""
    files = {
        "empty": tmp_path / "empty.jsonl",
        "no_text": tmp_path / "no_text.jsonl",
        "short": tmp_path / "short.jsonl",
        "long_prompts": tmp_path / "long_prompts.jsonl",
        "bad_gguf": tmp_path / "teacher.gguf",
    }
    files["empty"].write_text("")
    files["no_text"].write_text('{"content": "In the beginning"}\n')
    files["short"].write_text('{"text": "Short note."}\n')
    question = "How many apples are there in the basket? " * 20
    files["long_prompts"].write_text(f'{{"question": "{question}", "answer": "3"}}\n' * 4)
    files["bad_gguf"].write_bytes(b"GGUF" + b"\x00" * 60)
    return files


@pytest.mark.parametrize(
    "sets, error, message",
    [
        (["loss.k=100000"], RecipeError, r"loss.k: 100000 leaves no tail in the \d+-token vocab"),
        (["student.num_layers=9"], RecipeError, r"num_layers=9 must be between 1 and the teacher"),
        (["data.seq_len=4096"], RecipeError, r"data.seq_len: 4096 exceeds the teacher's 512"),
        (["teacher.path={bad_gguf}"], RecipeError, r"teacher.path: .*teacher.gguf"),
        (
            ["deepspeed.zero_optimization.stage3_param_persistance_threshold=0"],
            RecipeError,
            r"deepspeed.zero_optimization.stage3_param_persistance_threshold: Extra inputs .* "
            r"\(did you mean 'deepspeed.zero_optimization.stage3_param_persistence_threshold'",
        ),
        (["data.source={missing}"], DataError, r"missing.jsonl: no such file or directory"),
        (["data.source={empty}"], DataError, r"empty.jsonl'?: no non-empty 'text' texts"),
        (["data.source={no_text}"], DataError, r"no field 'text' \(it has: content\); set data"),
        (["data.source={short}"], DataError, r"do not fill one sequence of data.seq_len=64"),
        (
            ["data.source={long_prompts}", "data.kind=sft", "data.eval_examples=0"],
            DataError,
            r"no train record fits data.seq_len=64",
        ),
    ],
    ids=[
        "k>=vocab",
        "student>teacher",
        "seq_len>positions",
        "unreadable-gguf",
        "deepspeed-key",
        "missing-data",
        "empty-data",
        "missing-field",
        "too-short",
        "prompt-fills-seq",
    ],
)
def test_bad_input_is_named_before_any_model_loads(
    tmp_path, cache, inputs, monkeypatch, sets, error, message
):
    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(run_setup, "load_models", tripwire)
    paths = {**{name: str(path) for name, path in inputs.items()}, "missing": "missing.jsonl"}
    overrides = [f"cache_dir={cache}", *(s.format(**paths) for s in sets)]
    options = parse_options([str(RECIPE), "--output-dir", str(tmp_path / "run")])
    recipe = load_recipe(RECIPE, overrides + [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(error, match=message):
        run_setup.set_up_run(recipe, options, one_rank(), stop_flag=None)


# What each `tail-kd` mistake below must be reported without: the heavy imports (seconds each).
HEAVY = ("torch", "transformers", "datasets", "deepspeed")
REPORT_IMPORTS = textwrap.dedent("""
    import sys
    from tail_kd.cli import main
    status = main(sys.argv[1:])
    print(",".join(m for m in {heavy} if m in sys.modules), file=sys.stderr)
    sys.exit(status)
""")


@pytest.mark.parametrize(
    "args, message, imported",
    [
        (["--set", "train.lr_sched=1"], r"--set train.lr_sched=1: .*did you mean 'train.lr'", ""),
        (["--set", "train.lr=fast"], r"train.lr: .*'fast'", ""),
        (["--set", "data.source=no/such/data.jsonl"], r"no/such/data.jsonl: no such file", ""),
        (["--set", "data.source=tests/prose"], r"tests/prose: no such file or directory", ""),
        (
            ["--nproc", "2", "--set", "train.global_batch_size=6"],
            r"global_batch_size: 6 is not",
            "",
        ),
    ],
    ids=["unknown-key", "bad-value", "missing-data", "missing-data-folder", "batch-split"],
)
def test_cheap_mistakes_are_reported_before_heavy_imports(tmp_path, args, message, imported):
    """Each mistake of the command line or the recipe is one line and exit 2 before torch,
    transformers, datasets or DeepSpeed is imported (tools/bench_errors.py measures the time)."""
    script = REPORT_IMPORTS.format(heavy=HEAVY)
    line = ["train", str(RECIPE), "--output-dir", str(tmp_path / "run"), *args]
    proc = subprocess.run(
        [sys.executable, "-c", script, *line], cwd=REPO, capture_output=True, text=True
    )
    error, modules = proc.stderr.splitlines()
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert re.match(f"error: .*{message}", error), error
    assert modules == imported


def test_eval_without_data_is_reported_before_the_model_loads(tmp_path, cache):
    from tail_kd.models import build_tiny_pair

    teacher, _ = build_tiny_pair(cache / "tiny")
    script = REPORT_IMPORTS.format(heavy=HEAVY)
    for args, message in [
        ([], "no data to score: pass --data RECIPE.yaml or a data file"),
        (["--data", str(tmp_path / "held_out.jsonl")], "held_out.jsonl: no such file or directory"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-c", script, "eval", teacher, *args],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        error, modules = proc.stderr.splitlines()
        assert proc.returncode == EXIT_USAGE and message in error, proc.stderr
        assert modules == ""


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root only; skips the test where it cannot be mounted)."""
    path.mkdir()
    mounted = os.geteuid() == 0 and (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode == 0
    )
    if not mounted:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def keep_signal_handlers():
    """`main` installs the trainer's signal handlers in this process: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys, keep_signal_handlers):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    run_dir = tmp_path / "run"
    assert main([str(RECIPE), "--output-dir", str(run_dir), "--set", "device=cuda"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert (
        err
        == "error: device: cuda was requested but no GPU is visible; use --set device=cpu (or auto)\n"
    )


def test_unwritable_output_dir_is_named_before_anything_starts(
    tmp_path, capsys, keep_signal_handlers
):
    (tmp_path / "a_file").write_text("")
    assert main([str(RECIPE), "--output-dir", str(tmp_path / "a_file" / "run")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"output dir {tmp_path / 'a_file' / 'run'} cannot be created" in err
    assert "is not a directory; choose another --output-dir" in err

    # Read-only: a read-only mount stops root too (root ignores permission bits).
    with tmpfs(tmp_path / "read_only", "ro,size=1m") as read_only:
        assert main([str(RECIPE), "--output-dir", str(read_only / "run")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"output dir {read_only / 'run'} is not writable: cannot create a file in" in err
    assert "Read-only file system" in err and "choose another --output-dir" in err


# --------------------------------------------------------------------------------------------
# Non-finite loss and gradients; resuming past debris of killed checkpoint writes
# --------------------------------------------------------------------------------------------

NONFINITE = [
    "train.steps=8",
    "checkpoint.every=3",
    "debug.nan_loss_steps=[2]",
    "debug.nan_grad_steps=[4,5]",
    "train.max_skipped_steps=2",
]


@pytest.fixture(scope="module")
def nonfinite(workdir, cache) -> Run:
    return launch(workdir / "nonfinite", cache, NONFINITE)


def fp32_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)


def test_nonfinite_steps_are_skipped_counted_then_stop_the_run(nonfinite):
    run = nonfinite
    assert run.exited_with(EXIT_DIVERGED), run.output
    out, err = run.proc.stdout, run.proc.stderr
    assert "step 2: update skipped (1 in a row" in out
    assert "the loss is not finite (rank 0, micro-batch 1 of 2: loss nan, ce " in out
    assert "step 4: update skipped (1 in a row" in out  # step 3 was fine: the count restarted
    # The first bad tensor: from the second skipped step in a row on, the parameter is named.
    assert "step 5: update skipped (2 in a row" in out
    assert "the gradient of student.model.norm.weight is not finite" in out
    assert "error: stopped after step 5: the last 2 updates were skipped" in err
    assert "step 5: the gradient of student.model.norm.weight is not finite" in err

    scalars = run.scalars()
    assert scalars["train/skipped_steps"] == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 3)]
    losses = dict(scalars["train/loss"])
    assert losses[2] != losses[2] and all(abs(losses[s]) < 100 for s in (1, 3, 4, 5))
    # Stopped with a checkpoint; skipped updates left the weights (and Adam) as after step 3.
    assert [c.step for c in complete_checkpoints(run.dir)] == [3, 5]
    assert read_done(run.dir) is None
    after_3 = fp32_weights(find_checkpoint(run.dir, step=3).path)
    after_5 = fp32_weights(find_checkpoint(run.dir, step=5).path)
    assert after_3.keys() == after_5.keys()
    for name, value in after_3.items():
        assert torch.equal(value, after_5[name]), name


def test_a_requeued_job_resumes_even_when_its_command_says_overwrite(workdir, cache):
    """A Slurm job submitted with --overwrite and requeued (SLURM_RESTART_COUNT=1) runs the same
    command again: the trainer must continue from the checkpoint, not delete it."""
    sets = ["train.steps=2", "checkpoint.every=1"]
    first = launch(workdir / "requeued", cache, sets, "--overwrite", "--stop-after-steps", "1")
    assert first.exited_with(0), first.output
    assert [c.step for c in complete_checkpoints(first.dir)] == [1], first.output
    again = launch(first.dir, cache, sets, "--overwrite", SLURM_RESTART_COUNT="1")
    again.assert_finished(2)
    assert f"resumed from {first.dir / 'checkpoints' / 'step-0000001'}" in again.proc.stdout
    assert [c.step for c in complete_checkpoints(again.dir)] == [1, 2]


def plant_killed_writes(run_dir: Path) -> None:
    """What `kill -9` leaves when it strikes while checkpoints are written after step 5: step 6
    killed inside DeepSpeed's write (a temporary folder with a truncated shard), step 7 killed
    after the rename but before COMPLETE (whole files, no marker; its shard damaged here, so that
    loading it would fail loudly)."""
    newest = find_checkpoint(run_dir).path
    root = run_dir / "checkpoints"
    partial = root / "tmp-step-0000006" / DEEPSPEED_TAG
    partial.mkdir(parents=True)
    for shard in (newest / DEEPSPEED_TAG).iterdir():
        (partial / shard.name).write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    unmarked = root / "step-0000007"
    shutil.copytree(newest, unmarked)
    (unmarked / "COMPLETE").unlink()
    for shard in (unmarked / DEEPSPEED_TAG).glob("*optim_states.pt"):
        shard.write_bytes(b"damaged")


@pytest.fixture(scope="module")
def resumed(nonfinite, cache) -> Run:
    plant_killed_writes(nonfinite.dir)
    return launch(nonfinite.dir, cache, NONFINITE, "--resume")


def test_resume_after_killed_checkpoint_writes_uses_the_newest_complete_one(resumed):
    resumed.assert_finished(8)
    step_5 = resumed.dir / "checkpoints" / "step-0000005"
    assert f"resumed from {step_5} (step 5)" in resumed.proc.stdout, resumed.output
    losses = resumed.scalars()["train/loss"]
    assert [step for step, _ in losses][-3:] == [6, 7, 8]
    assert all(abs(value) < 100 for _, value in losses[-3:])
    # The debris was replaced or removed; keep=2 complete checkpoints remain.
    assert sorted(p.name for p in (resumed.dir / "checkpoints").iterdir()) == [
        "step-0000006",
        "step-0000008",
    ]


# --------------------------------------------------------------------------------------------
# Disk full while checkpointing
# --------------------------------------------------------------------------------------------


def fill(folder: Path) -> None:
    """Write zeros into `folder` until its filesystem is full."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as filler:
        while True:
            filler.write(bytes(1 << 20))
            filler.flush()


def test_disk_full_while_checkpointing_stops_and_keeps_the_previous_checkpoint(workdir, cache):
    with tmpfs(workdir / "small_disk", "size=16m") as disk:
        run_dir = disk / "run"
        sets = ["train.steps=8", "checkpoint.every=2", f"log.tensorboard_dir={workdir / 'tb'}"]
        proc = subprocess.Popen(
            command(run_dir, cache, sets),
            cwd=REPO,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("checkpoint: "):
                fill(disk)  # after the first checkpoint: the next one meets a full disk
                break
        stdout, stderr = proc.communicate(timeout=300)
        output = "".join(lines) + stdout + "\n--- stderr\n" + stderr[-4000:]
        assert proc.returncode == EXIT_CHECKPOINT_WRITE or EXIT_ABORT in stderr, output
        first = run_dir / "checkpoints" / "step-0000002"
        assert f"could not write checkpoint {run_dir / 'checkpoints' / 'tmp-step-0000004'}" in (
            stderr
        ), output
        assert "disk full" in stderr and "Free space on that filesystem" in stderr
        assert f"the newest complete checkpoint, {first}, is intact" in stderr
        assert "rerun with --resume" in stderr
        # The previous checkpoint is complete and loads; the unfinished one is gone.
        assert [c.path for c in complete_checkpoints(run_dir)] == [first]
        assert sorted(p.name for p in first.parent.iterdir()) == ["step-0000002"]
        assert fp32_weights(first)


# --------------------------------------------------------------------------------------------
# A rank that dies or hangs
# --------------------------------------------------------------------------------------------

TIMEOUT_S = 30


def test_a_killed_rank_makes_the_others_exit_within_the_timeout(workdir, cache):
    """Ranks started one by one (as srun starts them): nothing but the trainer itself ends
    rank 0 when rank 1 dies."""
    run_dir = workdir / "rank_lost"
    line = command(run_dir, cache, ["train.steps=1000", "checkpoint.every=2"])
    shared = dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        TAIL_KD_COLLECTIVE_TIMEOUT=str(TIMEOUT_S),
    )
    log_1 = open(workdir / "rank_lost_1.log", "w")
    rank_1 = subprocess.Popen(
        line,
        cwd=REPO,
        env=environment(**shared, RANK="1", LOCAL_RANK="1"),
        stdout=log_1,
        stderr=subprocess.STDOUT,
    )
    rank_0 = subprocess.Popen(
        line,
        cwd=REPO,
        env=environment(**shared, RANK="0", LOCAL_RANK="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for text in rank_0.stdout:
            lines.append(text)
            if text.startswith("step 3/"):
                rank_1.kill()  # SIGKILL
                killed = time.monotonic()
                break
        lines.append(rank_0.communicate(timeout=TIMEOUT_S + 60)[0])
        elapsed = time.monotonic() - killed
    finally:
        for proc in (rank_0, rank_1):
            if proc.poll() is None:
                proc.kill()
        log_1.close()
    output = "".join(lines)
    assert rank_0.returncode == EXIT_RANK_LOST, output
    assert elapsed < TIMEOUT_S + 30, (elapsed, output)
    assert "error on rank 0: a collective operation failed" in output
    assert "Another rank has died, hangs or cannot be reached" in output
    assert f"Collectives give up after {TIMEOUT_S} s" in output
    assert "Newest complete checkpoint: step 2; rerun with --resume" in output


SLOW_TOKENIZER = textwrap.dedent(
    """
    import time
    import tail_kd.data.pretrain as pretrain
    _build = pretrain.build
    def build(*args, **kwargs):
        time.sleep(15)  # tokenising takes longer than the ranks' collective timeout
        return _build(*args, **kwargs)
    pretrain.build = build
    """
)


def two_ranks(run_dir: Path, cache: Path, sets: list[str], hook: str, **env: str) -> list[str]:
    """Two ranks started like srun tasks, each with `hook` as its sitecustomize (run at start-up);
    returns their outputs once both have ended."""
    hooks = run_dir.parent / f"{run_dir.name}_hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(hook)
    shared = dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        PYTHONPATH=os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
        **env,
    )
    ranks = [
        subprocess.Popen(
            command(run_dir, cache, sets),
            cwd=REPO,
            env=environment(**shared, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    return [proc.communicate(timeout=300)[0] for proc in ranks]


def test_ranks_wait_for_a_long_tokenisation_on_a_lock_not_in_a_collective(workdir, cache):
    """A large corpus takes longer to tokenise than the process group's watchdog allows: the
    rank that builds the data cache and the ranks that wait for it must not be in a collective
    meanwhile (here a 15 s build against a 6 s collective timeout)."""
    run_dir = workdir / "slow_data"
    sets = ["train.steps=2", f"data.cache_dir={workdir / 'slow_data_cache'}"]
    outputs = two_ranks(run_dir, cache, sets, SLOW_TOKENIZER, TAIL_KD_COLLECTIVE_TIMEOUT="6")
    run = Run(run_dir, subprocess.CompletedProcess([], 0, outputs[0], ""))
    run.assert_finished(2)
    assert "waiting for another process to finish building data cache" in "".join(outputs)


RANK_0_LATE = textwrap.dedent(
    """
    import os, time
    if os.environ.get("RANK") == "0":
        time.sleep(10)  # rank 1 gets to the empty cache first and builds the tiny teacher
    """
)


def test_a_cache_built_by_another_rank_than_0_is_whole(workdir):
    """transformers writes a model folder only on rank 0 of an initialised process group: caches
    are built before the group exists, so rank 1 building the teacher is fine."""
    run_dir = workdir / "rank1_builds"
    outputs = two_ranks(run_dir, workdir / "rank1_cache", ["train.steps=1"], RANK_0_LATE)
    run = Run(run_dir, subprocess.CompletedProcess([], 0, outputs[0], ""))
    run.assert_finished(1)


HANG = textwrap.dedent(
    """
    import sys, time
    from tail_kd.distributed import collective_failure, init_distributed
    ctx = init_distributed("cpu")
    ctx.barrier()
    if ctx.rank == 1:
        time.sleep(600)  # hangs
    start = time.monotonic()
    try:
        ctx.barrier()
    except Exception as error:
        print("failed", collective_failure(error), round(time.monotonic() - start, 1), flush=True)
    import os; os._exit(0)
    """
)


def test_a_hung_rank_makes_collectives_time_out():
    shared = dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        TAIL_KD_COLLECTIVE_TIMEOUT="5",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HANG],
            cwd=REPO,
            env=environment(**shared, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        out = procs[0].communicate(timeout=120)[0]
    finally:
        for proc in procs:
            proc.kill()
    failed = [line.split() for line in out.splitlines() if line.startswith("failed ")]
    assert failed and failed[0][1] == "True", out
    assert 4 <= float(failed[0][2]) < 20, out


def test_collective_timeout_settings():
    from datetime import timedelta

    from tail_kd.distributed import collective_timeout

    assert collective_timeout({}) == timedelta(minutes=30)
    assert collective_timeout({"DEEPSPEED_TIMEOUT": "5"}) == timedelta(minutes=5)
    both = {"DEEPSPEED_TIMEOUT": "5", "TAIL_KD_COLLECTIVE_TIMEOUT": "2.5"}
    assert collective_timeout(both) == timedelta(seconds=2.5)
    with pytest.raises(ValueError, match="TAIL_KD_COLLECTIVE_TIMEOUT must be a number"):
        collective_timeout({"TAIL_KD_COLLECTIVE_TIMEOUT": "soon"})
