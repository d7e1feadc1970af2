"""No host-device synchronisation of tail-kd's own inside a micro-batch of training.

tests/scripts/host_syncs.py trains the tiny recipe in one process with the calls that make a
host wait for a GPU counted (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `.nonzero()`,
`bool()/int()/float()` of a tensor), during `Distiller.forward` and `Distiller.backward`. On the
CPU every tensor is a host tensor, so the test checks call sites: tail-kd's own must be the
host-side ones below, which on a GPU run read the loader's host tensors before their copy
(tests/test_gpu.py runs the same script on CUDA and checks that none touches a cuda tensor). A
new call site fails this test: move the work to the host, or keep it on the device.

What the libraries do is reported, not asserted (it changes with their versions; measured in
docs/ARCHITECTURE.md, "Host-device synchronisation").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO

# The fused loss's bookkeeping of the valid tokens, on the host labels (tail_kd/losses/fused.py).
HOST_SIDE = {"tail_kd/losses/fused.py:from_labels"}


def count_host_syncs(tmp_path, *sets: str, device: str = "cpu") -> dict:
    out = tmp_path / "syncs.json"
    command = [
        sys.executable, str(REPO / "tests" / "scripts" / "host_syncs.py"), str(out),
        str(REPO / "recipes" / "tiny" / "tad.yaml"), "--output-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    for value in ("train.steps=2", "eval.every=0", f"cache_dir={tmp_path / 'cache'}",
                  f"device={device}", *sets):  # fmt: skip
        command += ["--set", value]
    env = {**os.environ, "DS_ACCELERATOR": device}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_tail_kds_own_calls_in_a_micro_batch_are_the_host_side_ones(tmp_path):
    found = count_host_syncs(tmp_path)
    sites = {key.rsplit(" ", 1)[0] for key in found["tail_kd"]}
    assert sites == HOST_SIDE, found
    print("libraries:", json.dumps(found["libraries"], indent=1))
