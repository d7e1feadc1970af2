"""The slurm/ scripts on a real Slurm cluster, in CPU mode, with the tiny recipe.

`tools/slurm_ci.sh up 2` starts a throw-away cluster of two nodes emulated on this host (their
names do not resolve, so the scripts must take the rendezvous address from `scontrol show node`);
the tests skip only where it cannot be started (not root, no apt-get). Four jobs are submitted
together with `sbatch --wait` (one module fixture; they share the tiny model and data cache):

    multinode   train_multinode.sbatch, 2 nodes x 1 rank, srun             -> exit code, DONE,
                                                                              checkpoint, export,
                                                                              TensorBoard
    deepspeed   the same through the DeepSpeed launcher (--launcher slurm)  -> exit code, DONE
    single      train_single_gpu.sbatch, 1 rank, with ZeRO-3 offload of   -> exit code, DONE
                parameters and optimizer and activation checkpointing
    preempted   train_multinode.sbatch, 60 steps; SIGUSR1 to the batch     -> checkpointed,
                shell after its first checkpoint                              requeued, resumed,
                                                                              finished, one curve
    cancelled   the same, `scancel` after its first checkpoint              -> not requeued

Then a sweep (`tail-kd sweep --slurm`, slurm/sweep.sbatch): a 2 x 2 grid of loss.k x loss.beta as
a job array of four one-rank tasks, the first preempted (SIGUSR1) after its first checkpoint ->
every point finished in its own run directory, the preempted one requeued and resumed,
`tail-kd report` on the sweep, and a resubmission that has nothing left to do.

A run counts as finished by its own DONE marker as well as by the job's exit code (a rank rarely
aborts at interpreter exit after a complete run: tests/helpers.py, EXIT_ABORT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, RUN_NAME
from tail_kd.monitor import read_scalars
from tail_kd.run_dir import complete_checkpoints, read_done

HELPER = REPO / "tools" / "slurm_ci.sh"
MULTINODE = REPO / "slurm" / "train_multinode.sbatch"
SINGLE = REPO / "slurm" / "train_single_gpu.sbatch"
RECIPE = "recipes/tiny/tad.yaml"  # relative: jobs run in the repository root, as users submit
EX_CANNOT = 77  # tools/slurm_ci.sh: Slurm cannot be started here
STEPS = 4
PREEMPT_STEPS = 60
JOB_TIMEOUT = 600
# Start a requeued job 3 s from now instead of Slurm's ~2 minutes. Not at once: slurmd refuses a
# launch whose credential is dated the second the previous run's was revoked ("Killing
# non-startable batch JobId=...: Job credential revoked" in slurmctld.log, and the job ends with
# status 1), which happened about once in ten runs.
RELEASE = "StartTime=now+3"
# CPU-only resources for the scripts' GPU defaults (options on the sbatch command line win).
CPU_MULTINODE = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
CPU_SINGLE = ["--gpus=0", "--cpus-per-task=1", "--mem=2G"]


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for Slurm commands on the throw-away cluster (started here, stopped at the end
    unless it was already up, e.g. started by CI)."""
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root to start a throw-away cluster (tools/slurm_ci.sh up)")
    if shutil.which("bash") is None:
        pytest.skip("Slurm tests need bash")
    up = subprocess.run(
        ["bash", str(HELPER), "up", "2"], check=False, capture_output=True, text=True, timeout=900
    )
    if up.returncode == EX_CANNOT:
        pytest.skip(f"Slurm cannot be started here: {up.stderr.strip()}")
    assert up.returncode == 0, f"tools/slurm_ci.sh up 2 failed:\n{up.stdout}\n{up.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", up.stdout).group(1)
    yield {**os.environ, "SLURM_CONF": conf}
    if "already up" not in up.stderr:
        subprocess.run(["bash", str(HELPER), "down"], check=False, capture_output=True, timeout=120)


