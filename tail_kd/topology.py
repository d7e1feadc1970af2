"""Who am I in the job: the launcher's variables, read into a `Topology`.

One training script serves every way of starting it:

    launcher                        what it tells each process
    deepspeed --num_gpus N ...      RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR/PORT,
                                    and the argument --local_rank
    torchrun --nproc-per-node N     RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT
    srun (one task per rank)        only SLURM_* (PROCID, LOCALID, STEP_NUM_TASKS, STEP_NODELIST,
                                    STEP_TASKS_PER_NODE, NODEID, JOB_ID)
    nothing                         nothing: a single process

`discover_topology` turns any of these into a `Topology`; for srun the rendezvous is the first
node of the step and a port derived from the job id (tail_kd/rendezvous.py), so every task
computes the same pair without talking to the others. Standard library only: the entry point
reads its rank (to know who prints errors) before anything heavy is imported.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from tail_kd.exit_status import UsageError
from tail_kd.rendezvous import slurm_rendezvous

__all__ = ["Topology", "discover_topology", "free_port"]


@dataclass(frozen=True)
class Topology:
    """This process's place in the job, as told by its launcher."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "env" (deepspeed launcher, torchrun), "slurm" (srun) or "single"

    def export(self, environ: dict[str, str]) -> None:
        """Write the torch.distributed `env://` variables (what torchrun would have set)."""
        environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def discover_topology(
    environ: Mapping[str, str] | None = None, local_rank: int | None = None
) -> Topology:
    """Read the launcher's variables (see the module docstring) into a `Topology`.

    Args:
        environ: the environment to read (default `os.environ`).
        local_rank: the deepspeed launcher's `--local_rank` argument, if given; it wins over
            LOCAL_RANK.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torch_env(env, local_rank)
    if _inside_srun_step(env):
        return _from_slurm_env(env)
    if int(env.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            "WORLD_SIZE > 1 but RANK is not set: start the job through deepspeed, torchrun or srun"
        )
    return Topology(0, local_rank or 0, 1, 1, "127.0.0.1", free_port(), "single")


def _from_torch_env(env: Mapping[str, str], local_rank: int | None) -> Topology:
    world_size = int(env["WORLD_SIZE"])
    local_world_size = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world_size)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
    if missing and world_size > 1:
        raise UsageError(
            f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not: set it or use a launcher"
        )
    return Topology(
        rank=int(env["RANK"]),
        local_rank=int(local_rank if local_rank is not None else env.get("LOCAL_RANK", 0)),
        world_size=world_size,
        local_world_size=local_world_size,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT") or free_port()),
        launcher="env",
    )


def _inside_srun_step(env: Mapping[str, str]) -> bool:
    """True in a task started by srun; False in the batch script (which sees SLURM_PROCID too)."""
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_STEP_NODELIST" in env


def _from_slurm_env(env: Mapping[str, str]) -> Topology:
    world_size = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    master_addr, master_port = slurm_rendezvous(env, env["SLURM_STEP_NODELIST"])
    return Topology(
        rank=int(env["SLURM_PROCID"]),
        local_rank=int(env.get("SLURM_LOCALID", 0)),
        world_size=world_size,
        local_world_size=_slurm_tasks_on_this_node(env, world_size),
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
    )


def _slurm_tasks_on_this_node(env: Mapping[str, str], world_size: int) -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE ("4(x2),3") at SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE")
    if not spec:
        return world_size
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return world_size
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[0]


def free_port() -> int:
    """A TCP port that is free on this host right now (for a single-node rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
