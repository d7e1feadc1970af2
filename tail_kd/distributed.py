"""The process group everyone joins, and the few collectives the trainer needs.

`init_distributed` takes the job's `Topology` (tail_kd/topology.py: rank, world size and
rendezvous, as the launcher told them), picks the device (cpu: DeepSpeed's CPU accelerator and
gloo; cuda: nccl) and joins the process group through `deepspeed.init_distributed`.

Collective timeout: a collective that does not complete within `TAIL_KD_COLLECTIVE_TIMEOUT`
seconds, else `DEEPSPEED_TIMEOUT` minutes (DeepSpeed's own variable, whole minutes), else 30
minutes, raises on the ranks still waiting, so a rank that hangs stops the job instead of leaving
the others blocked forever (a rank that dies usually fails the others' next collective at once:
its connections close). `collective_failure` recognises these errors; the trainer reports them
and exits with status 4. Raise the timeout if rank 0 needs longer alone (e.g. converting a very
large GGUF teacher while the other ranks wait at a barrier). On GPUs, NCCL enforces it through
its watchdog (on by default in torch >= 2.2: TORCH_NCCL_ASYNC_ERROR_HANDLING), which aborts the
waiting process.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from tail_kd.exit_status import UsageError
from tail_kd.topology import Topology, discover_topology

__all__ = [
    "DistContext",
    "collective_failure",
    "collective_timeout",
    "init_distributed",
    "resolve_device",
]

DEFAULT_TIMEOUT_MINUTES = 30
TIMEOUT_SECONDS_VARIABLE = "TAIL_KD_COLLECTIVE_TIMEOUT"


def resolve_device(device: str) -> str:
    """The device a recipe's `device` means: auto is cuda when a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "device: cuda was requested but no GPU is visible; use --set device=cpu (or auto)"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


