"""Where the ranks of a Slurm job meet: torch.distributed's MASTER_ADDR and MASTER_PORT, which
every task works out alone, without talking to the others.

    address   the first node of the job (or of the job step): its name when it resolves, else
              the NodeAddr Slurm has for it (clusters whose node names are not in DNS, or several
              slurmd emulating nodes on one host)
    port      PORT_BASE + job id mod PORT_RANGE, the same for every task of the job

MASTER_ADDR / MASTER_PORT in the environment win. `tail_kd.distributed` uses this for ranks
started by srun; the batch scripts (slurm/common.sh) for the DeepSpeed launcher, through

    python -m tail_kd.rendezvous      # prints MASTER_ADDR=... and MASTER_PORT=... for `eval`

Only the standard library: the batch script calls it before any rank starts.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping

__all__ = ["PORT_BASE", "PORT_RANGE", "slurm_rendezvous", "first_node_address", "main"]

PORT_BASE, PORT_RANGE = 20000, 20000


def slurm_rendezvous(env: Mapping[str, str], nodelist: str | None) -> tuple[str, int]:
    """(address, port) of a Slurm job's rendezvous; `nodelist` the job's or step's node list
    (127.0.0.1 without one, outside Slurm)."""
    address = env.get("MASTER_ADDR") or (first_node_address(nodelist) if nodelist else "127.0.0.1")
    port = int(env.get("MASTER_PORT") or PORT_BASE + int(env.get("SLURM_JOB_ID", 0)) % PORT_RANGE)
    return address, port


def first_node_address(nodelist: str) -> str:
    """Address of the first node of a Slurm node list such as "gpu[07-09],gpu12"."""
    first = _scontrol(["show", "hostnames", nodelist]).split()[0]
    try:
        socket.gethostbyname(first)
        return first
    except OSError:
        pass
    match = re.search(r"\bNodeAddr=(\S+)", _scontrol(["show", "node", first]))
    if match is None:
        raise RuntimeError(
            f"cannot resolve Slurm node {first!r} and `scontrol show node {first}` has no NodeAddr"
        )
    return match.group(1)


def _scontrol(args: list[str]) -> str:
    try:
        return subprocess.run(
            ["scontrol", *args], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(
            f"`scontrol {' '.join(args)}` failed ({error}); "
            "set MASTER_ADDR to the first node's address"
        ) from error


def main() -> int:
    """Print the job's rendezvous as shell assignments (the batch script's job node list)."""
    try:
        address, port = slurm_rendezvous(os.environ, os.environ.get("SLURM_JOB_NODELIST"))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"MASTER_ADDR={shlex.quote(address)}\nMASTER_PORT={port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
