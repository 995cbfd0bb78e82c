"""Any readable checkpoint back to the original release format (``grokconv to-jax``).

Parameters that arrive as the original int8 and scales (the original itself, or a lossless int8
export) are written byte for byte. Float parameters are re-quantized to int8 with the source's scale
structure (per column, and per block of input rows for the row-parallel weights), expert by expert,
and the error against the float source is reported.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .config import CONFIG_FILE
from .convert import REPORT_FILE, Summary
from .runtime import peak_rss_bytes
from .quant.metrics import ErrorAccumulator
from .formats.atomic import atomic_write_text
from .formats.base import open_checkpoint
from .formats.jax import CKPT_DIR, write_param_file
from .formats.outputs import guard_output, make_fingerprint
from .schema import ParamSpec
from .tensor import BF16, QInt8, as_dense, dequantize, from_torch, to_torch

__all__ = ["to_jax"]


def _quantized_value(spec: ParamSpec, reader, acc: ErrorAccumulator | None):
    """(weight chunks, scales thunk) for a qw8 parameter, one expert at a time."""
    from .quant.int8 import quantize_rowblocks
    lead = spec.lead
    scales: list = [None] * lead

    def chunks():
        for e in range(lead):
            idx = e if len(spec.shape) > 2 else None
            v = reader.load(spec.name, idx)
            if isinstance(v, QInt8) and v.groups == spec.scale_groups:
                scales[e] = np.array(v.scales)
                yield np.ascontiguousarray(v.weight)
                _release(reader, spec.name, idx)
                continue
            w = as_dense(v, "f32")
            q, s = quantize_rowblocks(w, spec.scale_groups)
            if acc is not None:   # against what the reference computes with: bf16(int8 * scale)
                acc.update(w, dequantize(QInt8(from_torch(q), from_torch(s)), "bf16").float())
            scales[e] = from_torch(s)
            yield from_torch(q)
            _release(reader, spec.name, idx)

    def scale_array():
        return np.stack(scales) if len(spec.shape) > 2 else scales[0]
    return chunks(), scale_array


def _release(reader, name, index):
    release = getattr(reader, "release", None)
    if release:
        release(name, index)


OWNED = (f"{CKPT_DIR}/tensor*_000", CONFIG_FILE, REPORT_FILE)    # what --overwrite replaces


def to_jax(src, dst, *, layers=None, progress: bool = True, overwrite: bool = False, echo=print) -> Summary:
    """Write ``src`` in the release's format under ``dst``. Resume keeps only files this source made
    (fingerprint in ``dst/.grokconv/output.json``); another run's output is an error unless ``overwrite``."""
    reader = open_checkpoint(src, layers=layers)
    if layers is not None and sorted(layers) != list(range(reader.config.num_layers)):
        raise ValueError("the original format names files by position, so it holds every layer: "
                         "a slice cannot be written as a checkpoint of the same config")
    dst = Path(dst)
    guard = guard_output(dst, make_fingerprint("to-jax", reader.path), owned=OWNED, overwrite=overwrite)
    try:
        summary = _write_files(reader, dst, guard, progress)
        guard.finish()
    finally:
        guard.close()
    return summary


def _write_files(reader, dst: Path, guard, progress: bool) -> Summary:
    out = dst / CKPT_DIR
    out.mkdir(parents=True, exist_ok=True)
    summary, errors = Summary(), {}
    t0 = time.perf_counter()
    from tqdm import tqdm
    specs = reader.specs()
    for spec in tqdm(specs, desc="to-jax", unit="file", disable=not progress):
        path = out / spec.file
        if guard.is_complete(path):          # made durable by a run of this same source (resume)
            summary.shards_skipped += 1
            continue

        def durable(n, path=path):
            guard.done(path, n)
        if spec.kind == "qw8":
            acc = ErrorAccumulator(fast=True)
            value = _quantized_value(spec, reader, acc)
            summary.bytes_written += write_param_file(path, spec, value, durable)
            if acc.numel:
                errors[spec.name] = acc.result()
        else:
            v = reader.load(spec.name)
            f32 = np.asarray(v, dtype=np.float32) if np.asarray(v).dtype != BF16 else \
                from_torch(to_torch(np.asarray(v)).float())
            if np.asarray(v).dtype != np.float32:
                errors[spec.name] = {"note": f"source stored {np.asarray(v).dtype}; widened to float32 exactly, "
                                             "the original float32 digits beyond it are not recoverable"}
            summary.bytes_written += write_param_file(path, spec, np.ascontiguousarray(f32), durable)
        summary.tensors += 1
    if errors:
        atomic_write_text(dst / REPORT_FILE, json.dumps({"to": "jax", "tensors": errors}, indent=1,
                                                        sort_keys=True) + "\n")
    reader.config.save(dst / CONFIG_FILE)            # last: the marker of a whole checkpoint
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss = peak_rss_bytes()
    summary.errors = errors
    return summary
