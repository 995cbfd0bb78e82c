"""GGML's Q8_0: blocks of 32 consecutive values along a row, each ``fp16 d`` + 32 ``int8 qs`` (34 bytes);
the value is ``qs * d``.

Two ways in:

* :func:`q8_0_from_int8` -- from the original Grok-1 int8: every run of 32 inputs of a release weight
  shares one bf16 scale (per column, and the row blocks of the row-parallel weights are multiples of
  32), so ``d = fp16(scale)`` with the original int8 as ``qs`` is a Q8_0 block whose dequantization
  ``qs * d`` equals ``int8 * scale`` exactly whenever the bf16 scale is an fp16 number (every bf16
  value in fp16's normal range, 2**-14 .. 65504, is; below it fp16's subnormals keep fewer bits).
  Blocks whose scale is not exact in fp16 are counted and their error measured.
* :func:`quantize_q8_0` -- ordinary Q8_0 of float values (``d = amax / 127``, ``qs = round(x / d)``
  half away from zero), bit for bit what ``gguf.quants.quantize`` and ggml's ``quantize_row_q8_0_ref``
  give, in torch, on cache-sized tiles of rows with the rounding done in int16 (about 2 ns a value on
  one core here; the float32 steps on whole chunks took 12).
"""
from __future__ import annotations

import torch

from .tiles import scratch

__all__ = ["QK8_0", "BLOCK_BYTES", "q8_0_from_int8", "quantize_q8_0", "dequantize_q8_0", "Q8Stats"]

QK8_0 = 32
BLOCK_BYTES = 2 + QK8_0
FP16_MAX = 65504.0


class Q8Stats:
    """Counts of lossless-path blocks, and the error of the inexact ones (against ``int8 * scale``)."""

    def __init__(self) -> None:
        self.blocks = 0
        self.inexact = 0
        self.max_abs_error = 0.0
        self.max_rel_error = 0.0     # |d - scale| / |scale| over inexact blocks
        self.min_inexact_scale = float("inf")

    def add(self, blocks: int, inexact: int, max_abs: float, max_rel: float, min_scale: float) -> None:
        self.blocks += blocks
        self.inexact += inexact
        self.max_abs_error = max(self.max_abs_error, max_abs)
        self.max_rel_error = max(self.max_rel_error, max_rel)
        self.min_inexact_scale = min(self.min_inexact_scale, min_scale)

    def merge(self, other: "Q8Stats") -> None:
        self.add(other.blocks, other.inexact, other.max_abs_error, other.max_rel_error, other.min_inexact_scale)

    def to_dict(self) -> dict:
        out = {"q8_0_blocks": self.blocks, "q8_0_exact_blocks": self.blocks - self.inexact,
               "q8_0_inexact_blocks": self.inexact}
        if self.inexact:
            out.update(inexact_max_abs_error=self.max_abs_error, inexact_max_rel_error=self.max_rel_error,
                       inexact_min_scale=self.min_inexact_scale)
        return out


