"""Where work runs and what it costs: the device to use, and peak memory (process RSS, CUDA allocation)."""
from __future__ import annotations

import os
import queue
import resource
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import GrokconvError

__all__ = ["resolve_device", "peak_memory", "peak_rss_bytes", "available_cores", "resolve_workers", "run_jobs"]


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


def run_jobs(jobs: list, work, workers: int, prefetch=None) -> list:
    """``[work(job) for job in jobs]`` on ``workers`` threads, jobs started in order; the results in order.

    ``prefetch(job)``, when given, runs on one background thread for each job from the first up to
    ``workers`` jobs past the last one started: the source pages of the next jobs are read from disk
    while the workers compute (a worker that faults its pages in one at a time leaves the disk idle
    between faults and the core idle during them). Its errors are ignored: it only hints.
    """
    ahead = max(1, workers)
    hints: queue.SimpleQueue = queue.SimpleQueue()
    lock = threading.Lock()
    hinted = [0]

    def hint_loop():
        while (job := hints.get()) is not None:
            try:
                prefetch(job)
            except Exception:   # noqa: BLE001 -- a hint that failed costs speed, never correctness
                pass

    def started(i: int):
        if prefetch is None:
            return
        with lock:
            while hinted[0] < min(len(jobs), i + ahead + 1):
                hints.put(jobs[hinted[0]])
                hinted[0] += 1

    def run(i: int):
        started(i)
        return work(jobs[i])

    hinter = threading.Thread(target=hint_loop, name="grokconv-prefetch", daemon=True) if prefetch else None
    if hinter:
        hinter.start()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(run, i) for i in range(len(jobs))]
        return [f.result() for f in futures]
    finally:   # on an error the jobs not yet started are dropped; the running ones finish
        pool.shutdown(wait=True, cancel_futures=True)
        if hinter:
            hints.put(None)
