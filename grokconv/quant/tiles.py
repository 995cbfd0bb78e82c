"""Cache-sized tiles for the CPU transforms: the int8 weights arrive ``[in, out]`` and leave ``[out, in]``.

A transposition of a whole chunk runs at DRAM speed and dominated the CPU conversions (an fp8 chunk was
widened, transposed, scaled, reduced and divided as 48 MB float32 temporaries, each pass out of cache).
Cut into column tiles of about ``TILE_BYTES`` of float32, every temporary stays in L2 and each element
is read from memory once. Tiles never change a value: every element is computed on its own.

torch moves a transposed element one at a time (~1.4 ns a byte here); :func:`transpose_into` moves
1-, 2- and 4-byte elements as int64 blocks instead (SWAR: shifts and masks over whole planes, then one
strided move per 8 bytes), about twice as fast on the int8 and fp8 bytes every conversion transposes.
"""
from __future__ import annotations

import threading

import torch

__all__ = ["TILE_BYTES", "tile_columns", "tile_rows", "transpose_int8", "transpose_into", "scratch"]

TILE_BYTES = 3 << 19          # 1.5 MiB of float32 per tile: 64 columns of a 6144-row weight
_MIN_TILE = 64                # columns: a whole 64-byte cache line of every int8 row read


_LOCAL = threading.local()