def slurm(env: dict[str, str], *args: str) -> str:
    """Run a Slurm command on the test cluster; its stdout."""
    return subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout


def job_fields(env: dict[str, str], job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ...); {} once the job is forgotten."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """One `sbatch --wait` submission with its own runs directory."""

    name: str  # the Slurm job name
    runs: Path  # TAIL_KD_RUNS_DIR: the job's output dir is made inside
    proc: subprocess.Popen
    returncode: int | None = None
    restarts_seen: int = 0  # the highest Restarts= scontrol showed while the job ran
    sbatch_stderr: str | None = None

    @property
    def log(self) -> str:
        """The job log, and what sbatch said if it has ended (for failure messages)."""
        logs = list(self.runs.parent.glob(f"{self.name}-*.out"))
        text = logs[0].read_text(errors="replace") if logs else "(no job log)"
        if self.sbatch_stderr is None and self.proc.poll() is not None:
            self.sbatch_stderr = self.proc.stderr.read()
        return f"{text}\n--- sbatch: {self.sbatch_stderr or ''}"

    @property
    def job_id(self) -> str | None:
        logs = list(self.runs.parent.glob(f"{self.name}-*.out"))
        return logs[0].stem.rsplit("-", 1)[1] if logs else None

    @property
    def run_dir(self) -> Path:
        """runs/<recipe name>-<job id>, the scripts' default output dir."""
        return self.runs / f"{RUN_NAME}-{self.job_id}"

    def done(self) -> dict | None:
        return read_done(self.run_dir)

    def trainer_state(self, step: int) -> dict:
        checkpoints = {c.step: c for c in complete_checkpoints(self.run_dir)}
        assert step in checkpoints, f"no complete checkpoint of step {step}\n{self.log}"
        return checkpoints[step].trainer_state

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        """A TensorBoard scalar as TensorBoard itself reads it back: [(step, value)]."""
        return read_scalars(self.run_dir / "tensorboard" / RUN_NAME)[tag]

    def assert_finished(self, steps: int) -> None:
        done = self.done()
        assert self.returncode == 0, f"sbatch --wait returned {self.returncode}\n{self.log}"
        assert done is not None and done["step"] == steps, self.log


def venv_setting() -> str:
    """TAIL_KD_VENV for the jobs: the virtualenv running the tests, or none (keep PATH)."""
    in_venv = sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file()
    return sys.prefix if in_venv else "none"


