"""Block geometry shared by every scheme: amax per block, scales from amax, scales applied per block.

Every strategy is a block shape ``(b0, b1)`` over a 2-D ``[out, in]`` weight: tensor = the whole
matrix, channel = ``(1, in)``, group = ``(1, group_size)``, block = ``(b0, b1)``. Edge blocks hold only
the real elements (zero padding, which leaves an amax unchanged). All math is float32 on the input's
device; large inputs are reduced in row chunks so no full-size temporary beyond one float32 copy exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tiles import scratch

__all__ = ["cdiv", "check_2d", "block_amax", "scales_from_amax", "local_scale", "apply_blockwise",
           "amax_per_scale", "quantize_blockwise", "dequantize_blockwise", "e4m3_to_float32", "F32_TINY",
           "ZERO_SCALE"]

F32_TINY = torch.finfo(torch.float32).tiny   # 2**-126, smallest normal float32 (and bfloat16)
ZERO_SCALE = 1.0                             # the scale given to an all-zero tensor/row/group/block
_CHUNK = 1 << 24                             # elements per temporary in the reductions
_SCALE_DTYPES = (torch.float32, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_2d(t: torch.Tensor, what: str, dtype: torch.dtype | None = None) -> None:
    """``t`` is 2-D ``[out, in]`` and of ``dtype`` (any float dtype when None)."""
    if t.ndim != 2:
        raise ValueError(f"{what} must be 2-D [out, in], got shape {tuple(t.shape)}")
    if (t.dtype != dtype) if dtype is not None else not t.is_floating_point():
        raise TypeError(f"{what} must be {dtype or 'a float tensor'}, got {t.dtype}")


def block_amax(w: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """float32 ``max |w|`` of each ``b0 x b1`` block: shape ``(cdiv(out, b0), cdiv(in, b1))``.

    Reduced in the input dtype (exact: abs and max never round) over row chunks, then cast.
    """
    rows, cols = w.shape
    nb1 = cdiv(cols, b1)
    pad_c = nb1 * b1 - cols
    if b0 == 1 and b1 >= cols:  # per row (channel): max and -min, no |x| temporary (exact; NaN propagates;
        # several times faster on the CPU than vector_norm(inf))
        if cols == 0:
            return torch.zeros(rows, 1, dtype=torch.float32, device=w.device)
        hi, lo = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
        return torch.maximum(hi, lo.neg_()).float().abs_()
    if b0 >= rows:  # one block row (tensor strategy): fold row chunks with a running max
        out = torch.zeros(1, nb1, dtype=torch.float32, device=w.device)
        step = max(1, _CHUNK // max(cols, 1))
        for r0 in range(0, rows, step):
            a = F.pad(w[r0:r0 + step].abs(), (0, pad_c)).reshape(-1, nb1, b1).amax(dim=(0, 2))
            torch.maximum(out[0], a.float(), out=out[0])
        return out
    out = torch.empty(cdiv(rows, b0), nb1, dtype=torch.float32, device=w.device)
    step = max(1, _CHUNK // (b0 * max(cols, 1))) * b0
    for r0 in range(0, rows, step):
        c = w[r0:r0 + step]
        pad_r = cdiv(c.shape[0], b0) * b0 - c.shape[0]
        a = c.abs()
        if pad_c or pad_r:  # zero padding leaves every amax unchanged
            a = F.pad(a, (0, pad_c, 0, pad_r))
        a = a.reshape(-1, b0, nb1, b1).amax(dim=(1, 3))
        out[r0 // b0:r0 // b0 + a.shape[0]] = a.float()
    return out


def scales_from_amax(amax: torch.Tensor, qmax: float, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequant scales ``amax / qmax`` as float32, holding values exactly representable in ``scale_dtype``.

    Rounding to ``scale_dtype`` (round-to-nearest-even) happens before the guards, so the value the
    caller stores is the value it quantized with. Guards, so that ``w / scale`` is always finite:
    ``amax == 0`` gives ``ZERO_SCALE`` (1.0, as transformers' and DeepSeek's fp8 tooling do; compressed-
    tensors uses the dtype's eps instead; either dequantizes to exact zeros), and a scale that would
    fall below the smallest normal float (``amax < qmax * 2**-126``) is raised to it.
    """
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {scale_dtype}")
    s = amax.to(torch.float32) / qmax
    if scale_dtype != torch.float32:
        s = s.to(scale_dtype).to(torch.float32)
    s = torch.where(s < F32_TINY, F32_TINY, s)
    return torch.where(amax == 0, ZERO_SCALE, s)


def local_scale(scale: torch.Tensor, rows: int, cols: int, b0: int | None, b1: int, row_offset: int,
                device: torch.device) -> torch.Tensor:
    """The float32 ``(cdiv(rows, b0), cdiv(cols, b1))`` scales of rows ``[row_offset, row_offset+rows)``.

    ``scale`` covers the whole tensor (or exactly this chunk, with ``row_offset=0``). ``b0=None``
    is the tensor strategy: one scale, ``row_offset`` ignored. Non-positive or non-finite scales are
    refused, since they would give NaN/Inf.
    """
    s = scale.to(device=device, dtype=torch.float32)
    if b0 is None:
        if s.numel() != 1:
            raise ValueError(f"tensor scale must hold one value, got shape {tuple(scale.shape)}")
        s = s.reshape(1, 1)
    else:
        nb1 = cdiv(cols, b1)
        if s.ndim == 1 and nb1 == 1:
            s = s.reshape(-1, 1)
        if s.ndim != 2 or s.shape[1] != nb1:
            raise ValueError(f"scale shape {tuple(scale.shape)} does not fit {cols} columns in blocks of {b1} "
                             f"(expected [*, {nb1}])")
        if row_offset < 0 or row_offset % b0:
            raise ValueError(f"row_offset {row_offset} must be a non-negative multiple of the block rows {b0}")
        i0, n = row_offset // b0, cdiv(rows, b0)
        if i0 + n > s.shape[0]:
            raise ValueError(f"rows [{row_offset}, {row_offset + rows}) need scale rows [{i0}, {i0 + n}), "
                             f"scale has {s.shape[0]}")
        s = s[i0:i0 + n]
    if not bool(torch.all(torch.isfinite(s) & (s > 0))):
        raise ValueError("scales must be finite and > 0")
    return s