def scratch(key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A CPU work buffer of ``shape`` kept per thread under ``key`` and reused by the next call with the
    same key: a fresh allocation per tile costs page faults that were a third of the transform. The
    caller must be done with the previous buffer of that key (keys are per function, never returned)."""
    n = 1
    for d in shape:
        n *= d
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    # a buffer made under inference_mode cannot be updated outside it (and the reverse is refused for
    # autograd's sake): one buffer per mode
    k = (key, dtype, torch.is_inference_mode_enabled())
    buf = bufs.get(k)
    if buf is None or buf.numel() < n:
        buf = bufs[k] = torch.empty(max(n, 1), dtype=dtype)
    return buf[:n].view(shape)


def tile_columns(rows: int, multiple: int = 1) -> int:
    """Columns per tile of a ``[rows, n]`` source: about ``TILE_BYTES`` of float32, at least ``_MIN_TILE``
    (a strided int8 read then uses every byte of each cache line it loads), a multiple of ``multiple``."""
    t = max(_MIN_TILE, TILE_BYTES // (4 * max(1, rows)) // _MIN_TILE * _MIN_TILE)
    return max(multiple, t // multiple * multiple)


def tile_rows(cols: int, itemsize: int = 4) -> int:
    """Rows per tile of ``cols`` columns: about ``TILE_BYTES`` (tall sources are cut both ways)."""
    return max(1, TILE_BYTES // (itemsize * max(1, cols)))


# the masks of the three SWAR rounds of an 8x8 byte transpose (4x4 of 16-bit, 2x2 of 32-bit elements):
# the round that swaps elements ``d`` apart moves ``8 * itemsize * d`` bits
_SWAR_MASKS = {8: 0x00FF00FF00FF00FF, 16: 0x0000FFFF0000FFFF, 32: 0x00000000FFFFFFFF}


def _swar_ok(src: torch.Tensor, out: torch.Tensor, m: int) -> bool:
    """Whether ``src`` [K, n] and ``out`` [n, K] view as int64 rows of ``m`` elements (8-byte aligned)."""
    e = src.element_size()
    return (m > 1 and src.shape[0] % m == 0 and src.shape[1] % m == 0 and src.stride(1) == 1
            and out.stride(1) == 1 and (src.stride(0) * e) % 8 == 0 and (out.stride(0) * e) % 8 == 0
            and (src.storage_offset() * e) % 8 == 0 and (out.storage_offset() * e) % 8 == 0)


def _swar_transpose(src: torch.Tensor, out: torch.Tensor, m: int) -> None:
    """``out = src.t()`` with elements of ``8 // m`` bytes, moved as int64: the ``m x m`` element blocks
    are transposed inside their int64s (log2(m) rounds of shifts and masks over whole planes, vectorised)
    and the blocks as int64 (``m`` times fewer strided moves than elements). Bits move, values never."""
    K, n = src.shape
    kb, nb = K // m, n // m
    w = scratch("swar.w", (m, kb, nb), torch.int64)
    w.copy_(src.view(torch.int64).view(kb, m, nb).transpose(0, 1))   # plane i: rows i, i+m, ... of each block
    d, bits = m // 2, 64 // m
    while d:
        sh = bits * d
        v = w.view(m // (2 * d), 2, d * kb * nb)
        lo, hi = v[:, 0], v[:, 1]
        t = scratch("swar.t", tuple(lo.shape), torch.int64)
        torch.bitwise_right_shift(lo, sh, out=t).bitwise_xor_(hi).bitwise_and_(_SWAR_MASKS[sh])
        hi.bitwise_xor_(t)
        lo.bitwise_xor_(t.bitwise_left_shift_(sh))
        d //= 2
    # out row bj*m + j, int64 column bi = plane j's block (bi, bj); float64 moves them faster than int64
    # does here, and a copy moves bits as they are (no NaN is ever quieted by a move)
    out.view(torch.int64).view(nb, m, kb).permute(1, 2, 0).view(torch.float64).copy_(w.view(torch.float64))


@torch.no_grad()
def transpose_into(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out.copy_(src.t())`` for a 2-D CPU ``src [K, n]`` (any strides) and ``out [n, K]`` of the same dtype.

    Elements of 1, 2 or 4 bytes go through int64 SWAR blocks (``_swar_transpose``) where the shapes and
    alignment allow, tile by tile in the cache; torch's element-by-element strided copy, several times
    slower, does the rest (odd edges, misaligned views, other devices).
    """
    if src.ndim != 2 or tuple(out.shape) != (src.shape[1], src.shape[0]) or out.dtype != src.dtype:
        raise ValueError(f"need src [K, n] and out [n, K] of one dtype, got {tuple(src.shape)} {src.dtype} and "
                         f"{tuple(out.shape)} {out.dtype}")
    K, n = src.shape
    m = 8 // src.element_size() if src.element_size() in (1, 2, 4) else 0
    if src.device.type != "cpu" or out.device.type != "cpu" or not m:
        out.copy_(src.t())
        return out
    Ka, na = K // m * m, n // m * m
    if Ka and na and _swar_ok(src[:Ka, :na], out[:na, :Ka], m):
        # wide tiles: each source row is read in runs as long as the chunk is wide (the source is a strided
        # column slice of a mapped file: short runs pay a TLB miss and a memory round trip every few lines)
        e = src.element_size()
        t = min(na, max(m, TILE_BYTES // (64 * e) // m * m))
        kt = max(m, min(Ka, TILE_BYTES // (e * t)) // m * m)
        for c0 in range(0, na, t):
            for k0 in range(0, Ka, kt):
                c1, k1 = min(na, c0 + t), min(Ka, k0 + kt)
                _swar_transpose(src[k0:k1, c0:c1], out[c0:c1, k0:k1], m)
    else:
        Ka = na = 0
    if na < n:
        out[na:].copy_(src[:, na:].t())
    if Ka < K:
        out[:na, Ka:].copy_(src[Ka:, :na].t())
    return out


@torch.no_grad()
def transpose_int8(q: torch.Tensor) -> torch.Tensor:
    """Contiguous ``q.t()`` of an int8 ``[K, R]`` (any strides)."""
    if q.ndim != 2:
        raise ValueError(f"need a 2-D [K, R] tensor, got shape {tuple(q.shape)}")
    return transpose_into(q, torch.empty(q.shape[1], q.shape[0], dtype=q.dtype, device=q.device))
