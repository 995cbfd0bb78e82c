"""fp8 rows straight from the original int8, on the CPU: no float32 matrix, no float transpose.

A source column ``n`` (an output row) holds int8 ``q`` with one bf16 scale ``s`` per row block ``g``, and
under the ``channel`` and ``tensor`` schemes one fp8 scale ``S``, so its fp8 byte ``fp8(clamp(q * s / S))``
depends on ``q`` alone: 256 possible inputs. Each ``(g, n)`` gets a 256-entry table built with exactly
the arithmetic of :func:`~grokconv.quant.fp8.quantize_fp8` (the exact float32 product ``q * s``, a float32
division, the clamp, the round-to-nearest-even cast), and the column is one byte gather. ``block`` scales
change every 128 inputs, so a table would cost more than it saves: there the arithmetic runs on cache-
sized tiles in the source's orientation, the division writing the fp8 directly where no clamp can
matter (:func:`_quantize_tile`). Both read the mapped int8 once, as bytes, into a per-thread buffer
before widening it. Either way the fp8 bytes are then transposed as bytes
(:func:`~grokconv.quant.tiles.transpose_into`). The results are the bytes the float32 path gives, scales
included: ``max |q * s|`` of a column is ``max |q| * |s|`` exactly, each product being exact.

The error statistics of a table column need no dequantization either: a histogram of its int8 values
weights the table's 256 errors (:meth:`~grokconv.quant.metrics.ErrorAccumulator.update_counts`).
"""
from __future__ import annotations

import torch

from ._blocks import cdiv, dequantize_blockwise, e4m3_to_float32, local_scale, quantize_blockwise, \
    scales_from_amax
from .fp8 import FP8_DTYPE, FP8_MAX
from .tiles import TILE_BYTES, scratch, transpose_into

__all__ = ["fp8_from_int8", "TABLE_MIN_ROWS"]

# inputs per (row block, column) below which a 256-entry table costs about what it converts (tiny models):
# callers keep the float32 path there
TABLE_MIN_ROWS = 1024

_NO_CLAMP_BELOW = 464.0   # quotients below it cast to at most 448 in every torch (see _quantize_tile)
_LEVELS = torch.arange(-128, 128, dtype=torch.float32)    # every int8 value, in table order


def _segments(k0: int, k1: int, blk: int):
    """``(g, a, b)``: the rows ``[a, b)`` of ``[k0, k1)`` that lie in row block ``g`` of ``blk`` rows."""
    a = k0
    while a < k1:
        g = a // blk
        b = min(k1, (g + 1) * blk)
        yield g, a, b
        a = b