def submit(
    env: dict[str, str],
    workdir: Path,
    name: str,
    script: Path,
    sbatch_options: list[str],
    train_args: list[str],
    **settings: str,
) -> Job:
    """Submit `script RECIPE train_args` from the repository root, in CPU mode."""
    folder = workdir / name
    folder.mkdir(parents=True)
    runs = folder / "runs"
    job_name = f"tail-kd-test-{name}"  # unlike other users' jobs, for scancel --name
    job_env = {
        **env,
        "TAIL_KD_DEVICE": "cpu",
        "TAIL_KD_RUNS_DIR": str(runs),
        "TAIL_KD_VENV": venv_setting(),
        **settings,
    }
    command = [
        "sbatch", "--wait", f"--job-name={job_name}", f"--output={folder}/%x-%j.out",
        *sbatch_options, str(script), RECIPE,
        "--set", f"cache_dir={workdir / 'cache'}", *train_args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=REPO, env=job_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return Job(job_name, runs, proc)


def wait(job: Job, deadline: float) -> None:
    try:
        job.returncode = job.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{job.name} did not finish within {JOB_TIMEOUT} s\n{job.log}")


def wait_for_a_checkpoint(job: Job, deadline: float) -> None:
    while not list(job.runs.glob("*/checkpoints/step-*/COMPLETE")):
        assert job.proc.poll() is None, f"{job.name} ended before its first checkpoint\n{job.log}"
        assert time.monotonic() < deadline, f"no checkpoint from {job.name}\n{job.log}"
        time.sleep(0.2)


def watch_requeues(env: dict[str, str], preempted: Job, cancelled: Job, deadline: float) -> None:
    """Until both jobs end, note their Restarts=; start `preempted` soon when it is requeued
    (`RELEASE`; it would otherwise wait ~2 minutes); cancel `cancelled` again if it was requeued."""
    restarted = recancelled = False
    while None in (preempted.proc.poll(), cancelled.proc.poll()) and time.monotonic() < deadline:
        for job in (preempted, cancelled):
            fields = job_fields(env, job.job_id)
            job.restarts_seen = max(job.restarts_seen, int(fields.get("Restarts", 0)))
            requeued = fields.get("JobState") == "PENDING" and job.restarts_seen >= 1
            if requeued and job is preempted and not restarted:
                slurm(env, "scontrol", "update", f"JobId={job.job_id}", RELEASE)
                restarted = True
            if requeued and job is cancelled and not recancelled:
                slurm(env, "scancel", job.job_id)
                recancelled = True
        time.sleep(0.2)


def as_sets(overrides: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]"""
    return [arg for override in overrides for arg in ("--set", override)]


def small_gpu_overrides() -> list[str]:
    """The `--set` flags `tail-kd plan` gives for a GPU too small for a recipe: ZeRO-3 offload
    of the parameters and the optimizer, and activation checkpointing (its DeepSpeed CPU Adam
    flag is left out: the op compiles for ~40 s)."""
    return [
        "deepspeed.zero_optimization.offload_param.device=cpu",
        "deepspeed.zero_optimization.offload_optimizer.device=cpu",
        "train.activation_checkpointing=true",
    ]


@pytest.fixture(scope="module")
def jobs(slurm_env, tmp_path_factory) -> dict[str, Job]:
    workdir = tmp_path_factory.mktemp("slurm")
    short = as_sets([f"train.steps={STEPS}", "checkpoint.every=2", "eval.every=2"])
    single = as_sets(small_gpu_overrides())
    long_run = as_sets([f"train.steps={PREEMPT_STEPS}", "checkpoint.every=5", "eval.every=20"])
    started = time.monotonic()
    deadline = started + JOB_TIMEOUT
    submitted = {
        "preempted": submit(slurm_env, workdir, "preempted", MULTINODE, CPU_MULTINODE, long_run),
        "multinode": submit(slurm_env, workdir, "multinode", MULTINODE, CPU_MULTINODE, short),
        "deepspeed": submit(
            slurm_env, workdir, "deepspeed", MULTINODE, CPU_MULTINODE, short,
            TAIL_KD_LAUNCHER="deepspeed",
        ),
        "single": submit(slurm_env, workdir, "single", SINGLE, CPU_SINGLE, short + single),
        "cancelled": submit(slurm_env, workdir, "cancelled", MULTINODE, CPU_MULTINODE, long_run),
    }  # fmt: skip
    preempted, cancelled = submitted["preempted"], submitted["cancelled"]
    try:
        wait_for_a_checkpoint(preempted, deadline)
        slurm(slurm_env, "scancel", "--signal=USR1", "--batch", preempted.job_id)
        wait_for_a_checkpoint(cancelled, deadline)
        slurm(slurm_env, "scancel", cancelled.job_id)
        watch_requeues(slurm_env, preempted, cancelled, deadline)
        for job in submitted.values():
            wait(job, deadline)
    finally:  # leave no job behind when something above failed
        for job in submitted.values():
            if job.proc.poll() is None:
                subprocess.run(["scancel", f"--name={job.name}"], check=False, env=slurm_env)
                job.proc.wait()
    print(f"slurm jobs: {time.monotonic() - started:.0f} s")
    return submitted


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


def test_multinode_srun_trains_checkpoints_and_exports(jobs, tmp_path):
    from transformers import AutoModelForCausalLM

    from tail_kd.export import export

    job = jobs["multinode"]
    job.assert_finished(STEPS)
    assert job.run_dir.is_dir(), job.log  # runs/<recipe>-<job id>
    assert job.trainer_state(STEPS)["world_size"] == 2
    # The emulated nodes' names do not resolve: the address came from `scontrol show node`.
    assert re.search(r"rendezvous 127\.0\.0\.1:\d+", job.log), job.log
    assert re.search(r"launch: srun .*-m tail_kd\.train", job.log), job.log
    assert [step for step, _ in job.scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [step for step, _ in job.scalars("eval/ce")] == [0, 2, 4]

    out = export(job.run_dir, tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2


def test_multinode_through_the_deepspeed_launcher(jobs):
    job = jobs["deepspeed"]
    job.assert_finished(STEPS)
    assert job.trainer_state(STEPS)["world_size"] == 2
    assert "--launcher slurm" in job.log and re.search(r"cmd = srun -n 2 ", job.log), job.log


def test_single_gpu_script_runs_with_offload_and_checkpointing(jobs):
    job = jobs["single"]
    job.assert_finished(STEPS)
    state = job.trainer_state(STEPS)
    assert state["world_size"] == 1
    zero = state["recipe"]["deepspeed"]["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert state["recipe"]["train"]["activation_checkpointing"] is True
    assert [step for step, _ in job.scalars("train/loss")] == list(range(1, STEPS + 1))


def test_preempted_job_checkpoints_requeues_resumes_and_finishes(jobs):
    job = jobs["preempted"]
    log = job.log
    job.assert_finished(PREEMPT_STEPS)
    # First run: the signal reached the ranks, which checkpointed the step they were in.
    assert "SIGUSR1 (preemption" in log and "SIGUSR1 received" in log, log
    stopped = int(re.search(r"stopped by a signal after step (\d+)", log).group(1))
    assert 5 <= stopped < PREEMPT_STEPS, log
    assert f"checkpoint: {job.run_dir}/checkpoints/step-{stopped:07d}" in log, log
    assert f"requeued job {job.job_id}: its next run resumes from step {stopped}" in log, log
    # Second run: the same job, restarted, resumed from that checkpoint in the same output dir.
    assert job.restarts_seen >= 1, log
    assert re.search(r"job \d+, restart 1,", log), log
    assert "requeued Slurm job (restart 1): resuming" in log, log
    assert f"resumed from {job.run_dir}/checkpoints/step-{stopped:07d} (step {stopped})" in log
    assert log.count("finished at step") == 1, log
    # One continuous loss curve in one TensorBoard run: every step once, in order.
    assert [step for step, _ in job.scalars("train/loss")] == list(range(1, PREEMPT_STEPS + 1))
    assert [step for step, _ in job.scalars("eval/ce")] == [0, 20, 40, 60]


def test_cancelled_job_is_not_requeued(jobs):
    job = jobs["cancelled"]
    assert "SIGTERM: the job is being cancelled" in job.log, job.log
    assert "requeued job" not in job.log and job.done() is None, job.log
    assert job.restarts_seen == 0, job.log


# ---------------------------------------------------------------------------------------------
# A sweep as a job array
# ---------------------------------------------------------------------------------------------

SWEEP_STEPS = 30
SWEEP_GRID = ["loss.k=1,5", "loss.beta=1,2"]


def sweep_command(slurm_env: dict[str, str], out: Path, cache: Path) -> subprocess.CompletedProcess:
    """`tail-kd sweep RECIPE --grid ... --slurm` in CPU mode, one CPU per task."""
    sets = [f"train.steps={SWEEP_STEPS}", "checkpoint.every=5", "eval.every=10",
            f"cache_dir={cache}"]  # fmt: skip
    command = [
        sys.executable, "-m", "tail_kd.cli", "sweep", RECIPE, "--grid", *SWEEP_GRID,
        *as_sets(sets), "--out", str(out), "--slurm",
        "--sbatch", " ".join([*CPU_SINGLE, "--job-name=tail-kd-test-sweep"]),
    ]  # fmt: skip
    env = {**slurm_env, "TAIL_KD_DEVICE": "cpu", "TAIL_KD_VENV": venv_setting()}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sweep_array(slurm_env, tmp_path_factory) -> dict:
    """The sweep, run to the end: task 0 gets SIGUSR1 after its first checkpoint; when it is
    requeued it is started soon (`RELEASE`)."""
    from tail_kd.sweep import Sweep

    workdir = tmp_path_factory.mktemp("slurm-sweep")
    out = workdir / "sweep"
    started = time.monotonic()
    deadline = started + JOB_TIMEOUT
    submitted = sweep_command(slurm_env, out, workdir / "cache")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    array = re.search(r"submitted job array (\d+)", submitted.stdout).group(1)
    sweep = Sweep.load(out)
    first = sweep.run_dir(sweep.points[0])

    def log(index: int) -> str:
        logs = list((out / "logs").glob(f"*-{array}_{index}.out"))
        return logs[0].read_text(errors="replace") if logs else "(no log yet)"

    try:
        while not list(first.glob("checkpoints/step-*/COMPLETE")):
            assert time.monotonic() < deadline, f"no checkpoint from task 0\n{log(0)}"
            time.sleep(0.2)
        slurm(slurm_env, "scancel", "--signal=USR1", "--batch", f"{array}_0")
        restarts, released = 0, False
        while slurm(slurm_env, "squeue", "-h", "-j", array, "-o", "%i").strip():
            assert time.monotonic() < deadline, "the sweep did not finish\n" + log(0)
            fields = job_fields(slurm_env, f"{array}_0")
            restarts = max(restarts, int(fields.get("Restarts", 0)))
            if fields.get("JobState") == "PENDING" and restarts >= 1 and not released:
                slurm(slurm_env, "scontrol", "update", f"JobId={array}_0", RELEASE)
                released = True
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", array], check=False, env=slurm_env)
    print(f"slurm sweep: {time.monotonic() - started:.0f} s")
    return {"out": out, "sweep": sweep, "logs": [log(i) for i in range(4)], "restarts": restarts,
            "workdir": workdir}  # fmt: skip


def test_sweep_array_trains_every_point_in_its_own_run_dir(sweep_array):
    sweep, logs = sweep_array["sweep"], sweep_array["logs"]
    assert [p.name for p in sweep.points] == ["k1-beta1-s0", "k1-beta2-s0", "k5-beta1-s0",
                                              "k5-beta2-s0"]  # fmt: skip
    for index, point in enumerate(sweep.points):
        run = sweep.run_dir(point)
        assert (read_done(run) or {}).get("step") == SWEEP_STEPS, logs[index]
        loss = complete_checkpoints(run)[-1].trainer_state["recipe"]["loss"]
        k, beta = point.sets[0], point.sets[1]
        assert f"loss.k={loss['k']}" == k and f"loss.beta={loss['beta']:g}" == beta
        steps = [s for s, _ in read_scalars(run / "tensorboard" / point.name)["train/loss"]]
        assert steps == list(range(1, SWEEP_STEPS + 1)), logs[index]
        assert f"point {index}" in logs[index] and "finished at step 30" in logs[index]


def test_a_preempted_sweep_task_is_requeued_and_resumes_its_point(sweep_array):
    log, run = sweep_array["logs"][0], sweep_array["sweep"].run_dir(sweep_array["sweep"].points[0])
    stopped = int(re.search(r"stopped by a signal after step (\d+)", log).group(1))
    assert 5 <= stopped < SWEEP_STEPS, log
    assert sweep_array["restarts"] >= 1, log
    assert f"resumed from {run}/checkpoints/step-{stopped:07d} (step {stopped})" in log, log
    assert log.count("finished at step") == 1, log


def test_the_report_and_a_resubmission_of_a_finished_sweep(sweep_array, slurm_env):
    out = sweep_array["out"]
    report = subprocess.run(
        [sys.executable, "-m", "tail_kd.cli", "report", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0, report.stdout + report.stderr
    results = json.loads((out / "report" / "results.json").read_text())
    assert list(results["groups"]) == ["tad-k1-b1", "tad-k1-b2", "tad-k5-b1", "tad-k5-b2"]
    assert (out / "report" / "metric_vs_k_beta.png").stat().st_size > 0
    again = sweep_command(slurm_env, out, sweep_array["workdir"] / "cache")
    assert again.returncode == 0 and "every point has finished" in again.stdout, again.stdout
    assert "submitted" not in again.stdout


# ---------------------------------------------------------------------------------------------
# Without jobs: the resolved command (--dry-run), the recipes, the shell
# ---------------------------------------------------------------------------------------------


def dry_run(script: Path, *args: str, **env: str) -> str:
    """The launch command a dry run of `script` prints."""
    return re.search(r"launch: (.*)", dry_run_log(script, *args, **env)).group(1).strip()


def dry_run_log(script: Path, *args: str, **env: str) -> str:
    """Everything a dry run of `script` prints (it must succeed)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TAIL_KD_"))}
    proc = subprocess.run(
        ["bash", str(script), *args],
        check=False,
        cwd=REPO,
        env={**clean, "TAIL_KD_VENV": "none", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_dry_run_prints_the_launch_command():
    launch = dry_run(MULTINODE, RECIPE, "--dry-run", SLURM_JOB_ID="123", TAIL_KD_DEVICE="cpu")
    assert launch.startswith("srun --kill-on-bad-exit=1 python -u -m tail_kd.train")
    assert f"{RECIPE} --set device=cpu --output-dir runs/tiny-tad-123" in launch
    assert "--resume" not in launch

    launch = dry_run(SINGLE, RECIPE, "--overwrite", TAIL_KD_DRY_RUN="1")
    assert launch.startswith("srun --ntasks=1 python -u -m tail_kd.train")
    assert "--overwrite" in launch


def test_given_output_dir_with_a_checkpoint_is_resumed(tmp_path):
    (tmp_path / "checkpoints" / "step-0000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000010" / "COMPLETE").write_text('{"step": 10}')
    (tmp_path / "checkpoints" / "tmp-step-0000020").mkdir()  # unpublished: ignored
    log = dry_run_log(MULTINODE, RECIPE, "--output-dir", str(tmp_path), "--dry-run")
    launch = re.search(r"launch: (.*)", log).group(1).strip()
    assert launch.endswith(f"--output-dir {tmp_path} --resume")
    assert "(newest complete checkpoint: step 10)" in log


def test_a_fresh_job_says_it_has_no_checkpoint_and_checks_the_recipe(tmp_path):
    log = dry_run_log(MULTINODE, RECIPE, "--dry-run", SLURM_JOB_ID="124")
    assert "(newest complete checkpoint: none)" in log
    bad = subprocess.run(
        ["bash", str(MULTINODE), RECIPE, "--set", "train.lr=fast", "--dry-run"],
        cwd=REPO, env={**os.environ, "TAIL_KD_VENV": "none"}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0 and "--set train.lr: expected a number" in bad.stderr


def test_deepspeed_launcher_command():
    launch = dry_run(
        MULTINODE, RECIPE, "--dry-run", TAIL_KD_LAUNCHER="deepspeed", TAIL_KD_DEVICE="cpu"
    )
    assert launch.startswith("deepspeed --hostfile ")
    assert "--launcher slurm --force_multi --no_ssh_check" in launch
    assert "--num_gpus" not in launch  # CPU mode: no srun --gpus-per-node


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    files = [*sorted((REPO / "slurm").glob("*.sbatch")), REPO / "slurm" / "common.sh", HELPER]
    proc = subprocess.run(
        ["shellcheck", "-x", *map(str, files)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout
