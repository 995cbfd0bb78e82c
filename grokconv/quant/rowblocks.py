"""The ORIGINAL Grok-1 8-bit format: ``QuantizedWeight8bit(weight=int8 [..., K, N], scales=bf16 [..., G, N])``.

Layout is canonical ``[in K, out N]``; the scale of element ``[k, n]`` is ``scales[k // (K/G), n]``
(``G = 1`` for most weights, ``G = 8`` row blocks for the row-parallel ones). Dequantization is
``bf16(int8 * scale)``, as Grok's ``model.py`` computes it (the product is exact in float32, so one
rounding).

Quantizing back (``to-jax`` from a bf16/f32 source) uses ``scale = bf16(amax / 127)`` per block
column and ``q = round(w / scale)`` clamped to [-127, 127] -- the convention of the original
quantizer, which leaves ``max |q| == 127`` in every column block. For a source that is the
dequantization of such an original tensor this recovers the original exactly:

* float32 source ``q * s`` (exact): ``amax = 127 s`` exactly, so ``amax / 127 = s`` and ``q`` follow.
* bf16 source ``bf16(q * s)``: ``amax = bf16(127 s)`` pins ``s`` only to within one bf16 step, so the
  three candidates ``bf16(amax / 127)`` and its two neighbours are tried, and the first whose
  re-dequantization reproduces every value of the block column is kept (``round(w / s)`` is then
  the original ``q``: bf16 rounding moves ``q * s`` by at most ``127/256 * s`` < ``s / 2``).
  Exact recovery of ``(q, s)`` is impossible when two candidates both reproduce the column (rare:
  ``bf16(127 s)`` collides for only one pair of adjacent scales per binade, ``1.4921875 * 2**e`` and
  ``1.5 * 2**e``, and only a column of just 0 and +-127 then fits both); the smaller scale is
  returned, which differs from the original but dequantizes to the identical bf16 tensor, which is
  what a round trip needs. Columns whose scale needed a neighbour are re-checked only themselves.
* Not recoverable at all: columns whose ``max |q| < 127`` or that hold -128, and all-zero columns
  (scale 1.0 is written, the original scale is lost; the dequantization is still zero).

For any other source this is plain absmax quantization with bf16 scales: error <= scale / 2 plus the
bf16 rounding of the dequantization.
"""
from __future__ import annotations

import torch

from ._blocks import F32_TINY, ZERO_SCALE
from .tiles import scratch, tile_columns, tile_rows

__all__ = ["quantize_rowblocks", "dequantize_rowblocks", "ROWBLOCK_QMAX"]

ROWBLOCK_QMAX = 127
_CHUNK = 1 << 22  # elements per column chunk


def _split(shape, groups: int) -> tuple:
    if len(shape) < 2:
        raise ValueError(f"need [..., K, N], got shape {tuple(shape)}")
    *lead, K, N = shape
    if groups <= 0 or K % groups:
        raise ValueError(f"input dim K={K} is not divisible into {groups} scale blocks")
    n = 1
    for d in lead:
        n *= d
    return tuple(lead), n, K, N


def _bf16_step(s: torch.Tensor, step: int) -> torch.Tensor:
    """The bf16 value ``step`` representable steps from positive bf16-valued float32 ``s``."""
    bits = s.to(torch.bfloat16).view(torch.int16).to(torch.int32) + step
    bits = bits.clamp(0x0080, 0x7F7F).to(torch.int16)  # stay normal and finite
    return bits.view(torch.bfloat16).to(torch.float32)


