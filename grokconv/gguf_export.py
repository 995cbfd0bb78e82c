"""Any readable checkpoint to llama.cpp's GGUF (architecture ``grok``) in one streaming pass.

1. Plan from metadata only: the names, per-role types and metadata of ``mappings/gguf.json``, the
   SentencePiece vocabulary, and every tensor's file and offset. ``gguf`` (llama.cpp's gguf-py) lays
   out the header, the key/values, the tensor infos, the alignment, the split into
   ``-00001-of-0000N.gguf`` parts and their ``split.*`` keys: its ``GGUFWriter`` is given the tensor
   infos only, and the bytes it would write before the data are taken from it.
2. Write each part under ``*.incomplete``: header first, then every tensor a row chunk at a time at
   its planned offset (``pwrite``), by a pool of workers, one expert slice at a time; rename when
   whole. A part already on disk is kept only when this run's fingerprint (``grokconv.*`` key/values:
   source files and options) made it durable and its size and header match the plan (resume).
3. ``q8_0`` from the original int8 keeps it: ``d = fp16(scale)``, ``qs = int8`` (exact whenever the
   scale is an fp16 number; the other blocks are counted and their error reported). Float sources,
   and the float embedding, get ordinary Q8_0.
"""
from __future__ import annotations

import io
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .convert import Summary, _source_bytes
from .errors import GrokconvError, LayoutError, MissingTensorError
from .export import CHUNK_BYTES, SourceRows
from .formats.atomic import atomic_write_text, is_complete, write_planned
from .formats.outputs import guard_output, make_fingerprint
from .formats.base import CheckpointReader, open_checkpoint
from .formats.gguf import require_gguf
from .mapping import MAPPINGS_DIR, Layout, Target, load_layout
from .quant.metrics import ErrorAccumulator
from .quant.q8_0 import BLOCK_BYTES, QK8_0, Q8Stats, q8_0_from_int8, quantize_q8_0
from .quant.tiles import scratch
from .runtime import peak_rss_bytes, resolve_workers, run_jobs, torch_threads_per_worker
from .tensor import QInt8
from .tokenizer import find_tokenizer
from .units import parse_size

__all__ = ["GGUF_TYPES", "GGUFPlan", "GGUFPart", "GGUFTensor", "plan_gguf", "to_gguf", "sentencepiece_vocab",
           "gguf_tokenizer", "REPORT_SUFFIX"]

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
REPORT_SUFFIX = ".grokconv-report.json"
MEASURE_EVERY = 4          # ordinary q8_0: error statistics on every 4th row chunk (always the first)
_NP = {"F32": np.float32, "F16": np.float16}


@dataclass
class GGUFTensor:
    target: Target
    qtype: str                  # F32 / F16 / BF16 / Q8_0
    shape: tuple                # numpy order ([E,] rows, row length), as gguf-py's reader gives it
    nbytes: int
    offset: int = 0             # absolute, in its part
    note: str = ""

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, math.prod(self.shape[:-1]))


@dataclass
class GGUFPart:
    filename: str
    header: bytes
    size: int
    tensors: list = field(default_factory=list)


@dataclass
class GGUFPlan:
    type: str
    parts: list
    tokenizer: str | None
    metadata: dict              # key -> value, as written into the first part

    @property
    def total_size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def tensors(self) -> list:
        return [t for p in self.parts for t in p.tensors]


# -- the vocabulary ----------------------------------------------------------------------------------
def gguf_tokenizer(reader: CheckpointReader, tokenizer=None) -> Path:
    """The vocabulary's ``tokenizer.model`` (:func:`grokconv.tokenizer.find_tokenizer`); GGUF needs one."""
    found = find_tokenizer(reader.path, tokenizer)
    if found is None:
        raise MissingTensorError(
            "GGUF carries the vocabulary, and there is no tokenizer.model beside the checkpoint", path=reader.path,
            hint="pass --tokenizer PATH (Grok-1's SentencePiece tokenizer.model, from github.com/xai-org/grok-1 "
                 "or `grokconv download`)")
    return found


