"""Where work runs and what it costs: the device to use, and peak memory (process RSS, CUDA allocation)."""
from __future__ import annotations

import os
import resource
import sys

import torch

from .errors import GrokconvError

__all__ = ["resolve_device", "peak_memory", "peak_rss_bytes", "available_cores", "resolve_workers"]


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (file-backed mapped pages included)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None) -> int:
    """``--workers``: None (the default) is one worker per available core; otherwise at least 1."""
    if workers is None:
        return available_cores()
    if int(workers) < 1:
        raise GrokconvError(f"--workers must be at least 1, got {workers}")
    return int(workers)


def torch_threads_per_worker(workers: int) -> int:
    """Intra-op threads for each of ``workers`` concurrent workers: the available cores shared out."""
    return max(1, available_cores() // max(1, workers))


def resolve_device(device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a request for cuda without one is an error."""
    if isinstance(device, torch.device):
        return device
    name = str(device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GrokconvError(f"device {name!r} requested but torch sees no CUDA device",
                            hint="use --device cpu (or auto)")
    return dev


def peak_memory(device: torch.device) -> dict:
    """Peak memory so far: the process's peak RSS, and torch's peak allocation on a CUDA device."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


