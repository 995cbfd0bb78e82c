"""Cache-sized tiles for the CPU transforms: the int8 weights arrive ``[in, out]`` and leave ``[out, in]``.

A transposition of a whole chunk runs at DRAM speed and dominated the CPU conversions (an fp8 chunk was
widened, transposed, scaled, reduced and divided as 48 MB float32 temporaries, each pass out of cache).
Cut into column tiles of about ``TILE_BYTES`` of float32, every temporary stays in L2 and each element
is read from memory once. Tiles never change a value: every element is computed on its own.
"""
from __future__ import annotations

import threading

import torch

__all__ = ["TILE_BYTES", "tile_columns", "tile_rows", "transpose_int8", "scratch"]

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


@torch.no_grad()
def transpose_int8(q: torch.Tensor) -> torch.Tensor:
    """Contiguous ``q.t()`` of an int8 ``[K, R]`` (any strides): through int16 tiles on the CPU, which
    transpose several times faster than int8 elements do; one copy elsewhere."""
    if q.ndim != 2:
        raise ValueError(f"need a 2-D [K, R] tensor, got shape {tuple(q.shape)}")
    K, R = q.shape
    if q.device.type != "cpu":
        return q.t().contiguous()
    out = torch.empty(R, K, dtype=q.dtype)
    t = tile_columns(K // 2)             # int16 is half the bytes of float32
    kt = max(1, min(K, tile_rows(t, 2)))
    a = scratch("transpose_int8.a", (kt, t), torch.int16)
    b = scratch("transpose_int8.b", (t, kt), torch.int16)
    for c0 in range(0, R, t):
        c1 = min(R, c0 + t)
        for k0 in range(0, K, kt):
            k1 = min(K, k0 + kt)
            x = a[:k1 - k0, :c1 - c0].copy_(q[k0:k1, c0:c1])
            out[c0:c1, k0:k1].copy_(b[:c1 - c0, :k1 - k0].copy_(x.t()))
    return out