@torch.no_grad()
def fp8_from_int8(q: torch.Tensor, s: torch.Tensor, scheme: str, block=(128, 128),
                  scale_dtype: torch.dtype = torch.bfloat16, tensor_scale: torch.Tensor | None = None,
                  acc=None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float8_e4m3fn ``[R, K]`` rows and their float32 scales from int8 ``q [K, R]`` and scales ``s [G, R]``.

    ``q`` and ``s`` are the source's columns (any strides), ``q[k, n] * s[k // (K/G), n]`` the exact
    value of output element ``[n, k]``. Scales: ``(R, 1)`` for channel, ``(cdiv(R, b0), cdiv(K, b1))`` for
    block (``R`` must then start a block: the caller's rows begin at a multiple of ``b0``), None for tensor
    (``tensor_scale`` is used). ``acc``: an ``ErrorAccumulator`` fed the error of every element. ``out``: the
    float8 ``[R, K]`` to fill (a reused buffer spares the page faults of a fresh one).
    """
    if q.dtype != torch.int8 or q.ndim != 2 or s.ndim != 2 or s.shape[1] != q.shape[1]:
        raise ValueError(f"need int8 q [K, R] and scales [G, R], got {q.dtype} {tuple(q.shape)} and {tuple(s.shape)}")
    K, R = q.shape
    G = s.shape[0]
    if G <= 0 or K % G:
        raise ValueError(f"input dim K={K} is not divisible into {G} scale blocks")
    if out is None:
        out = torch.empty(R, K, dtype=FP8_DTYPE)
    elif tuple(out.shape) != (R, K) or out.dtype != FP8_DTYPE:
        raise ValueError(f"out must be float8_e4m3fn {(R, K)}, got {out.dtype} {tuple(out.shape)}")
    if scheme == "block":
        return out, _block(q, s.to(torch.float32), K // G, tuple(int(b) for b in block), scale_dtype, out, acc)
    if scheme == "tensor":
        if tensor_scale is None:
            raise ValueError("the tensor scheme needs tensor_scale")
        S_all = local_scale(tensor_scale, R, K, None, K, 0, q.device).reshape(1).expand(R)
    elif scheme == "channel":
        S_all = None
    else:
        raise ValueError(f"unknown fp8 scheme {scheme!r}")
    scales = torch.empty(R, 1, dtype=torch.float32) if S_all is None else None
    blk = K // G
    # 256 columns: torch's int8 column reductions crawl below 128 (7 ns an element at 64, 0.08 at 128)
    t = max(8, min(256, TILE_BYTES // 4096 // 8 * 8))
    kt = max(8, TILE_BYTES // (4 * t) // 8 * 8)          # rows per gather: an int32 index of TILE_BYTES
    for c0 in range(0, R, t):
        c1 = min(R, c0 + t)
        n = c1 - c0
        sc = s[:, c0:c1].to(torch.float32)                             # [G, n]
        # the column strip read once from the mapped source, as bytes (see _block), then used from the cache
        qc = scratch("fp8_from_int8.strip", (K, n), torch.int8).copy_(q[:, c0:c1])
        if S_all is None:   # max |q| per column and row block (int8 reductions), times |s|: max |q * s|
            colmax = torch.stack([_colmax(qc[g * blk:(g + 1) * blk]) for g in range(G)])
            amax = (colmax * sc.abs()).amax(0) if blk else torch.zeros(n)
            S = local_scale(scales_from_amax(amax.reshape(n, 1), FP8_MAX, scale_dtype), n, K, 1, K, 0, q.device)[:, 0]
            scales[c0:c1, 0] = S
        else:
            S = S_all[c0:c1]
        # the table: the quantizer's arithmetic on the 256 values of every (row block, column)
        tab = (_LEVELS * sc[:, :, None]).div_(S[None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
        tab8 = tab.to(FP8_DTYPE).view(torch.uint8).reshape(-1)
        off = (torch.arange(G * n, dtype=torch.int32).view(G, n) * 256 + 128)
        counts = torch.zeros(G * n * 256, dtype=torch.int64) if acc is not None else None
        for k0 in range(0, K, kt):
            k1 = min(K, k0 + kt)
            idx = scratch("fp8_from_int8.idx", (k1 - k0, n), torch.int32)
            for g, a, b in _segments(k0, k1, blk):
                idx[a - k0:b - k0].copy_(qc[a:b]).add_(off[g])
            flat = idx.view(-1)
            got = scratch("fp8_from_int8.got", (k1 - k0, n), torch.uint8)
            torch.index_select(tab8, 0, flat, out=got.view(-1))
            transpose_into(got, out[c0:c1, k0:k1].view(torch.uint8))
            if counts is not None:
                counts += torch.bincount(flat, minlength=G * n * 256)
        if counts is not None:
            ref = (_LEVELS.double() * sc.double()[:, :, None])
            approx = e4m3_to_float32(tab8.view(FP8_DTYPE)).double().view(G, n, 256) * S.double()[None, :, None]
            acc.update_counts(ref, approx, counts.view(G, n, 256))
    return out, scales


def _colmax(q: torch.Tensor) -> torch.Tensor:
    """float32 ``max |q|`` of each column of int8 ``q`` (max and -min in int16: -(-128) does not wrap)."""
    return torch.maximum(q.amax(0).to(torch.int16), q.amin(0).to(torch.int16).neg()).to(torch.float32)


def _block(q, s, blk: int, block: tuple, scale_dtype, out, acc) -> torch.Tensor:
    """The ``block`` scheme: exact float32 tiles ``[k, n]`` in the source's orientation (whole 128x128 blocks),
    their scales, the quantizer's division, clamp and cast, then the fp8 bytes transposed."""
    K, R = q.shape
    b0, b1 = block                                  # b0 output rows (source columns), b1 inputs (source rows)
    scales = torch.empty(cdiv(R, b0), cdiv(K, b1), dtype=torch.float32)
    # twice the usual tile: 768 source columns (runs of 768 bytes) by 1024 inputs, fewer small ops per
    # element (3.0 MiB measured 6% faster than 1.5 here; L2 is 2 MiB a core, L3 large)
    t = max(b0, min(cdiv(R, b0) * b0, TILE_BYTES // (16 * b1) // b0 * b0))
    kt = max(b1, 2 * TILE_BYTES // (4 * t) // b1 * b1)
    for c0 in range(0, R, t):
        c1 = min(R, c0 + t)
        for k0 in range(0, K, kt):
            k1 = min(K, k0 + kt)
            x = scratch("fp8_from_int8.x", (k1 - k0, c1 - c0), torch.float32)
            amax = torch.zeros(cdiv(k1 - k0, b1), c1 - c0)          # max |q * s| per (input block, column)
            # the source tile read once, as bytes (a vectorised copy: the widening copy reads a mapped
            # file's cold pages a third slower), then widened and reduced in the cache
            qt = scratch("fp8_from_int8.q", (k1 - k0, c1 - c0), torch.int8).copy_(q[k0:k1, c0:c1])
            for g, a, b in _segments(k0, k1, blk):
                r0, r1 = a - k0, b - k0                              # the int8 reduced, times |s|: exact
                x[r0:r1].copy_(qt[r0:r1]).mul_(s[g, c0:c1])
                sg = s[g, c0:c1].abs()
                m0, m1 = min(r1, cdiv(r0, b1) * b1), max(r0, r1 // b1 * b1)   # whole blocks: one reduction
                if m1 > m0:
                    qb = qt[m0:m1].unflatten(0, (-1, b1))
                    cm = torch.maximum(qb.amax(1).to(torch.int16), qb.amin(1).to(torch.int16).neg())
                    blocks = amax[m0 // b1:m1 // b1]
                    torch.maximum(blocks, cm.to(torch.float32) * sg, out=blocks)
                for p0, p1 in ((r0, m0), (max(m1, m0), r1)):              # partial blocks at either end
                    if p1 > p0:
                        i = p0 // b1
                        torch.maximum(amax[i], _colmax(qt[p0:p1]) * sg, out=amax[i])
            pad = cdiv(c1 - c0, b0) * b0 - (c1 - c0)
            amax = torch.nn.functional.pad(amax, (0, pad)).view(amax.shape[0], -1, b0).amax(2)
            S = scales_from_amax(amax, FP8_MAX, scale_dtype)                          # [k blocks, n blocks]
            f8 = scratch("fp8_from_int8.f8", (k1 - k0, c1 - c0), torch.uint8).view(FP8_DTYPE)
            if (k1 - k0) % b1 or (c1 - c0) % b0:      # partial blocks (odd shapes): the padded general path
                quantize_blockwise(x, S, b1, b0, 0, -FP8_MAX, FP8_MAX, FP8_DTYPE, rounding=False, out=f8)
                if acc is not None:
                    acc.update(x, dequantize_blockwise(f8, S, b1, b0, 0, FP8_DTYPE))
            else:
                _quantize_tile(x, S, amax, b1, b0, f8, acc)
            transpose_into(f8.view(torch.uint8), out[c0:c1, k0:k1].view(torch.uint8))
            scales[c0 // b0:c0 // b0 + S.shape[1], k0 // b1:k0 // b1 + S.shape[0]] = S.t()
    return scales


def _quantize_tile(x: torch.Tensor, S: torch.Tensor, amax: torch.Tensor, b1: int, b0: int, f8: torch.Tensor,
                   acc) -> None:
    """fp8 of a tile of whole blocks: ``quantize_blockwise``'s float32 division by the block's scale, clamp
    and cast, in this thread's buffers; with ``acc``, the error of ``fp8 * S`` against ``x``.

    Where no quotient can reach 464 (``fl(amax / S) < 464`` in every block: division rounds monotonically,
    so no ``fl(x / S)`` of the block is larger), the clamp changes no byte: quotients in ``[448, 464)``
    round to 448 in every torch (464 is the midpoint of 448 and 480, e4m3fn's NaN code; torch <= 2.11
    turns 464 and above into NaN, newer ones saturate). The division then writes the fp8 directly (one
    pass; the same float32 quotient, the same cast). A bf16 scale rounds at most 2**-8 below
    ``amax / 448`` (quotients up to ~449.75), so only NaN or inf takes the clamped path.

    The dequantization reads the fp8 bytes as float16 bits (``(u + (u & 0x80)) << 7`` puts the sign at
    bit 15 and ``eeeemmm`` at bits 7..13: the e4m3 value times 2**-8, exactly) and multiplies by ``S * 256``
    (exact): the float32 ``fp8 * S`` that ``dequantize_blockwise`` gives. No NaN code needs decoding:
    the clamp leaves none unless ``x`` is NaN there, and the error is then NaN either way."""
    k, n = x.shape
    v = (k // b1, b1, n // b0, b0)
    Sb = S[:, None, :, None]
    y = scratch("fp8_from_int8.y", v, torch.float32)
    if bool((amax / S).lt(_NO_CLAMP_BELOW).all()):
        torch.div(x.view(v), Sb, out=f8.view(v))
    else:
        f8.view(v).copy_(torch.div(x.view(v), Sb, out=y).clamp_(-FP8_MAX, FP8_MAX))
    if acc is None:
        return
    u = scratch("fp8_from_int8.u", (k, n), torch.int16)
    h = scratch("fp8_from_int8.h", (k, n), torch.int16)
    u.copy_(f8.view(torch.uint8))
    torch.bitwise_and(u, 0x80, out=h).add_(u).bitwise_left_shift_(7)
    y.view(k, n).copy_(h.view(torch.float16))
    acc.update(x, y.mul_(Sb * 256.0).view(k, n))
