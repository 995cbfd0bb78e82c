"""One call carries a conversion: reader -> mapping -> encoding -> streaming safetensors writer.

1. Plan from metadata only: every output tensor, its dtype, shape, shard and byte offset. Coverage
   is checked (every canonical parameter maps once) before a byte is written.
2. Execute shard by shard. A shard is written under ``*.incomplete``: header first, then each
   tensor's rows straight to their offsets (``pwrite``), by a pool of workers; renamed when whole.
   A shard already on disk is kept only when this run's fingerprint (source files + byte-changing
   options, in every shard's ``__metadata__``) made it durable and its header equals the plan (resume);
   another run's output in DST is an error unless ``overwrite`` (formats/outputs.py).
3. Write ``config.json``, the tokenizer, the error report, and last the index.
"""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import CONFIG_FILE
from .errors import LayoutError, MissingTensorError
from .export import ENCODINGS, Encoding, SourceRows, encode_chunk, encoding_for, stage, tensor_amax
from .formats.atomic import atomic_write, atomic_write_text, is_complete, write_planned
from .formats.outputs import guard_output, make_fingerprint
from .formats.base import CheckpointReader, open_checkpoint
from .formats.safetensors_io import DTYPES, ShardPlan
from .mapping import Layout, Target, load_layout
from .quant.metrics import ErrorAccumulator
from .tensor import QInt8, from_torch
from .tokenizer import TOKENIZER_FILE, find_tokenizer
from .runtime import peak_rss_bytes, resolve_device, resolve_workers, run_jobs, torch_threads_per_worker
from .schema import LAYER_PREFIX
from .units import parse_size

__all__ = ["ConversionPlan", "plan_conversion", "to_safetensors", "Summary", "parse_size", "INDEX_FILE",
           "REPORT_FILE", "TOKENIZER_FILE", "HF_CODE_FILES", "tokenizer_for", "OWNED"]

INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "grokconv-report.json"
HF_CODE_DIR = Path(__file__).resolve().parent / "hf_code"
HF_CODE_FILES = ("configuration_grok1.py", "modeling_grok1.py")
# the files to-safetensors makes in DST (what --overwrite replaces)
OWNED = ("model-*-of-*.safetensors", INDEX_FILE, "config.json", CONFIG_FILE, REPORT_FILE, TOKENIZER_FILE, *HF_CODE_FILES)


def tokenizer_for(src, layout: Layout, given=None, required: bool = True) -> Path | None:
    """The tokenizer.model to copy (:func:`grokconv.tokenizer.find_tokenizer`). With ``required``,
    raises :class:`MissingTensorError` when the layout's consumer needs one (``requires`` in the
    mapping file) and there is none."""
    found = find_tokenizer(src, given)
    why = layout.requires.get(TOKENIZER_FILE)
    if found is None and why and required:
        raise MissingTensorError(
            f"the {layout.name!r} layout needs a {TOKENIZER_FILE} and the source has none: {why}", path=src,
            hint="pass --tokenizer PATH (the SentencePiece model of github.com/xai-org/grok-1; `grokconv download` "
                 "fetches it), or choose another --layout")
    return found


@dataclass
class Job:
    target: Target
    encoding: Encoding
    outputs: list          # [(name, dtype, shape)]
    shard: int = 0