@dataclass(frozen=True)
class DistContext:
    """The joined process group: identity, device, and the few collectives the trainer needs."""

    topology: Topology
    device: torch.device

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that logs, converts and publishes."""
        return self.topology.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on at least one (one tiny all-reduce)."""
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over all ranks (a new tensor on this rank's device)."""
        total = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def all_gather(self, obj: object) -> list[object]:
        """Every rank's `obj` (any picklable object), in rank order, on every rank."""
        box: list[object] = [None] * self.world_size
        dist.all_gather_object(box, obj)
        return box

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (any picklable object)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def init_distributed(device: str, topology: Topology | None = None) -> DistContext:
    """Join the job's process group; call it before anything imports DeepSpeed's accelerator.

    cpu: sets DS_ACCELERATOR=cpu (DeepSpeed reads it once, at import) and uses gloo; unless
    OMP_NUM_THREADS says otherwise, the cores are shared evenly between this node's ranks.
    cuda: binds the process to its GPU (`cuda_device_index`: its local rank, or the one GPU a
    site's binding shows it), checks that no two ranks share a GPU, and uses nccl.
    """
    topology = topology or discover_topology()
    device = resolve_device(device)
    topology.export(os.environ)
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // topology.local_world_size))
    else:
        torch.cuda.set_device(cuda_device_index(topology, torch.cuda.device_count()))
    _check_accelerator(device)

    import deepspeed

    deepspeed.init_distributed(
        dist_backend="gloo" if device == "cpu" else "nccl",
        auto_mpi_discovery=False,
        timeout=collective_timeout(),
        verbose=False,
    )
    if device == "cpu":
        _unlink_shared_memory_name(topology)
    torch_device = (
        torch.device("cpu")
        if device == "cpu"
        else torch.device("cuda", torch.cuda.current_device())
    )
    ctx = DistContext(topology, torch_device)
    if device == "cuda":
        _check_one_gpu_per_rank(ctx)
    return ctx


def cuda_device_index(topology: Topology, visible: int) -> int:
    """The GPU a rank uses among the `visible` ones.

    Launchers that show every rank all of the node's GPUs (torchrun, the DeepSpeed launcher,
    srun without binding): the rank's local rank. Sites that bind one GPU per task
    (`--gpus-per-task=1`, `--gpu-bind=closest`) show each task only its own, as device 0.
    Fewer visible GPUs than local ranks otherwise is an error that says so.
    """
    if visible >= topology.local_world_size:
        return topology.local_rank
    if visible == 1:
        return 0
    raise UsageError(
        f"{topology.local_world_size} ranks on this node but rank {topology.rank} sees {visible} "
        f"GPUs (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start "
        "one rank per GPU (srun --ntasks-per-node = GPUs per node, or --gpus-per-task=1)"
    )


def _check_one_gpu_per_rank(ctx: DistContext) -> None:
    """Ranks that ended up on the same GPU (more ranks than GPUs on a node) are an error."""
    me = (socket.gethostname(), str(torch.cuda.get_device_properties(ctx.device).uuid))
    shared = shared_devices(ctx.all_gather(me))
    if shared:
        (host, uuid), ranks = next(iter(shared.items()))
        raise UsageError(
            f"ranks {ranks} share GPU {uuid} on {host}: start one rank per GPU (more ranks were "
            "started on that node than it has GPUs)"
        )


def shared_devices(devices: list[tuple[str, str]]) -> dict[tuple[str, str], list[int]]:
    """{(host, device id): ranks} for the devices of `devices` (one per rank) used twice or more."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for rank, device in enumerate(devices):
        ranks.setdefault(tuple(device), []).append(rank)
    return {device: used_by for device, used_by in ranks.items() if len(used_by) > 1}


def _unlink_shared_memory_name(topology: Topology) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm.

    On the CPU, when its launcher says every rank is on one machine (LOCAL_SIZE = world size, as
    the `deepspeed` launcher does), DeepSpeed gives each rank a shared-memory buffer of about
    70 MB, /dev/shm/deepspeed_allreduce_buffer_<uid>_<address>_<port>_<rank>, maps every rank's,
    and never unlinks them: each run used to leave them behind until /dev/shm filled the RAM.
    After the barrier every rank has mapped every buffer, so the names are no longer needed;
    unlinking keeps the mappings, and the kernel frees the memory when the job ends, however it
    ends.
    """
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{topology.master_addr}_"
        f"{topology.master_port}_{topology.rank}"
    )
    if topology.world_size > 1:
        dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def collective_timeout(environ: Mapping[str, str] | None = None) -> timedelta:
    """How long a collective may wait for the other ranks (see the module docstring)."""
    env = os.environ if environ is None else environ
    try:
        if env.get(TIMEOUT_SECONDS_VARIABLE):
            seconds = float(env[TIMEOUT_SECONDS_VARIABLE])
        else:
            seconds = 60 * int(env.get("DEEPSPEED_TIMEOUT") or DEFAULT_TIMEOUT_MINUTES)
    except ValueError:
        raise UsageError(
            f"{TIMEOUT_SECONDS_VARIABLE} must be a number of seconds and DEEPSPEED_TIMEOUT a whole "
            f"number of minutes; got {env.get(TIMEOUT_SECONDS_VARIABLE)!r} and "
            f"{env.get('DEEPSPEED_TIMEOUT')!r}"
        ) from None
    if seconds <= 0:
        raise UsageError(f"the collective timeout must be positive, got {seconds} s")
    return timedelta(seconds=seconds)


# gloo raises plain RuntimeErrors with these words when a peer is gone or a collective times out
# (NCCL's errors are torch.distributed.DistError).
_PEER_LOST = re.compile(
    r"gloo/transport|Connection (reset|closed) by peer|Timed out waiting|Broken pipe"
)


def collective_failure(error: BaseException) -> bool:
    """Whether `error` says that a collective failed: another rank died, hangs or is unreachable."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and bool(_PEER_LOST.search(str(error)))


def _check_accelerator(device: str) -> None:
    """Fail clearly if DeepSpeed was imported earlier with an accelerator other than `device`."""
    if "deepspeed" not in sys.modules:
        return
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != device:
        raise UsageError(
            f"DeepSpeed was imported with the {name!r} accelerator before device={device!r} was "
            f"chosen; set DS_ACCELERATOR={device} in the environment or import DeepSpeed only "
            "after init_distributed"
        )
