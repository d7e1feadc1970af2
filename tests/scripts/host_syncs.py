"""Count the calls that would make the host wait for a GPU, inside each micro-batch of training.

On a GPU, `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `.nonzero()` and `bool()/int()/float()`
of a device tensor wait until the device has finished the work queued before them. This script
patches those methods of torch.Tensor, trains a recipe for a few steps in this one process
(`python -m tail_kd.train` arguments after the first), and counts the calls made while
`Distiller.forward` and `Distiller.backward` run (the optimizer's step, where DeepSpeed checks
for overflow, is outside). Each call is counted at the innermost frame of tail-kd's code that led
to it, or, when it happened in a library, at that library's function, with the device of the
tensor. Writes {"tail_kd": {"site device": count}, "libraries": {...}} as JSON to argv[1].

On a GPU only the calls on cuda tensors wait. On the CPU every tensor is a host tensor, so this
counts where such calls happen: tests/test_host_syncs.py checks that tail-kd's own sites are the
known host-side ones, and tests/test_gpu.py that none of them touches a cuda tensor.
"""

import collections
import json
import sys
import traceback

import torch

SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")
counts = {"tail_kd": collections.Counter(), "libraries": collections.Counter()}
inside = [0]


def site() -> tuple[str, str]:
    """(kind, "path:function") of the call being made."""
    frames = traceback.extract_stack()[:-2]  # without site() and the patch
    for frame in reversed(frames):
        if "/tail_kd/" in frame.filename:
            path = frame.filename.split("/tail_kd/", 1)[1]
            first_ours = frame is frames[-1]
            return ("tail_kd" if first_ours else "libraries"), (
                f"tail_kd/{path}:{frame.name}"
                if first_ours
                else f"{_library(frames[-1].filename)}:{frames[-1].name}"
            )
    return "libraries", f"{_library(frames[-1].filename)}:{frames[-1].name}"


def _library(filename: str) -> str:
    return filename.split("site-packages/", 1)[-1]


def patch(name: str) -> None:
    original = getattr(torch.Tensor, name)

    def counted(self, *args, **kwargs):
        if inside[0]:
            kind, where = site()
            counts[kind][f"{where} {self.device.type}"] += 1
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, counted)


def watched(method):
    def run(*args, **kwargs):
        inside[0] += 1
        try:
            return method(*args, **kwargs)
        finally:
            inside[0] -= 1

    return run


for name in SYNCING:
    patch(name)
from tail_kd import distiller, train  # noqa: E402

distiller.Distiller.forward = watched(distiller.Distiller.forward)
distiller.Distiller.backward = watched(distiller.Distiller.backward)
status = train.main(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    json.dump({kind: dict(found) for kind, found in counts.items()}, out, indent=1)
sys.exit(status)