@dataclass
class ConversionPlan:
    layout: Layout
    quantize: str
    jobs: list
    shards: list           # [ShardPlan]
    quantization_config: dict | None
    group_size: int
    tokenizer: Path | None = None    # the tokenizer.model copied into the export
    layers: list = field(default_factory=list)   # the layers exported

    @property
    def total_size(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    def weight_map(self) -> dict:
        return {n: self.shards[j.shard].filename for j in self.jobs for n, _, _ in j.outputs}


def int8_group_size(cfg) -> int:
    """Largest group size vLLM's Marlin kernel takes (128, 64, 32) that divides every row block, so
    each original scale block becomes whole groups and nothing is lost."""
    blocks = [cfg.emb_size, cfg.q_size // cfg.model_axis, cfg.ffn_size // cfg.model_axis]
    for g in (128, 64, 32):
        if all(b % g == 0 for b in blocks):
            return g
    raise LayoutError(f"row blocks {blocks} are not divisible by 32: no lossless compressed-tensors group size")


def plan_conversion(reader: CheckpointReader, layout: str = "hf", quantize: str = "none", *,
                    fp8_scheme: str = "channel", fp8_format: str = "compressed-tensors", int8_scheme: str = "group",
                    layers=None, max_shard_size="5GB") -> ConversionPlan:
    if quantize not in ENCODINGS:
        raise LayoutError(f"unknown --quantize {quantize!r}; choose one of {', '.join(ENCODINGS)}")
    if fp8_scheme not in ("tensor", "channel", "block"):
        raise LayoutError(f"unknown --fp8-scheme {fp8_scheme!r}; choose tensor, channel or block")
    if int8_scheme not in ("group", "channel"):
        raise LayoutError(f"unknown --int8-scheme {int8_scheme!r}; choose group or channel")
    cfg = reader.config
    lay = load_layout(layout)
    layers = reader.layers if layers is None else layers
    missing = sorted(set(layers) - set(reader.layers))
    if missing:
        raise LayoutError(f"layers {missing} are not in the source (it holds {len(reader.layers)} layers)",
                          path=reader.path)
    gs = int8_group_size(cfg) if quantize == "int8" else 128
    encs: dict[str, Encoding] = {}
    jobs = []
    for t in lay.plan(cfg, layers):
        if t.role not in encs:
            encs[t.role] = encoding_for(quantize, t.role, fp8_scheme=fp8_scheme, fp8_format=fp8_format,
                                        group_size=gs, int8_scheme=int8_scheme)
        enc = encs[t.role]
        if enc.kind == "int8-pack" and t.shape[1] % 4:
            raise LayoutError(f"{t.name}: input size {t.shape[1]} is not a multiple of 4 (int32 packing)")
        jobs.append(Job(t, enc, enc.outputs(t)))
    groups = _shard_groups(jobs, parse_size(max_shard_size), lay.non_layer_shard_first is not None)
    shards = []
    for k, group in enumerate(groups):
        for j in group:
            j.shard = k
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shards.append(ShardPlan(name, [o for j in group for o in j.outputs], {"format": "pt"}))
    return ConversionPlan(lay, quantize, jobs, shards, _quant_config(quantize, encs, lay, reader, gs), gs,
                          layers=sorted(layers))


def _shard_groups(jobs: list, limit: int, non_layer_first: bool) -> list[list]:
    """Jobs in plan order cut into shards of at most ``limit`` bytes (a bigger tensor alone). With
    ``non_layer_first`` (the layout's ``non_layer_shard_first``) and more than one shard, the tensors
    without a layer (embedding, final norm) make a shard of their own, the first."""
    def cut(js):
        groups, cur, cur_size = [], [], 0
        for j in js:
            size = sum(math.prod(s) * DTYPES[d].itemsize for _, d, s in j.outputs)
            if cur and cur_size + size > limit:
                groups.append(cur)
                cur, cur_size = [], 0
            cur.append(j)
            cur_size += size
        return groups + [cur] if cur else groups
    groups = cut(jobs)
    if non_layer_first and len(groups) > 1:
        apart = [j for j in jobs if not j.target.source.startswith(LAYER_PREFIX)]
        groups = [apart] + cut([j for j in jobs if j.target.source.startswith(LAYER_PREFIX)])
    return groups


def _quant_config(quantize, encs, lay: Layout, reader, gs) -> dict | None:
    if quantize == "none":
        return None
    ignore = ["lm_head"] + sorted({"re:" + e.target.replace(".", r"\.").replace("{L}", r"\d+")
                                   .removesuffix(r"\.weight") + "$" for e in lay.entries if e.role == "router"})
    enc = encs.get("linear")
    if enc is None:
        return None
    if enc.kind == "int8-pack":
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": enc.scheme,
                   "group_size": gs if enc.scheme == "group" else None, "dynamic": False}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": ignore, "kv_cache_scheme": None}
    if enc.scale_name == "weight_scale_inv":   # DeepSeek / transformers FineGrainedFP8
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(enc.block), "modules_to_not_convert": ignore,
                "ignored_layers": ignore}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": enc.scheme, "dynamic": False}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    if enc.scheme == "block":
        weights["block_structure"] = list(enc.block)
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group", "group_size": enc.block[1],
                "dynamic": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None, "format": "float-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None}


_PHASE_LOCK = threading.Lock()


@dataclass
class Summary:
    tensors: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    errors: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)   # worker-seconds: read+transform, write, error report

    def add_phase(self, name: str, seconds: float) -> None:
        """Add worker-seconds to a phase (from any worker thread; one lock for every summary: not a field,
        so that ``dataclasses.asdict`` still copies a summary for ``--json``)."""
        with _PHASE_LOCK:
            self.phases[name] = self.phases.get(name, 0.0) + seconds

    @property
    def rate(self) -> float:
        return (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9)