def sentencepiece_vocab(path: Path, vocab_size: int) -> tuple[list, list, list]:
    """(tokens, scores, token types) as llama.cpp's ``_create_vocab_sentencepiece`` builds them."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise GrokconvError("the vocabulary needs the sentencepiece package, which is not installed",
                            hint="pip install 'grokconv[gguf]'") from None
    import gguf
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise GrokconvError(f"not a SentencePiece model: {e}", path=path) from None
    T = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = int(T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else
                       T.UNUSED if sp.IsUnused(i) else T.BYTE if sp.IsByte(i) else T.NORMAL)
    return tokens, scores, types


# -- the plan ----------------------------------------------------------------------------------------
def _mapping(layout: Layout) -> dict:
    return json.loads((MAPPINGS_DIR / f"{layout.name}.json").read_text())


def _fill(v, values: dict):
    if isinstance(v, str) and v.startswith("{") and v.endswith("}") and v[1:-1] in values:
        return values[v[1:-1]]
    return v


def _types_for(target: Target, want: str, data: dict, notes: list) -> str:
    """The GGML type of one target: the role's fixed type, or ``want``; Q8_0 needs whole blocks of 32
    along the row (else F16, as llama.cpp's converter falls back)."""
    qtype = _fill(data["types"][target.role], {"type": want.upper()})
    if qtype == "Q8_0" and target.shape[-1] % QK8_0:
        notes.append(f"{target.name}: rows of {target.shape[-1]} are not whole Q8_0 blocks; written as F16")
        return "F16"
    return qtype


def plan_gguf(reader: CheckpointReader, type: str = "q8_0", *, out="model.gguf", tokenizer=None,
              max_shard_size=None, source_dir=None, metadata=None) -> GGUFPlan:
    """The plan of every part (its header bytes included). ``metadata``: string key/values written after
    the vocabulary (the run's fingerprint)."""
    gguf = require_gguf()
    from gguf.gguf_writer import GGUFWriter, WriterState
    if type not in GGUF_TYPES:
        raise LayoutError(f"unknown --type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    cfg = reader.config
    layers = list(reader.layers)
    if layers != list(range(len(layers))):
        raise LayoutError(f"GGUF numbers its blocks 0..N-1 and llama.cpp loads them so; the source holds layers "
                          f"{layers}", path=reader.path)
    lay = load_layout("gguf")
    data = _mapping(lay)
    tok_path = gguf_tokenizer(reader, tokenizer)
    tokens, scores, toktypes = sentencepiece_vocab(tok_path, cfg.vocab_size)

    notes: list[str] = []
    tensors = []
    for t in lay.plan(cfg, layers):
        qtype = _types_for(t, type, data, notes)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(t.shape, gguf.GGMLQuantizationType[qtype])))
        tensors.append(GGUFTensor(t, qtype, tuple(t.shape), nbytes))

    limit = parse_size(max_shard_size) if max_shard_size else 0
    w = GGUFWriter(None, data["architecture"], split_max_size=limit)
    for t in tensors:
        w.add_tensor_info(t.target.name, t.shape, np.dtype(np.float32), t.nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[t.qtype])
    values = {**cfg.to_dict(), "block_count": len(layers), "arch": data["architecture"],
              "file_type": data["file_types"][type.upper()], "quantization_version": gguf.GGML_QUANT_VERSION}
    kinds = {"uint32": w.add_uint32, "float32": w.add_float32, "string": w.add_string}
    for entry in data["metadata"]:
        kinds[entry["type"]](entry["key"].format(arch=data["architecture"]), _fill(entry["value"], values))
        if entry["key"] == "general.type":   # the converter writes the model card keys right after it
            _meta_model(w, Path(source_dir or reader.path))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(toktypes)
    for kind, tid in (("bos", cfg.bos_token), ("eos", cfg.eos_token), ("pad", cfg.pad_token)):
        if 0 <= tid < len(tokens):
            {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id}[kind](tid)
    for key, value in (metadata or {}).items():
        w.add_string(key, value)

    # what gguf-py would write before the data, per part (split.* keys included)
    out = Path(out)
    names = [p.name for p in w.format_shard_names(out)]
    w.split_max_size = 0                        # (silences its "fails split requirements" warning)
    w.fout = [io.BytesIO() for _ in w.tensors]
    w.state = WriterState.EMPTY
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    headers = [f.getvalue() for f in w.fout]
    metadata = {k: v.value for k, v in w.kv_data[0].items()}
    w.fout = None
    parts = []
    by_name = {t.target.name: t for t in tensors}
    align = w.data_alignment
    for name, header, infos in zip(names, headers, w.tensors):
        start = GGUFWriter.ggml_pad(len(header), align)
        part = GGUFPart(name, header, start)
        for tname in infos:
            t = by_name[tname]
            t.offset = part.size
            part.size += GGUFWriter.ggml_pad(t.nbytes, align)
            part.tensors.append(t)
        parts.append(part)
    for n in notes:
        for t in tensors:
            if n.startswith(t.target.name + ":"):
                t.note = n
    return GGUFPlan(type, parts, str(tok_path), metadata)


