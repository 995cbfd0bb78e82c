"""The transform alone: seconds per GiB of int8 input, one thread, warm cache, no disk.

The figure is CPU time of the calling thread (torch runs with one intra-op thread, in it), so that
other jobs on a shared machine inflate it far less than wall time; wall time is printed beside it.

Runs every encoding's chunk loop (the code ``to-safetensors`` and ``to-gguf`` run per chunk, without the
``pwrite``) over one expert slice of each Grok-1 shape held in memory: ``[6144, 32768]`` with one scale row
(the gate/up projections) and ``[32768, 6144]`` with 8 row blocks (the down projection). This is how the
method was chosen (see README, performance); run it with another checkout on ``PYTHONPATH`` to compare.

    python bench/transform.py [--cases none,int8,fp8:channel,...] [--threads 1] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import time

import ml_dtypes
import numpy as np
import torch

from grokconv.export import SourceRows, encode_chunk, encoding_for, tensor_amax
from grokconv.mapping import Target
from grokconv.quant.metrics import ErrorAccumulator
from grokconv.tensor import QInt8

SHAPES = {"gate/up [6144, 32768], G=1": (6144, 32768, 1), "down [32768, 6144], G=8": (32768, 6144, 8)}
CASES = "none,int8,fp8:channel,fp8:tensor,fp8:block,gguf:q8_0"


def source(K: int, N: int, G: int, seed: int = 0) -> QInt8:
    rng = np.random.default_rng(seed)
    w = rng.integers(-128, 128, size=(K, N), dtype=np.int8)
    s = (rng.random((G, N), dtype=np.float32) * 0.02 + 1e-3).astype(ml_dtypes.bfloat16)
    return QInt8(w, s)


def run_case(case: str, value: QInt8, clock=time.thread_time) -> float:
    """``clock`` seconds for the whole slice: every chunk of its target, measured as the converters sample it."""
    quant, _, scheme = case.partition(":")
    K, N = value.weight.shape
    t = Target("bench.weight", "bench", None, "linear", True, (N, K))
    cpu = torch.device("cpu")
    t0 = clock()
    if quant == "gguf":
        from grokconv.gguf_export import GGUFTensor, _chunk_rows, _encode
        from grokconv.quant.q8_0 import Q8Stats
        g = GGUFTensor(t, scheme.upper(), (N, K), 0)
        step = _chunk_rows(g)
        for r0 in range(0, N, step):
            _encode(g, SourceRows(value, True, r0, min(N, r0 + step), cpu), True, Q8Stats(), None, False)
        return clock() - t0
    enc = encoding_for(quant, "linear", fp8_scheme=(scheme or "channel").removesuffix("-inv"), group_size=128,
                       fp8_format="fp8" if scheme.endswith("-inv") else "compressed-tensors")
    ctx = {}
    if enc.kind == "fp8" and enc.scheme == "tensor":
        from grokconv.quant.fp8 import fp8_scales_from_amax
        ctx["tensor_scale"] = fp8_scales_from_amax(torch.tensor([tensor_amax(value)]), torch.bfloat16)
    acc = ErrorAccumulator(fast=True)
    step = enc.rows_per_chunk(t)
    for k, r0 in enumerate(range(0, N, step)):
        ctx.update(measure=quant != "none" and k % 4 == 0, acc=acc)
        outs, pair = encode_chunk(enc, SourceRows(value, True, r0, min(N, r0 + step), cpu), t, ctx)
        if isinstance(pair, tuple):        # the pre-tile interface returned the pair to measure
            acc.update(*pair)
    return clock() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}; seconds per GiB of int8 input (best of {args.repeat}): thread CPU time "
          f"(wall time); load average {os.getloadavg()[0]:.1f}")
    for label, (K, N, G) in SHAPES.items():
        value = source(K, N, G)
        gib = value.weight.nbytes / 2 ** 30
        for case in args.cases.split(","):
            runs = []
            for _ in range(args.repeat):
                w0, c0 = time.perf_counter(), time.thread_time()
                run_case(case, value)
                runs.append((time.thread_time() - c0, time.perf_counter() - w0))
            cpu, wall = min(runs)
            print(f"  {label:28s} {case:12s} {cpu / gib:6.2f} s/GiB  ({wall / gib:6.2f})", flush=True)


if __name__ == "__main__":
    main()
