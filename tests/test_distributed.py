"""Rank discovery for each launcher (srun's scontrol is faked), and joining a CPU process group."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from tail_kd.distributed import cuda_device_index, resolve_device, shared_devices
from tail_kd.exit_status import UsageError
from tail_kd.rendezvous import first_node_address
from tail_kd.topology import Topology, discover_topology, free_port

# What `scontrol` answers on a cluster whose node names do not resolve (as on the emulated one).
FAKE_SCONTROL = """#!/bin/sh
if [ "$1 $2" = "show hostnames" ]; then
  case "$3" in
    "n[1-2]") printf 'n1\\nn2\\n' ;;
    "localhost") printf 'localhost\\n' ;;
  esac
elif [ "$1 $2 $3" = "show node n1" ]; then
  echo "NodeName=n1 Arch=x86_64 CoresPerSocket=1"
  echo "   NodeAddr=10.1.2.3 NodeHostName=host-a Version=22.05.8"
fi
"""


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    script = tmp_path / "scontrol"
    script.write_text(FAKE_SCONTROL)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_deepspeed_launcher_variables_and_local_rank_argument():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    topology = discover_topology(env, local_rank=1)
    assert (topology.rank, topology.local_rank, topology.world_size) == (3, 1, 4)
    assert topology.local_world_size == 2
    assert (topology.master_addr, topology.master_port, topology.launcher) == (
        "10.0.0.1",
        29500,
        "env",
    )


def test_torchrun_variables():
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1234",
    }
    topology = discover_topology(env)
    assert (topology.rank, topology.world_size, topology.local_world_size) == (0, 2, 2)


def test_missing_master_address_is_an_error():
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        discover_topology({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


def test_srun_task_takes_rank_from_slurm_and_address_from_scontrol(fake_scontrol):
    env = {
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_JOB_ID": "54711",
    }
    topology = discover_topology(env)
    assert (topology.rank, topology.local_rank, topology.world_size) == (1, 0, 2)
    assert topology.local_world_size == 1
    assert topology.master_addr == "10.1.2.3"  # n1 does not resolve: NodeAddr from scontrol
    # 20000 + job id mod 10000: below the kernel's ephemeral ports (32768 and up)
    assert topology.master_port == 20000 + 4711
    assert topology.launcher == "slurm"


SRUN_TASK = {
    "SLURM_PROCID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_JOB_ID": "7",
}


def test_srun_takes_the_explicit_tail_kd_master_variables(fake_scontrol):
    env = {**SRUN_TASK, "TAIL_KD_MASTER_ADDR": "head", "TAIL_KD_MASTER_PORT": "4000"}
    topology = discover_topology(env)
    assert (topology.master_addr, topology.master_port) == ("head", 4000)


def test_a_master_address_inherited_from_the_submitting_shell_is_ignored(fake_scontrol, capsys):
    """sbatch exports the submitting shell's environment: a MASTER_ADDR=127.0.0.1 left by an
    earlier torchrun must not make a multi-node job meet on each node's own loopback."""
    env = {**SRUN_TASK, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    topology = discover_topology(env)
    assert (topology.master_addr, topology.master_port) == ("10.1.2.3", 20007)
    assert "ignoring MASTER_ADDR=127.0.0.1 MASTER_PORT=29500" in capsys.readouterr().err


def test_resolvable_node_name_is_used_as_is(fake_scontrol):
    assert first_node_address("localhost") == "localhost"


def test_batch_script_without_srun_is_a_single_process():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    topology = discover_topology(env)
    assert (topology.rank, topology.world_size, topology.launcher) == (0, 1, "single")


def test_no_launcher_is_a_single_process():
    topology = discover_topology({})
    assert (topology.rank, topology.local_rank, topology.world_size, topology.launcher) == (
        0,
        0,
        1,
        "single",
    )
    assert topology.master_port > 0


def test_topology_exports_env_variables():
    topology = discover_topology({"SLURM_PROCID": "0"})
    env = {}
    topology.export(env)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no GPU is visible; use --set device=cpu"):
            resolve_device("cuda")


def _on_node(local_rank: int, ranks_per_node: int) -> Topology:
    return Topology(local_rank, local_rank, ranks_per_node, ranks_per_node, "n1", 1, "slurm")


def test_each_rank_takes_its_gpu_among_the_visible_ones():
    # Every rank sees every GPU of the node (torchrun, the DeepSpeed launcher, srun unbound).
    assert [cuda_device_index(_on_node(r, 4), visible=4) for r in range(4)] == [0, 1, 2, 3]
    # One GPU per task (--gpus-per-task=1, --gpu-bind=closest): each sees only its own, as 0.
    assert [cuda_device_index(_on_node(r, 4), visible=1) for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(UsageError, match="4 ranks on this node but rank 3 sees 2 GPUs"):
        cuda_device_index(_on_node(3, 4), visible=2)


def test_ranks_sharing_a_gpu_are_found():
    devices = [("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a"), ("n1", "GPU-a")]
    assert shared_devices(devices) == {("n1", "GPU-a"): [0, 3]}
    assert shared_devices(devices[:3]) == {}


SHARED_MEMORY = textwrap.dedent(
    """
    import os, torch
    from tail_kd.distributed import init_distributed
    ctx = init_distributed("cpu")
    import importlib
    ds_comm = importlib.import_module("deepspeed.comm.comm")  # its `cdb` is the live backend
    used = ds_comm.cdb.shm_comm_op is not None and ds_comm.cdb.shm_vector_kernel_level >= 1
    x = torch.full((1000,), float(ctx.rank + 1))
    ds_comm.inference_all_reduce(x)  # through the shared buffers when `used`
    ctx.barrier()
    left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")
            and f"_{os.environ['MASTER_PORT']}_" in n]
    print("rank", ctx.rank, used, x.min().item(), x.max().item(), len(left), flush=True)
    """
)


def test_cpu_ranks_leave_no_shared_memory_behind():
    """The `deepspeed` launcher's LOCAL_SIZE turns on DeepSpeed's shared-memory all-reduce on the
    CPU; its /dev/shm names are gone once the ranks have joined, and the buffers still work."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARED_MEMORY],
            env={
                **os.environ,
                "DS_ACCELERATOR": "cpu",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "WORLD_SIZE": "2",
                "LOCAL_SIZE": "2",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, output in enumerate(outputs):
        lines = [line.split() for line in output.splitlines() if line.startswith("rank ")]
        assert lines == [["rank", str(rank), "True", "3.0", "3.0", "0"]], output
    assert not [n for n in os.listdir("/dev/shm") if f"_{port}_" in n]
