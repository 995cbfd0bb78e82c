"""Symmetric int8 weight quantization (compressed-tensors convention) and pack-quantized packing.

compressed-tensors convention, kept here so that our output matches llm-compressor's:

* ``scale = amax / 127.5`` (range [-128, 127] has 255 steps; half of that), float32;
* ``q = round(clamp(w / scale, -128, 127))``, float32 division, ``torch.round`` half-to-even;
* dequant ``q * scale``. An all-zero row/group gets scale 1.0 (compressed-tensors: dtype eps); a scale
  that would underflow below 2**-126 is raised to it.

Strategies: ``channel`` (scale ``(out, 1)``), ``group`` (``(out, ceil(in / group_size))``; the last
group may be short) and ``tensor`` (``(1,)``). Scales are row-local for channel/group, so row chunks
give slices of the whole tensor's scales; ``quantize_int8(..., row_offset=r0)`` indexes a whole-tensor
scale from a row slice.

The ORIGINAL Grok-1 8-bit format (scales per output column per block of input rows, amax / 127) is
in ``rowblocks``; its functions are re-exported here.
"""
from __future__ import annotations

import sys

import torch

from ._blocks import amax_per_scale, cdiv, dequantize_blockwise, quantize_blockwise, scales_from_amax
from .rowblocks import dequantize_rowblocks, quantize_rowblocks

__all__ = ["INT8_DIVISOR", "INT8_STRATEGIES", "int8_amax", "int8_scales_from_amax", "int8_scales",
           "int8_scale_shape", "quantize_int8", "dequantize_int8", "pack_int8", "unpack_int8",
           "quantize_rowblocks", "dequantize_rowblocks"]

INT8_DIVISOR = 127.5
INT8_STRATEGIES = ("channel", "group", "tensor")


def _block(strategy: str, cols: int, group_size: int) -> tuple:
    if strategy == "channel":
        return 1, cols
    if strategy == "group":
        if int(group_size) <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        return 1, int(group_size)
    if strategy == "tensor":
        return None, cols
    raise ValueError(f"unknown int8 strategy {strategy!r}; valid: {', '.join(INT8_STRATEGIES)}")


def int8_scale_shape(out_features: int, in_features: int, strategy: str, group_size: int = 128) -> tuple:
    b0, b1 = _block(strategy, in_features, group_size)
    return (1,) if b0 is None else (out_features, cdiv(in_features, b1))


@torch.no_grad()
def int8_amax(w: torch.Tensor, strategy: str, group_size: int = 128) -> torch.Tensor:
    """float32 ``max |w|`` per scale, in the scale's shape."""
    return amax_per_scale(w, *_block(strategy, w.shape[-1], group_size))


@torch.no_grad()
def int8_scales_from_amax(amax: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return scales_from_amax(amax, INT8_DIVISOR, scale_dtype)


@torch.no_grad()
def int8_scales(w: torch.Tensor, strategy: str, group_size: int = 128,
                scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 ``amax / 127.5`` per row (channel), per row and group of columns (group) or whole (tensor).

    ``scale_dtype=torch.bfloat16`` rounds them to bf16 first, so quantizing with the result matches
    the stored bf16 scales.
    """
    return int8_scales_from_amax(int8_amax(w, strategy, group_size), scale_dtype)


@torch.no_grad()
def quantize_int8(w: torch.Tensor, scale: torch.Tensor, strategy: str, group_size: int = 128,
                  row_offset: int = 0) -> torch.Tensor:
    """int8 ``round(clamp(w / scale, -128, 127))``; ``w`` may be rows ``[row_offset, ...)`` of ``scale``'s tensor."""
    return quantize_blockwise(w, scale, *_block(strategy, w.shape[-1], group_size), row_offset,
                              -128.0, 127.0, torch.int8, rounding=True)


@torch.no_grad()
def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, strategy: str, group_size: int = 128,
                    row_offset: int = 0) -> torch.Tensor:
    """float32 ``q * scale``."""
    return dequantize_blockwise(q, scale, *_block(strategy, q.shape[-1], group_size), row_offset, torch.int8)


def _swap_words(u: torch.Tensor) -> torch.Tensor:
    """Byte order inside each 4-byte word, for big-endian hosts (CUDA and little-endian CPUs: none)."""
    if u.device.type == "cpu" and sys.byteorder == "big":
        return u.reshape(*u.shape[:-1], -1, 4).flip(-1).reshape(u.shape)
    return u


@torch.no_grad()
def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors ``pack-quantized`` 8-bit: int32 ``[..., ceil(in / 4)]`` from int8 ``[..., in]``.

    Each byte is ``q + 128`` (``q ^ 0x80`` as uint8); element ``i`` of each group of 4 sits in bits
    ``[8i, 8i + 8)`` of its little-endian word. A short last word is padded with byte 0 (as
    compressed-tensors pads). Leading dims (experts) are packed per row, like compressed-tensors' 3-D case.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int8 needs torch.int8, got {q.dtype}")
    if q.ndim < 1:
        raise ValueError("pack_int8 needs at least one dimension")
    n = q.shape[-1]
    u = q.view(torch.uint8) ^ 0x80
    if n % 4:
        padded = torch.zeros(*q.shape[:-1], cdiv(n, 4) * 4, dtype=torch.uint8, device=q.device)
        padded[..., :n] = u
        u = padded
    return _swap_words(u.contiguous()).view(torch.int32)


@torch.no_grad()
def unpack_int8(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_int8``: int8 ``[..., in_features]``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int8 needs torch.int32, got {packed.dtype}")
    words = packed.shape[-1]
    if not 4 * (words - 1) < in_features <= 4 * words:
        raise ValueError(f"{words} packed words per row hold {4 * words - 3}..{4 * words} int8, "
                         f"not {in_features}")
    u = _swap_words(packed.contiguous().view(torch.uint8))
    return (u[..., :in_features] ^ 0x80).view(torch.int8)
