"""Target encodings: how one mapped tensor becomes bytes, a chunk of output rows at a time.

Each :class:`Encoding` names the tensors it writes for a module (``X.weight`` alone for bf16;
``X.weight_packed`` + ``X.weight_scale`` + ``X.weight_shape`` for compressed-tensors int8;
``X.weight`` + ``X.weight_scale`` for fp8 ...) and turns rows of the source into rows of those
tensors. Sources arrive in canonical ``[in, out]`` layout; targets are ``[out, in]``, so output rows
are source columns: each chunk is read strided, widened to bf16/f32 (fast on the CPU), scaled and
transposed in one pass, and written contiguous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .mapping import Target
from .quant.rowblocks import dequantize_rowblocks
from .quant.tiles import scratch, tile_columns, transpose_int8, transpose_into
from .roles import ENCODINGS
from .tensor import QInt8, to_torch

__all__ = ["Encoding", "ENCODINGS", "encoding_for", "SourceRows", "CHUNK_BYTES", "encode_chunk", "stage", "tensor_amax"]

CHUNK_BYTES = 48 << 20   # float32 working set per chunk
_TORCH = {"BF16": torch.bfloat16, "F32": torch.float32}


@dataclass
class SourceRows:
    """Rows ``r0:r1`` of a target, read from its canonical source on ``device``."""
    value: object        # QInt8 (2-D slice) or ndarray, canonical orientation
    transpose: bool
    r0: int
    r1: int
    device: torch.device

    def _cols(self, a) -> torch.Tensor:
        """Source columns r0:r1 (or rows, untransposed) as a torch view on the device, not yet contiguous."""
        sub = a[..., self.r0:self.r1] if self.transpose else a[self.r0:self.r1]
        return (sub if isinstance(sub, torch.Tensor) else to_torch(sub)).to(self.device, non_blocking=True)

    def exact(self, dtype=torch.float32, work: bool = False) -> torch.Tensor:
        """Exact dequantized rows ``[R, in]`` (``bf16`` gives the reference's ``bf16(int8 * scale)``).

        ``work``: an int8 source's rows land in this thread's reused buffer (``quant.tiles.scratch``),
        valid until the next ``exact(work=True)`` in the thread: for tiles consumed at once."""
        v = self.value
        if isinstance(v, QInt8):
            if not self.transpose:
                raise ValueError("int8 sources are [in, out]: every layout maps them transposed")
            # [K, R] and [G, R] in, the contiguous [R, K] out, in cache-sized tiles (quant.tiles)
            w, s = self._cols(v.weight), self._cols(v.scales)
            out = scratch("SourceRows.exact", (w.shape[1], w.shape[0]), dtype) if work else None
            return dequantize_rowblocks(w, s, dtype, transpose=True, out=out)
        return self.view().to(dtype).contiguous()

    def view(self) -> torch.Tensor:
        """A float source's rows ``[R, in]`` as they are stored: a view, strided when transposed."""
        t = self._cols(self.value)
        return t.t() if self.transpose and t.dim() == 2 else t

    def int8(self, work: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw int8 rows ``[R, in]`` and their scales ``[R, G]`` (source must be QInt8, transposed).
        ``work``: the rows land in this thread's reused buffer, as :meth:`exact`'s."""
        v = self.value
        w = self._cols(v.weight)
        q = transpose_into(w, scratch("SourceRows.int8", (w.shape[1], w.shape[0]), w.dtype)) if work and \
            w.device.type == "cpu" else transpose_int8(w)
        s = self._cols(v.scales).t().contiguous()
        return q, s


def stage(value, device: torch.device):
    """Move one slice to the device once, through pinned memory, so every chunk is cut on the device.

    On the CPU the numpy views are used as they are (zero copy). The chunk code is the same either way.
    """
    if device.type == "cpu":
        return value

    def move(a):
        return to_torch(np.ascontiguousarray(a)).pin_memory().to(device, non_blocking=True)
    if isinstance(value, QInt8):
        return QInt8(move(value.weight), move(value.scales))
    return move(value)


@dataclass
class Encoding:
    """How a role's tensors are written. ``kind`` selects the row transform."""
    name: str
    kind: str                      # "float", "int8-pack", "fp8"
    dtype: str = "BF16"            # safetensors dtype of the main tensor
    scheme: str | None = None      # fp8: tensor / channel / block; int8: group / channel
    scale_name: str = "weight_scale"
    scale_dtype: str = "BF16"
    group_size: int = 128
    block: tuple = (128, 128)
    params: dict = field(default_factory=dict)

    # -- names and shapes ----------------------------------------------------------------------
    def outputs(self, t: Target) -> list[tuple[str, str, tuple]]:
        if self.kind == "float":
            return [(t.name, self.dtype, t.shape)]
        out, inn = t.shape
        m = t.module
        if self.kind == "int8-pack":
            groups = 1 if self.scheme == "channel" else inn // self.group_size
            return [(f"{m}.weight_packed", "I32", (out, inn // 4)),
                    (f"{m}.weight_scale", self.scale_dtype, (out, groups)),
                    (f"{m}.weight_shape", "I64", (2,))]
        shape = {"tensor": (1,), "channel": (out, 1),
                 "block": (math.ceil(out / self.block[0]), math.ceil(inn / self.block[1]))}[self.scheme]
        return [(f"{m}.weight", "F8_E4M3", t.shape), (f"{m}.{self.scale_name}", self.scale_dtype, shape)]

    def rows_per_chunk(self, t: Target) -> int:
        row = max(1, math.prod(t.shape[1:]) if len(t.shape) > 1 else 1)
        r = max(1, CHUNK_BYTES // (4 * row))
        if self.kind == "fp8" and self.scheme == "block":
            r = max(self.block[0], r // self.block[0] * self.block[0])
        elif r > 64:
            r = r // 64 * 64
        return min(r, t.shape[0])


def encoding_for(quantize: str, role: str, *, fp8_scheme: str = "channel", fp8_format: str = "compressed-tensors",
                 group_size: int = 128, int8_scheme: str = "group") -> Encoding:
    """The encoding of a role under a ``--quantize`` choice (the table in ``ENCODINGS``)."""
    key = ENCODINGS[quantize].get(role)
    if key is None:
        raise KeyError(f"no encoding for role {role!r} under --quantize {quantize}")
    if key == "fp8":
        if fp8_format == "fp8":
            if fp8_scheme != "block":
                raise ValueError("--fp8-format fp8 (DeepSeek style) stores 128x128 blocks only: use --fp8-scheme block")
            return Encoding("fp8-block-inv", "fp8", scheme="block", scale_name="weight_scale_inv", scale_dtype="F32")
        return Encoding(f"fp8-{fp8_scheme}", "fp8", scheme=fp8_scheme, scale_dtype="BF16")
    if key == "int8-pack":
        return Encoding(f"int8-{int8_scheme}", "int8-pack", scheme=int8_scheme, group_size=group_size)
    return Encoding(key, "float", dtype=key)


def encode_chunk(enc: Encoding, src: SourceRows, t: Target, ctx: dict):
    """Rows of every output tensor for source rows ``src.r0:src.r1``.

    Returns ``[(name, first_row, tensor)]`` and whether the chunk was measured: with ``ctx['measure']``
    on, the error of the encoding against the exact float32 dequantization is fed to ``ctx['acc']`` (an
    :class:`~grokconv.quant.metrics.ErrorAccumulator`), tile by tile for fp8. Encodings that are exact by
    construction (lossless int8) are never measured.
    """
    names = [n for n, _, _ in enc.outputs(t)]
    r0 = src.r0
    measure = bool(ctx.get("measure")) and ctx.get("acc") is not None
    if enc.kind == "float":
        want = {"BF16": torch.bfloat16, "F32": torch.float32}[enc.dtype]
        if isinstance(src.value, QInt8) and want == torch.bfloat16:
            rows = src.exact(torch.bfloat16)       # bf16(int8 * scale) in one rounding, as the reference
        else:
            rows = src.exact(want)      # a float source: no copy at all when it is stored as wanted
        if measure:
            ctx["acc"].update(src.exact(torch.float32), rows.float())
        return [(names[0], r0, rows)], measure
    if enc.kind == "int8-pack":
        from .quant.int8 import dequantize_int8, int8_scales, pack_int8, quantize_int8
        lossless = isinstance(src.value, QInt8) and (enc.scheme == "group" or src.value.groups == 1)
        if lossless:                               # the original int8 and its scales, repeated per group
            q, s = src.int8()
            reps = 1 if enc.scheme == "channel" else (q.shape[1] // s.shape[1]) // enc.group_size
            scale = s.repeat_interleave(reps, dim=1)
        else:   # a float source, or row blocks asked for per channel: re-quantize (amax / 127.5)
            w = src.exact(torch.float32)
            scale = int8_scales(w, enc.scheme, enc.group_size, scale_dtype=torch.bfloat16)
            q = quantize_int8(w, scale, enc.scheme, enc.group_size)
        out = [(names[0], r0, pack_int8(q)), (names[1], r0, scale.to(torch.bfloat16))]
        if r0 == 0:
            out.append((names[2], 0, torch.tensor(list(t.shape), dtype=torch.int64)))
        measure = measure and not lossless         # lossless needs no measuring
        if measure:
            ctx["acc"].update(src.exact(torch.float32), dequantize_int8(q, scale, enc.scheme, enc.group_size))
        return out, measure
    return _encode_fp8(enc, src, t, ctx, names, measure)


def _encode_fp8(enc: Encoding, src: SourceRows, t: Target, ctx: dict, names: list, measure: bool):
    """fp8 rows, a tile of rows at a time: the exact float32 rows of a tile, their scales and their fp8
    stay in the cache (``quant.tiles``); every value is the one the whole chunk would give."""
    from .quant.fp8 import dequantize_fp8, fp8_scales, quantize_fp8
    r0, n = src.r0, src.r1 - src.r0
    sdt = torch.bfloat16 if enc.scale_dtype == "BF16" else torch.float32
    from .quant.from_int8 import TABLE_MIN_ROWS, fp8_from_int8
    v = src.value
    if isinstance(v, QInt8) and src.transpose and src.device.type == "cpu" and \
            v.weight.shape[-2] // v.groups >= TABLE_MIN_ROWS:
        # the original int8: tables per column (channel, tensor) or tiles of arithmetic (block), fp8 bytes
        # transposed as bytes (quant.from_int8): the same bytes as below, without a float32 matrix. They go
        # into this thread's reused buffer: the caller writes the chunk before the next one.
        buf = scratch("encode_fp8", (n, v.weight.shape[-2]), torch.uint8).view(torch.float8_e4m3fn)
        q, scale = fp8_from_int8(src._cols(v.weight), src._cols(v.scales), enc.scheme, enc.block,
                                 _TORCH[enc.scale_dtype], ctx.get("tensor_scale"), ctx["acc"] if measure else None,
                                 out=buf)
        out = [(names[0], r0, q)]
        if scale is not None:
            out.append((names[1], r0 // enc.block[0] if enc.scheme == "block" else r0, scale.to(sdt)))
        elif r0 == 0:
            out.append((names[1], 0, ctx["tensor_scale"].reshape(1).to(sdt)))
        return out, measure
    cols = t.shape[1] if len(t.shape) > 1 else 1
    b0 = enc.block[0] if enc.scheme == "block" else 1
    step = max(1, tile_columns(cols, b0)) if src.device.type == "cpu" else n
    q = torch.empty(n, *t.shape[1:], dtype=torch.float8_e4m3fn, device=src.device)
    scales = []
    for a in range(0, n, step):
        tile = SourceRows(src.value, src.transpose, r0 + a, min(src.r1, r0 + a + step), src.device)
        w = tile.exact(torch.float32, work=src.device.type == "cpu")
        if enc.scheme == "tensor":
            scale = ctx["tensor_scale"]
        else:   # a bf16-stored scale is rounded first, so the stored scale is the one used to quantize
            scale = fp8_scales(w, enc.scheme, enc.block, scale_dtype=_TORCH[enc.scale_dtype])
            scales.append(scale)
        qt = quantize_fp8(w, scale, enc.scheme, enc.block, out=q[a:a + w.shape[0]])
        if measure:
            ctx["acc"].update(w, dequantize_fp8(qt, scale, enc.scheme, enc.block))
    out = [(names[0], r0, q)]
    if enc.scheme != "tensor":
        srow = r0 // enc.block[0] if enc.scheme == "block" else r0
        out.append((names[1], srow, torch.cat(scales).to(sdt)))
    elif r0 == 0:
        out.append((names[1], 0, ctx["tensor_scale"].reshape(1).to(sdt)))
    return out, measure


def tensor_amax(value) -> float:
    """max |w| of a whole tensor, from int8 and scales without dequantizing it (per-tensor fp8).

    Per row block: the column-wise max and min of the int8 (one strided read, no temporaries of the
    tensor's size) give max |q| per column, times |scale|: the same value as max |q * scale| (every
    product is exact in float32)."""
    if isinstance(value, QInt8):
        w, s = to_torch(value.weight), to_torch(value.scales).float()
        K, N = w.shape
        G = s.shape[0]
        blk = K // G
        best = 0.0
        step = max(1, (CHUNK_BYTES // 2) // max(N, 1))  # rows per reduction pass: bounded memory
        for g in range(G):
            hi = torch.full((N,), -128, dtype=torch.int16)
            lo = torch.full((N,), 127, dtype=torch.int16)
            for r0 in range(g * blk, (g + 1) * blk, step):
                part = w[r0:min((g + 1) * blk, r0 + step)]
                if part.shape[0]:
                    torch.maximum(hi, part.amax(dim=0).to(torch.int16), out=hi)
                    torch.minimum(lo, part.amin(dim=0).to(torch.int16), out=lo)
            if blk:
                colmax = torch.maximum(hi, lo.neg()).float()       # int16: -(-128) does not wrap
                best = max(best, float((colmax * s[g].abs()).amax()))
        return best
    return float(to_torch(np.asarray(value)).float().abs().max())