def _run_job(reader, job: Job, out, offsets: dict, device, measure: bool, on_bytes, errors: dict,
             phase=lambda name, sec: None):
    t, enc = job.target, job.encoding
    host_value = reader.load(t.source, t.index)
    # a transposed slice (<= 0.2 GB for Grok-1) goes to the device whole; untransposed ones (the 3 GB
    # embedding) are read and moved a row chunk at a time
    value = stage(host_value, device) if t.transpose else host_value
    ctx = {}
    if enc.kind == "fp8" and enc.scheme == "tensor":
        from .quant.fp8 import fp8_scales_from_amax
        amax = torch.tensor([tensor_amax(host_value)], dtype=torch.float32)
        scale = fp8_scales_from_amax(amax, {"BF16": torch.bfloat16, "F32": torch.float32}[enc.scale_dtype])
        ctx["tensor_scale"] = scale.to(device)
    acc = ErrorAccumulator(fast=True) if (measure or enc.kind != "float") else None
    rows = t.shape[0]
    step = enc.rows_per_chunk(t) if len(t.shape) > 1 else rows
    dtypes = {n: d for n, d, _ in job.outputs}
    shapes = {n: s for n, _, s in job.outputs}
    smin, smax = math.inf, -math.inf
    release = getattr(reader, "release", None)
    measured_rows = 0
    for k, r0 in enumerate(range(0, rows, step)):
        src = SourceRows(value, t.transpose, r0, min(rows, r0 + step), device)
        # the error report reads every MEASURE_EVERY-th chunk (always the first): a systematic sample
        # that costs a quarter of a full pass (dequantize + statistics were 40% of the fp8 work)
        ctx["measure"] = acc is not None and (measure or k % MEASURE_EVERY == 0)
        c0 = time.perf_counter()
        ctx["acc"] = acc
        outs, measured = encode_chunk(enc, src, t, ctx)
        c1 = time.perf_counter()
        phase("read (page faults) + transform", c1 - c0)
        for name, first, tens in outs:
            arr = from_torch(tens)
            if arr.dtype != DTYPES[dtypes[name]]:
                arr = arr.view(DTYPES[dtypes[name]]) if arr.itemsize == DTYPES[dtypes[name]].itemsize else \
                    arr.astype(DTYPES[dtypes[name]])
            row_bytes = math.prod(shapes[name][1:]) * DTYPES[dtypes[name]].itemsize if len(shapes[name]) > 1 \
                else DTYPES[dtypes[name]].itemsize
            data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            out.pwrite(data, offsets[name] + first * row_bytes)
            on_bytes(data.nbytes)
            if name.endswith(("weight_scale", "weight_scale_inv")):
                smin, smax = min(smin, float(tens.float().min())), max(smax, float(tens.float().max()))
        c2 = time.perf_counter()
        phase("write", c2 - c1)
        if measured:
            measured_rows += src.r1 - src.r0
            phase("error report", time.perf_counter() - c2)
        if release and not t.transpose:      # row chunks of the source: drop them as we go
            release(t.source, t.index, (r0, min(rows, r0 + step)))
    if acc is not None and measured_rows:
        res = acc.result()
        res["rows_measured"] = round(measured_rows / rows, 4)
        if smin <= smax:
            res["scale_min"], res["scale_max"] = smin, smax
        errors[t.name] = res
    if release:
        release(t.source, t.index)
    return _source_bytes(host_value)


MEASURE_EVERY = 4


def _source_bytes(value) -> int:
    if isinstance(value, QInt8):
        return value.weight.nbytes + value.scales.nbytes
    return np.asarray(value).nbytes