def _reproduces(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[G, c]: whether ``q = round(x / s)`` dequantizes back to ``x`` (bf16 or exact float32 product)."""
    q = torch.round(x / s[:, None, :]).clamp_(-ROWBLOCK_QMAX, ROWBLOCK_QMAX)
    p = q.mul_(s[:, None, :])
    return ((p == x) | (p.to(torch.bfloat16).to(torch.float32) == x)).all(dim=1)


def _chunk(x: torch.Tensor) -> tuple:
    """x: float32 ``[G, K/G, c]`` -> (int8 ``[G, K/G, c]``, float32 bf16-valued scales ``[G, c]``)."""
    amax = x.abs().amax(dim=1)
    s0 = (amax / ROWBLOCK_QMAX).to(torch.bfloat16).to(torch.float32)
    s0 = torch.where(s0 < F32_TINY, F32_TINY, s0)
    s0 = torch.where(amax == 0, ZERO_SCALE, s0)
    s, settled = s0.clone(), _reproduces(x, s0)
    for step in (-1, 1):  # only the columns some block of which is not settled yet
        cols = (~settled).any(dim=0).nonzero().squeeze(1)
        if cols.numel() == 0:
            break
        cand = _bf16_step(s0[:, cols], step)
        ok = _reproduces(x[:, :, cols], cand) & ~settled[:, cols]
        s[:, cols] = torch.where(ok, cand, s[:, cols])
        settled[:, cols] |= ok
    q = torch.round(x / s[:, None, :]).clamp_(-ROWBLOCK_QMAX, ROWBLOCK_QMAX).to(torch.int8)
    return q, s


@torch.no_grad()
def quantize_rowblocks(w_in_out: torch.Tensor, groups: int) -> tuple:
    """Original Grok-1 int8: ``(int8 [..., K, N], bf16 scales [..., G, N])`` from float ``[..., K, N]``.

    See the module docstring for when the original int8 and scales are recovered exactly. Works on
    column chunks, so temporaries stay small whatever the tensor size.
    """
    if not w_in_out.is_floating_point():
        raise TypeError(f"need a float tensor, got {w_in_out.dtype}")
    lead, L, K, N = _split(w_in_out.shape, groups)
    w = w_in_out.reshape(L, groups, K // groups, N)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(L, groups, N, dtype=torch.bfloat16, device=w.device)
    step = max(1, _CHUNK // max(K, 1))
    for i in range(L):
        for c0 in range(0, N, step):
            qc, sc = _chunk(w[i, :, :, c0:c0 + step].to(torch.float32))
            q[i, :, :, c0:c0 + step] = qc
            scales[i, :, c0:c0 + step] = sc.to(torch.bfloat16)
    return q.reshape(*lead, K, N), scales.reshape(*lead, groups, N)


@torch.no_grad()
def dequantize_rowblocks(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                         transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q * scales`` broadcast over row blocks: THE dequantization of the original int8 (every caller's).

    The product of an int8 and a bf16 is exact in float32, so ``dtype=torch.float32`` is the exact value
    and ``torch.bfloat16`` is ``bf16(int8 * scale)`` rounded once, as Grok's ``model.py`` computes it.
    ``transpose=True`` (2-D ``q [K, R]`` only) returns the contiguous ``[R, K]`` instead: the ``[out, in]``
    rows a writer needs. On the CPU the work runs in column tiles whose float32 temporaries stay in the
    cache (``tiles``); the result is the same bytes whatever the tiling, as every element is computed alone.
    ``out``: a contiguous tensor of the result's shape and ``dtype`` to write into (else a new one).
    """
    if q.dtype != torch.int8:
        raise TypeError(f"q must be torch.int8, got {q.dtype}")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    groups = scales.shape[-2] if scales.ndim >= 2 else 0
    lead, L, K, N = _split(q.shape, groups)
    if tuple(scales.shape) != (*lead, groups, N):
        raise ValueError(f"scales shape {tuple(scales.shape)} does not fit weight {tuple(q.shape)}")
    if transpose and lead:
        raise ValueError(f"transpose needs a 2-D [K, N] weight, got shape {tuple(q.shape)}")
    w = q.reshape(L, K, N)
    s = scales.reshape(L, groups, N)
    shape = (N, K) if transpose else (*lead, K, N)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=q.device)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}")
    result = out
    out = out if transpose else out.view(L, K, N)
    if q.device.type != "cpu":             # one pass on an accelerator: no cache to fit
        x = w.to(torch.float32).view(L, groups, K // groups, N).mul_(s.to(torch.float32).view(L, groups, 1, N))
        x = x.view(L, K, N)
        out.copy_(x[0].t() if transpose else x)
        return result
    t = tile_columns(K)
    blk = K // groups
    kt = max(1, min(blk, tile_rows(t)))  # tall weights are cut along K too (never across a row block)
    tmp = scratch("dequantize_rowblocks.x", (kt, t), torch.float32)
    tt = scratch("dequantize_rowblocks.t", (t, kt), torch.float32) if transpose and dtype != torch.float32 else None
    for i in range(L):
        for c0 in range(0, N, t):
            c1 = min(N, c0 + t)
            for g in range(groups):
                sg = s[i, g, c0:c1].to(torch.float32)
                for k0 in range(g * blk, (g + 1) * blk, kt):
                    k1 = min((g + 1) * blk, k0 + kt)
                    x = tmp[:k1 - k0, :c1 - c0].copy_(w[i, k0:k1, c0:c1]).mul_(sg)
                    if not transpose:
                        out[i, k0:k1, c0:c1].copy_(x)
                    elif tt is None:
                        out[c0:c1, k0:k1].copy_(x.t())
                    else:                  # transpose in float32 (fast), then round contiguous runs
                        out[c0:c1, k0:k1].copy_(tt[:c1 - c0, :k1 - k0].copy_(x.t()))
    return result
