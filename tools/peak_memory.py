"""Peak memory of this process, for the benchmarks in tools/ (import it from a tool's directory).

On a GPU, the CUDA caching allocator's peak; on the CPU, the resident set's high-water mark
(`VmHWM`), which /proc/self/clear_refs resets. Run CPU measurements with
MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the resident set at once.
"""

import torch


def reset_peak(device):
    """Start measuring here; return the baseline that the peak is measured above (bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak(device):
    """The peak since `reset_peak` (bytes, baseline included)."""
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_bytes("VmHWM")


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