def to_safetensors(src, dst, *, layout: str = "hf", quantize: str = "none", fp8_scheme: str = "channel",
                   fp8_format: str = "compressed-tensors", int8_scheme: str = "group", layers=None, max_shard_size="5GB", workers: int | None = None,
                   device: str = "cpu", dry_run: bool = False, progress: bool = True, measure: bool = False,
                   tokenizer=None, require_files: bool = False, overwrite: bool = False,
                   echo=print) -> Summary | ConversionPlan:
    """Convert any readable checkpoint to sharded safetensors in ``layout``; returns a :class:`Summary`.

    ``tokenizer``: a ``tokenizer.model`` to copy into the export (else the source's, when it has one).
    ``require_files`` (the CLI sets it): refuse, before writing anything, a layout whose consumer needs
    a file the export would lack (``keyfan``: llama.cpp's converter needs ``tokenizer.model``).
    ``overwrite``: replace what another source or other options left in ``dst`` (else that is an
    :class:`~grokconv.errors.OutputMismatchError`).
    """
    reader = open_checkpoint(src, layers=layers)
    plan = plan_conversion(reader, layout, quantize, fp8_scheme=fp8_scheme, fp8_format=fp8_format,
                           int8_scheme=int8_scheme, layers=layers, max_shard_size=max_shard_size)
    plan.tokenizer = tokenizer_for(reader.path, plan.layout, tokenizer, required=require_files)
    if dry_run:
        return plan
    dst = Path(dst)
    fp = make_fingerprint(
        "to-safetensors", reader.path, layout=layout, quantize=quantize,
        fp8=[fp8_scheme, fp8_format] if quantize == "fp8" else None,
        int8_scheme=int8_scheme if quantize == "int8" else None, layers=plan.layers,
        max_shard_size=parse_size(max_shard_size), tokenizer=plan.tokenizer)
    # every shard carries the fingerprint in its __metadata__ (and so in the header resume compares)
    plan.shards = [ShardPlan(s.filename, s.tensors, {**s.metadata, **fp.metadata()}) for s in plan.shards]
    guard = guard_output(dst, fp, owned=OWNED, overwrite=overwrite)
    try:
        summary = _write_shards(reader, plan, dst, guard, workers=workers, device=device, progress=progress,
                                measure=measure)
        if summary.errors or quantize != "none":
            atomic_write_text(dst / REPORT_FILE, json.dumps(
                {"quantize": quantize, "fp8_scheme": fp8_scheme if quantize == "fp8" else None,
                 "int8_scheme": int8_scheme if quantize == "int8" else None,
                 "reference": "float32 int8*scale (exact dequantization of the source)", "tensors": summary.errors},
                indent=1, sort_keys=True) + "\n")
        _write_sidecars(reader, plan, dst)
        guard.finish()
    finally:
        guard.close()
    return summary


def _write_shards(reader, plan: ConversionPlan, dst: Path, guard, *, workers, device, progress, measure) -> Summary:
    """Every shard not already complete for this fingerprint, one at a time."""
    dev = resolve_device(device)
    summary = Summary()
    t0 = time.perf_counter()
    total = sum(s.size for s in plan.shards)
    bar = _progress(total, progress)
    lock = threading.Lock()

    def on_bytes(n):
        with lock:
            summary.bytes_written += n
            bar.update(n)

    saved_threads = torch.get_num_threads()   # workers share the cores; restored when done
    workers = resolve_workers(workers)
    torch.set_num_threads(torch_threads_per_worker(workers))
    errors: dict = {}
    try:
        for k, shard in enumerate(plan.shards):
            final = dst / shard.filename
            if guard.is_complete(final, lambda p, shard=shard: is_complete(p, shard.size, shard.header)):
                summary.shards_skipped += 1
                bar.update(shard.size)
                continue
            jobs = [j for j in plan.jobs if j.shard == k]

            def fill(out, jobs=jobs, shard=shard):
                summary.bytes_read += sum(run_jobs(
                    jobs, lambda j: _run_job(reader, j, out, shard.offsets, dev, measure, on_bytes, errors,
                                             summary.add_phase),
                    workers, prefetch=lambda j: reader.prefetch(j.target.source, j.target.index)))
            write_planned(final, shard.size, shard.header, fill, on_bytes,
                          before_rename=lambda final=final, shard=shard: guard.done(final, shard.size))
            summary.tensors += sum(len(j.outputs) for j in jobs)
            summary.shards_written += 1
    finally:
        bar.close()
        torch.set_num_threads(saved_threads)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss = peak_rss_bytes()
    summary.errors = errors
    return summary


def _write_sidecars(reader, plan: ConversionPlan, dst: Path) -> None:
    cfg = reader.config
    hf = plan.layout.hf_config(cfg)
    if plan.layers and plan.layers == list(range(len(plan.layers))) and len(plan.layers) < cfg.num_layers:
        # a slice of the first k layers is a k-layer model to an engine (grokconv-config.json keeps the source's)
        for key, tmpl in plan.layout.config_template.items():
            if tmpl == "{num_layers}":
                hf[key] = len(plan.layers)
    if plan.quantization_config:
        hf["quantization_config"] = plan.quantization_config
    atomic_write_text(dst / "config.json", json.dumps(hf, indent=2) + "\n")
    cfg.save(dst / CONFIG_FILE)
    if "auto_map" in hf:   # the transformers code the config names (trust_remote_code)
        for fn in HF_CODE_FILES:
            atomic_write_text(dst / fn, (HF_CODE_DIR / fn).read_text())
    if plan.tokenizer is not None:
        with open(plan.tokenizer, "rb") as src, atomic_write(dst / TOKENIZER_FILE) as f:
            shutil.copyfileobj(src, f)
    index = {"metadata": {"total_size": plan.total_size, "layout": plan.layout.name},
             "weight_map": dict(sorted(plan.weight_map().items()))}
    atomic_write_text(dst / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