def _pack(d16: torch.Tensor, qs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 ``[R, nb]`` and int8 ``[R, nb*32]`` -> uint8 ``[R, nb*34]`` (d little-endian, then qs), into
    ``out`` when given."""
    R, nb = d16.shape
    if out is None:
        out = torch.empty(R, nb * BLOCK_BYTES, dtype=torch.uint8, device=d16.device)
    o3 = out.view(R, nb, BLOCK_BYTES)
    o3[:, :, :2].view(torch.float16).copy_(d16.view(R, nb, 1))
    o3[:, :, 2:].view(torch.int8).copy_(qs.view(R, nb, QK8_0))
    return out


def _out(R: int, K: int, out: torch.Tensor | None, device) -> torch.Tensor:
    shape = (R, K // QK8_0 * BLOCK_BYTES)
    if out is None:
        return torch.empty(shape, dtype=torch.uint8, device=device)
    if tuple(out.shape) != shape or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous uint8 {shape}, got {out.dtype} {tuple(out.shape)}")
    return out


@torch.no_grad()
def q8_0_from_int8(q: torch.Tensor, scales: torch.Tensor, stats: Q8Stats | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Q8_0 rows from the original int8 rows ``q [R, K]`` and their scales ``[R, G]`` (row ``r``, inputs
    of block ``g`` of ``K / G``, scaled by ``scales[r, g]``); ``K / G`` must be a multiple of 32.

    ``d = fp16(scale)`` (clamped to +-65504, which no Grok-1 scale comes near), ``qs = q``.
    """
    R, K = q.shape
    G = scales.shape[1]
    if K % G or (K // G) % QK8_0:
        raise ValueError(f"scale blocks of {K}/{G} inputs are not whole Q8_0 blocks of {QK8_0}")
    s = scales.float().repeat_interleave((K // G) // QK8_0, dim=1)            # [R, nb] exact
    d16 = s.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    if stats is not None:
        diff = (d16.float() - s).abs()
        bad = diff != 0
        n_bad = int(bad.sum())
        max_abs = max_rel = 0.0
        min_scale = float("inf")
        if n_bad:
            qmax = q.view(R, -1, QK8_0).to(torch.int16).abs().amax(dim=2).float()
            max_abs = float((diff * qmax)[bad].max())
            max_rel = float((diff / s.abs())[bad].max())
            min_scale = float(s.abs()[bad].min())
        stats.add(s.numel(), n_bad, max_abs, max_rel, min_scale)
    return _pack(d16, q, _out(R, K, out, q.device))


def _roundf_(v: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as gguf-py's ``np_roundf`` (``floor(a) + floor(2 (a - floor(a)))`` with
    its sign: the same exact float32 operations), in place on a temporary where possible."""
    a = v.abs()
    fl = torch.floor(a)
    return a.sub_(fl).mul_(2).floor_().add_(fl).copysign_(v)


@torch.no_grad()
def quantize_q8_0(x: torch.Tensor, out: torch.Tensor | None = None, acc=None) -> torch.Tensor:
    """Ordinary Q8_0 of float rows ``[R, K]`` (any float dtype and strides, ``K`` a multiple of 32) ->
    uint8 ``[R, K/32*34]`` (into ``out`` when given). ``acc``: an ``ErrorAccumulator`` fed every element's
    error against ``x`` in float32.

    On the CPU the rows go through in tiles of about ``_TILE`` elements kept in per-thread buffers
    (``tiles.scratch``), and the rounding is done in int16: ``k = trunc(2 y)`` is exact, and
    ``(k + 1 + (k >> 15)) >> 1`` is ``y`` rounded half away from zero (``ceil(k / 2)`` for ``k >= 0``,
    ``floor(k / 2)`` below), the value gguf-py's ``np_roundf`` gives. ``y * 2`` is taken as
    ``x * (2 / d)``: doubling is exact, and values too small for that to matter give ``k = 0`` either way.
    A tile with a non-finite ``d`` or ``1 / d`` (inf or NaN in its input, or ``max |x| < 4e-37``) takes
    gguf-py's float32 steps instead.
    """
    R, K = x.shape
    if K % QK8_0:
        raise ValueError(f"row length {K} is not a multiple of {QK8_0}")
    out = _out(R, K, out, x.device)
    if x.device.type != "cpu":
        return _quantize_ref(x.float(), out, acc)
    nb = K // QK8_0
    o3 = out.view(R, nb, BLOCK_BYTES)
    step = max(1, _TILE // max(K, 1))
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        n = r1 - r0
        xf = scratch("q8_0.x", (n, K), torch.float32)
        xf.copy_(x[r0:r1])
        b = xf.view(n, nb, QK8_0)
        a = scratch("q8_0.a", (n, nb, QK8_0), torch.float32)
        d = torch.abs(b, out=a).amax(dim=2, keepdim=True).div_(127)           # max |x| / 127 per block
        inv2 = torch.where(d == 0, torch.zeros_like(d), 1 / d).mul_(2)
        if not bool((torch.isfinite(d) & torch.isfinite(inv2)).all()):   # inf or NaN in, or 1 / d overflows
            _quantize_ref(xf, out[r0:r1], acc)
            continue
        k = scratch("q8_0.k", (n, nb, QK8_0), torch.int16)
        k.copy_(torch.mul(b, inv2, out=a))                                       # trunc(2 y)
        qs = scratch("q8_0.q", (n, nb, QK8_0), torch.int16)
        torch.bitwise_right_shift(k, 15, out=qs).add_(k).add_(1).bitwise_right_shift_(1)
        o3[r0:r1, :, 2:].view(torch.int8).copy_(qs)
        d16 = d.to(torch.float16)
        o3[r0:r1, :, :2].view(torch.float16).copy_(d16)
        if acc is not None:     # qs * d in float32, as dequantize_q8_0 computes it
            acc.update(b, torch.mul(a.copy_(qs), d16.float(), out=a))
    return out


_TILE = 1 << 18     # elements per tile: larger tiles pay less per-op overhead, smaller ones miss L2


def _quantize_ref(x: torch.Tensor, out: torch.Tensor, acc=None) -> torch.Tensor:
    """gguf-py's float32 steps on float32 rows (``d = amax / 127``, ``qs = np_roundf(x / d)``): the device
    path, and CPU tiles holding inf or NaN."""
    R, K = x.shape
    b = x.reshape(R, K // QK8_0, QK8_0)
    lo, hi = torch.aminmax(b, dim=2, keepdim=True)
    d = torch.maximum(hi, -lo).abs_() / 127             # max |x| (+0 for a zero block), no |x| copy
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = _roundf_(b * inv).to(torch.int8)
    _pack(d.squeeze(2).to(torch.float16), qs.reshape(R, K), out)
    if acc is not None:
        acc.update(x, dequantize_q8_0(out, K))
    return out


@torch.no_grad()
def dequantize_q8_0(blocks: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 ``[R, K/32*34]`` -> float32 ``[R, K]`` (``qs * d``, exact in float32)."""
    R = blocks.shape[0]
    b = blocks.reshape(R, K // QK8_0, BLOCK_BYTES)
    d = b[:, :, :2].contiguous().view(torch.float16).float()               # [R, nb, 1]
    qs = b[:, :, 2:].contiguous().view(torch.int8).float()
    return (qs * d).reshape(R, K)
