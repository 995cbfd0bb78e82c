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


def to_jax(src, dst, *, layers=None, progress: bool = True, echo=print) -> Summary:
    reader = open_checkpoint(src, layers=layers)
    dst = Path(dst)
    out = dst / CKPT_DIR
    out.mkdir(parents=True, exist_ok=True)
    if layers is not None and sorted(layers) != list(range(reader.config.num_layers)):
        raise ValueError("the original format names files by position, so it holds every layer: "
                         "a slice cannot be written as a checkpoint of the same config")
    summary, errors = Summary(), {}
    t0 = time.perf_counter()
    from tqdm import tqdm
    specs = reader.specs()
    for spec in tqdm(specs, desc="to-jax", unit="file", disable=not progress):
        path = out / spec.file
        if path.exists():        # written atomically: an existing file is complete (resume)
            summary.shards_skipped += 1
            continue
        if spec.kind == "qw8":
            acc = ErrorAccumulator(fast=True)
            value = _quantized_value(spec, reader, acc)
            summary.bytes_written += write_param_file(path, spec, value)
            if acc.numel:
                errors[spec.name] = acc.result()
        else:
            v = reader.load(spec.name)
            f32 = np.asarray(v, dtype=np.float32) if np.asarray(v).dtype != BF16 else \
                from_torch(to_torch(np.asarray(v)).float())
            if np.asarray(v).dtype != np.float32:
                errors[spec.name] = {"note": f"source stored {np.asarray(v).dtype}; widened to float32 exactly, "
                                             "the original float32 digits beyond it are not recoverable"}
            summary.bytes_written += write_param_file(path, spec, np.ascontiguousarray(f32))
        summary.tensors += 1
    reader.config.save(dst / CONFIG_FILE)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss = peak_rss_bytes()
    summary.errors = errors
    if errors:
        atomic_write_text(dst / REPORT_FILE, json.dumps({"to": "jax", "tensors": errors}, indent=1,
                                                        sort_keys=True) + "\n")
    return summary
