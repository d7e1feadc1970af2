"""Where the ranks of a Slurm job meet: torch.distributed's MASTER_ADDR and MASTER_PORT, which
every task works out alone, without talking to the others.

    address   the first node of the job (or of the job step): its name when it resolves, else
              the NodeAddr Slurm has for it (clusters whose node names are not in DNS, or several
              slurmd emulating nodes on one host)
    port      PORT_BASE + job id mod PORT_RANGE, the same for every task of the job: 20000 to
              29999, below Linux's default range of ephemeral ports (32768 to 60999), from which
              the kernel hands out ports to outgoing connections that could hold ours

TAIL_KD_MASTER_ADDR / TAIL_KD_MASTER_PORT override them. MASTER_ADDR / MASTER_PORT do not: sbatch
passes the submitting shell's environment to the job, and a MASTER_ADDR=127.0.0.1 left there by
an earlier torchrun would make a multi-node job hang; one that differs is reported and ignored.
`tail_kd.distributed` uses this for ranks started by srun; the batch scripts (slurm/common.sh)
for the DeepSpeed launcher, through

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

from tail_kd.exit_status import EXIT_USAGE, UsageError

__all__ = ["PORT_BASE", "PORT_RANGE", "slurm_rendezvous", "first_node_address", "main"]

PORT_BASE, PORT_RANGE = 20000, 10000


def slurm_rendezvous(env: Mapping[str, str], nodelist: str | None) -> tuple[str, int]:
    """(address, port) of a Slurm job's rendezvous; `nodelist` the job's or step's node list
    (127.0.0.1 without one, outside Slurm)."""
    address = env.get("TAIL_KD_MASTER_ADDR") or (
        first_node_address(nodelist) if nodelist else "127.0.0.1"
    )
    port = int(
        env.get("TAIL_KD_MASTER_PORT") or PORT_BASE + int(env.get("SLURM_JOB_ID", 0)) % PORT_RANGE
    )
    inherited = (env.get("MASTER_ADDR"), env.get("MASTER_PORT"))
    if inherited != (None, None) and inherited != (address, str(port)):
        print(
            f"tail-kd: ignoring MASTER_ADDR={inherited[0]} MASTER_PORT={inherited[1]} from the "
            f"environment; this job meets at {address}:{port} (set TAIL_KD_MASTER_ADDR / "
            "TAIL_KD_MASTER_PORT to choose)",
            file=sys.stderr,
        )
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
        raise UsageError(
            f"cannot resolve Slurm node {first!r} and `scontrol show node {first}` has no NodeAddr"
        )
    return match.group(1)


def _scontrol(args: list[str]) -> str:
    try:
        return subprocess.run(
            ["scontrol", *args], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise UsageError(
            f"`scontrol {' '.join(args)}` failed ({error}); "
            "set MASTER_ADDR to the first node's address"
        ) from error


def main() -> int:
    """Print the job's rendezvous as shell assignments (the batch script's job node list)."""
    try:
        address, port = slurm_rendezvous(os.environ, os.environ.get("SLURM_JOB_NODELIST"))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"MASTER_ADDR={shlex.quote(address)}\nMASTER_PORT={port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