def apply_blockwise(w: torch.Tensor, s: torch.Tensor, b0: int, b1: int, op: str,
                    buf: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``w / s`` (``op="div"``) or ``w * s`` (``"mul"``), ``s`` broadcast over its blocks.

    Works on one zero-padded float32 copy of ``w`` (no full-size scale tensor is built); returns a
    view of it with ``w``'s shape (non-contiguous when padding was needed). ``buf``: a float32 work
    buffer of at least the padded size to use instead of a new one (the result is then a view of it).
    """
    rows, cols = w.shape
    nb0, nb1 = s.shape
    R, C = nb0 * b0, nb1 * b1
    if (R, C) == (rows, cols) and w.dtype == torch.float32:   # no padding: one pass, no copy first
        f = torch.div if op == "div" else torch.mul
        out = torch.empty(R, C, dtype=torch.float32, device=w.device) if buf is None else buf[:R * C].view(R, C)
        f(w.reshape(nb0, b0, nb1, b1), s[:, None, :, None], out=out.view(nb0, b0, nb1, b1))
        return out
    if buf is None:
        buf = (torch.zeros if (R, C) != (rows, cols) else torch.empty)(R, C, dtype=torch.float32, device=w.device)
    else:
        buf = buf[:R * C].view(R, C)
        if (R, C) != (rows, cols):
            buf.zero_()
    buf[:rows, :cols].copy_(w)
    view = buf.view(nb0, b0, nb1, b1)
    if op == "div":
        view.div_(s[:, None, :, None])
    else:
        view.mul_(s[:, None, :, None])
    return buf[:rows, :cols]


# -- what every scheme runs; ``b0=None`` is the tensor strategy (one scale for any row chunk) ---------
def amax_per_scale(w: torch.Tensor, b0: int | None, b1: int) -> torch.Tensor:
    """float32 ``max |w|`` per scale, in the scale's shape (``(1,)`` for the tensor strategy)."""
    check_2d(w, "w")
    a = block_amax(w, w.shape[0] if b0 is None else b0, b1)
    return a.reshape(1) if b0 is None else a


def quantize_blockwise(w: torch.Tensor, scale: torch.Tensor, b0: int | None, b1: int, row_offset: int,
                       qmin: float, qmax: float, out_dtype: torch.dtype, rounding: bool,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``out_dtype`` of ``clamp(w / scale, qmin, qmax)`` (float32 division), rounded half-to-even first
    when ``rounding`` (integers), else by the cast (fp8 casts round to nearest even)."""
    check_2d(w, "w")
    rows, cols = w.shape
    s = local_scale(scale, rows, cols, b0, b1, row_offset, w.device)
    bb0 = rows if b0 is None else b0
    buf = None
    if w.device.type == "cpu":     # the float32 quotient lives only here: a reused per-thread buffer
        buf = scratch("quantize_blockwise", (cdiv(rows, bb0) * bb0 * cdiv(cols, b1) * b1,), torch.float32)
    x = apply_blockwise(w, s, bb0, b1, "div", buf).clamp_(qmin, qmax)
    if rounding:
        x.round_()
    if out is None:
        out = torch.empty(rows, cols, dtype=out_dtype, device=w.device)
    elif tuple(out.shape) != (rows, cols) or out.dtype != out_dtype:
        raise ValueError(f"out must be {out_dtype} of shape {(rows, cols)}, got {out.dtype} {tuple(out.shape)}")
    return out.copy_(x)


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, b0: int | None, b1: int, row_offset: int,
                         q_dtype: torch.dtype) -> torch.Tensor:
    """float32 ``q * scale`` (any float dtype of ``scale``; the product is computed in float32)."""
    check_2d(q, "q", q_dtype)
    rows, cols = q.shape
    s = local_scale(scale, rows, cols, b0, b1, row_offset, q.device)
    if q_dtype == torch.float8_e4m3fn:   # torch widens fp8 one element at a time on the CPU: exact bit path
        q = e4m3_to_float32(q)
    return apply_blockwise(q, s, rows if b0 is None else b0, b1, "mul").contiguous()


def e4m3_to_float32(q: torch.Tensor) -> torch.Tensor:
    """float32 values of float8_e4m3fn ``q``, exactly (NaN for the two NaN codes), through float16.

    The 7 low bits ``eeeemmm`` of an e4m3 byte, shifted left by 7 into a float16, are that float16's
    exponent ``0eeee`` and mantissa ``mmm0000000``: the e4m3 value times 2**-8, subnormals included
    (bias 15 against 7). float16 widens to float32 vectorised, and * 256 is exact. ~4x faster than
    ``q.float()`` here.
    """
    u = q.view(torch.uint8).to(torch.int16)
    mag = u & 0x7F
    h = (mag << 7) | ((u & 0x80) << 8)
    out = h.view(torch.float16).to(torch.float32).mul_(256.0)
    return out.masked_fill_(mag == 0x7F, float("nan"))