def _meta_model(w, model_dir: Path) -> None:
    """``general.name``, ``general.size_label`` ... as ``convert_hf_to_gguf.py`` derives them (gguf-py's
    ``Metadata``: a model card or config.json in the source directory, else its name)."""
    import gguf
    total, shared, expert, count = w.get_total_parameter_count()
    d = model_dir if model_dir.is_dir() else model_dir.parent
    meta = gguf.Metadata.load(None, d, None, total)
    if meta.name is None:
        meta.name = d.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    meta.set_gguf_meta_model(w)


# -- writing -----------------------------------------------------------------------------------------
def _lossless_q8(value) -> bool:
    """The original int8 can be Q8_0's ``qs``: every scale block is whole Q8_0 blocks."""
    if not isinstance(value, QInt8):
        return False
    K, G = value.weight.shape[-2], value.scales.shape[-2]
    return K % G == 0 and (K // G) % QK8_0 == 0


def _encode(t: GGUFTensor, src: SourceRows, lossless: bool, stats: Q8Stats, acc, measure: bool) -> np.ndarray:
    """The GGUF bytes of rows ``src.r0:src.r1`` of one (expert) matrix or vector. Q8_0 rows land in this
    thread's reused buffer (``tiles.scratch``): the caller writes them before the next chunk."""
    if t.qtype == "Q8_0":
        if lossless:
            q, s = src.int8(work=True)
            out = scratch("gguf.q8_0", (q.shape[0], q.shape[1] // QK8_0 * BLOCK_BYTES), torch.uint8)
            return q8_0_from_int8(q, s, stats, out=out).numpy()
        # a float source's rows as they are stored (the tiles widen them); int8 ones dequantized
        x = src.exact(torch.float32) if isinstance(src.value, QInt8) else src.view()
        x = x.reshape(-1, x.shape[-1])
        out = scratch("gguf.q8_0", (x.shape[0], x.shape[1] // QK8_0 * BLOCK_BYTES), torch.uint8)
        return quantize_q8_0(x, out=out, acc=acc if measure else None).numpy()
    if t.qtype == "BF16":
        return src.exact(torch.bfloat16).view(torch.int16).numpy()
    rows = src.exact(torch.float32)
    return (rows if t.qtype == "F32" else rows.to(torch.float16)).numpy()


def _chunk_rows(t: GGUFTensor) -> int:
    """Rows per chunk: a float32 working set of about ``CHUNK_BYTES``, a multiple of 64."""
    rows = t.shape[-2] if len(t.shape) > 1 else t.shape[0]
    if len(t.shape) == 1:
        return rows
    step = max(1, min(rows, CHUNK_BYTES // (4 * t.shape[-1])))
    return step // 64 * 64 if 64 < step < rows else step


def _jobs(t: GGUFTensor) -> list[tuple]:
    """(expert, (first row, end row)) units of work: one per expert of a stacked tensor; an untransposed
    matrix (the embedding) in spans of JOB_CHUNKS chunks, so that the workers share it."""
    if t.target.index is None and len(t.shape) == 3:
        return [(e, None) for e in range(t.shape[0])]
    if len(t.shape) == 2 and not t.target.transpose:
        span = _chunk_rows(t) * JOB_CHUNKS
        return [(None, (r0, min(t.shape[0], r0 + span))) for r0 in range(0, t.shape[0], span)]
    return [(None, None)]


JOB_CHUNKS = 8     # a multiple of MEASURE_EVERY, so the sampled chunks are the same however the work is split


def _run(reader, t: GGUFTensor, expert: int | None, span, out, on_bytes, results: dict, lock,
         phase=lambda name, sec: None) -> int:
    tg = t.target
    index = expert if expert is not None else tg.index
    value = reader.load(tg.source, index)
    rows = t.shape[-2] if len(t.shape) > 1 else t.shape[0]
    lo, hi = span or (0, rows)
    base = t.offset + (expert or 0) * (t.nbytes // (t.shape[0] if expert is not None else 1))
    row_bytes = t.row_bytes if len(t.shape) > 1 else t.nbytes
    lossless = t.qtype == "Q8_0" and _lossless_q8(value)
    stats = Q8Stats()
    acc = ErrorAccumulator(fast=True) if t.qtype == "Q8_0" and not lossless else None
    step = _chunk_rows(t)
    release = getattr(reader, "release", None)
    for k, r0 in enumerate(range(lo, hi, step)):
        r1 = min(hi, r0 + step)
        src = SourceRows(value, tg.transpose, r0, r1, torch.device("cpu"))
        c0 = time.perf_counter()
        buf = np.ascontiguousarray(_encode(t, src, lossless, stats, acc, k % MEASURE_EVERY == 0)).reshape(-1)
        c1 = time.perf_counter()
        phase("read (page faults) + transform", c1 - c0)
        data = buf.view(np.uint8)
        expected = (r1 - r0) * row_bytes if len(t.shape) > 1 else t.nbytes
        if data.nbytes != expected:
            raise AssertionError(f"{tg.name}: chunk of {data.nbytes} bytes, planned {expected}")
        out.pwrite(data, base + (r0 * row_bytes if len(t.shape) > 1 else 0))
        on_bytes(data.nbytes)
        phase("write", time.perf_counter() - c1)
        if release and not tg.transpose:
            release(tg.source, index, (r0, r1))
    if release and span is None:
        release(tg.source, index)
    with lock:
        res = results.setdefault(tg.name, {"type": t.qtype, "_stats": Q8Stats(), "_acc": []})
        res["_stats"].merge(stats)
        if acc is not None and acc.numel:
            res["_acc"].append(acc)
        if lossless:
            res["lossless_int8"] = True
    return _source_bytes(value) * (hi - lo) // rows


@dataclass
class GGUFSummary(Summary):
    parts: list = field(default_factory=list)
    q8_0: dict = field(default_factory=dict)   # whole-file totals of the lossless path
    report: str | None = None


def to_gguf(src, out, *, type: str = "q8_0", tokenizer=None, max_shard_size=None, workers: int | None = None,
            dry_run: bool = False, progress: bool = True, overwrite: bool = False) -> GGUFSummary | GGUFPlan:
    """Convert any readable checkpoint to GGUF at ``out`` (``-0000k-of-0000N.gguf`` parts with
    ``max_shard_size``). Returns a :class:`GGUFSummary`, or the :class:`GGUFPlan` with ``dry_run``.

    Every part carries the run's fingerprint (``grokconv.*`` key/values); resume keeps a part only when
    this fingerprint made it durable, and another run's output at ``out`` is an error unless ``overwrite``."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise LayoutError("the output must be a file name ending in .gguf", path=out)
    reader = open_checkpoint(src)
    fp = None
    if not dry_run:
        if type not in GGUF_TYPES:
            raise LayoutError(f"unknown --type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
        fp = make_fingerprint("to-gguf", reader.path, type=type, tokenizer=gguf_tokenizer(reader, tokenizer),
                              max_shard_size=parse_size(max_shard_size) if max_shard_size else None)
    plan = plan_gguf(reader, type, out=out, tokenizer=tokenizer, max_shard_size=max_shard_size,
                     source_dir=Path(src), metadata=None if fp is None else fp.metadata())
    if dry_run:
        return plan
    owned = (out.name, f"{out.stem}-*-of-*.gguf", out.stem + REPORT_SUFFIX)
    guard = guard_output(out.parent, fp, key=out.name, owned=owned, overwrite=overwrite, label=out)
    try:
        summary = _write_parts(reader, plan, out, guard, type=type, workers=workers, progress=progress)
        guard.finish()
    finally:
        guard.close()
        reader.close()
    return summary


def _write_parts(reader, plan: GGUFPlan, out: Path, guard, *, type, workers, progress) -> GGUFSummary:
    """Every part not already complete for this fingerprint; the report just before the last part."""
    summary = GGUFSummary()
    t0 = time.perf_counter()
    from tqdm import tqdm
    bar = tqdm(total=plan.total_size, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    lock = threading.Lock()
    results: dict = {}
    reported = False

    def on_bytes(n):
        with lock:
            summary.bytes_written += n
            bar.update(n)

    saved_threads = torch.get_num_threads()
    workers = resolve_workers(workers)
    torch.set_num_threads(torch_threads_per_worker(workers))
    try:
        for part in plan.parts:
            final = out.with_name(part.filename)
            if guard.is_complete(final, lambda p, part=part: is_complete(p, part.size, part.header)):
                summary.shards_skipped += 1
                bar.update(part.size)
                continue
            jobs = [(t, e, span) for t in part.tensors for e, span in _jobs(t)]

            def fill(out, jobs=jobs):
                summary.bytes_read += sum(run_jobs(
                    jobs, lambda j: _run(reader, *j, out, on_bytes, results, lock, summary.add_phase), workers,
                    prefetch=lambda j: reader.prefetch(j[0].target.source, j[1] if j[1] is not None else j[0].target.index)))

            last = part is plan.parts[-1]

            def durable(final=final, part=part, last=last):
                # the report goes to its final name before the last part does: output that looks
                # complete always has its report, and a killed run leaves neither
                if last:
                    _write_report(summary, results, type, out, summary.parts + [str(final)])
                guard.done(final, part.size)
            write_planned(final, part.size, part.header, fill, on_bytes, before_rename=durable)
            reported = reported or last
            summary.tensors += len(part.tensors)
            summary.shards_written += 1
            summary.parts.append(str(final))
    finally:
        bar.close()
        torch.set_num_threads(saved_threads)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss = peak_rss_bytes()
    if not reported:
        summary.errors, summary.q8_0 = _report(results)
    return summary


def _write_report(summary, results: dict, type: str, out: Path, parts: list[str]) -> None:
    summary.errors, summary.q8_0 = _report(results)
    if type == "q8_0" and results:
        report = out.with_name(out.stem + REPORT_SUFFIX)
        atomic_write_text(report, json.dumps(
            {"type": type, "reference": "float32 int8*scale (exact dequantization of the source)",
             "parts_measured": [Path(p).name for p in parts],
             "q8_0_lossless_totals": summary.q8_0, "tensors": summary.errors}, indent=1, sort_keys=True) + "\n")
        summary.report = str(report)


def _report(results: dict) -> tuple[dict, dict]:
    tensors, total = {}, Q8Stats()
    for name, r in sorted(results.items()):
        st: Q8Stats = r.pop("_stats")
        accs = r.pop("_acc")
        if st.blocks:
            total.merge(st)
            r.update(st.to_dict())
        if accs:
            a = accs[0]
            for b in accs[1:]:
                a.sum_ref_sq += b.sum_ref_sq
                a.sum_err_sq += b.sum_err_sq
                a.max_abs, a.amax, a.numel = max(a.max_abs, b.max_abs), max(a.amax, b.amax), a.numel + b.numel
            r.update(a.result(), measured="every 4th row chunk of each matrix")
        if st.blocks or accs:
            tensors[name] = r
    return tensors, total.to_dict() if total.blocks else {}
