"""FP8 e4m3fn weight quantization: per-tensor, per-channel (output row) and 128x128-block scales.

Conventions (compressed-tensors ``float-quantized``, DeepSeek-V3 ``weight_scale_inv``, AutoFP8 and
transformers' FineGrainedFP8 all agree on them):

* dequant scale ``s = amax / 448`` in float32; ``w ~= q * s``;
* ``q = fp8(clamp(w / s, -448, 448))``, ``w / s`` computed in float32 and the cast rounding to nearest
  even. The clamp comes before every cast: torch <= 2.11 and ml_dtypes turn |x| > 464 into NaN;
* edge blocks (shapes not divisible by the block) use only their real elements, which is what
  DeepSeek's zero padding computes too;
* an all-zero tensor/row/block gets scale 1.0; a scale that would underflow below 2**-126 is raised
  to 2**-126 (see ``_blocks.scales_from_amax``), so finite input never gives NaN or Inf.

Chunking: scales of ``channel``/``block`` are row-local, so ``fp8_scales(w[r0:r1])`` is the slice
``[r0:r1]`` (``[r0//b0 : ...]`` for blocks, ``r0`` a multiple of ``b0``) of the whole tensor's scales.
For ``tensor``, reduce ``fp8_amax`` of the chunks with ``max`` and call ``fp8_scales_from_amax``.
``quantize_fp8(w[r0:r1], whole_scale, scheme, row_offset=r0)`` equals ``quantize_fp8(w, ...)[r0:r1]``.
"""
from __future__ import annotations

import torch

from ._blocks import amax_per_scale, dequantize_blockwise, quantize_blockwise, scales_from_amax

__all__ = ["FP8_MAX", "FP8_DTYPE", "FP8_STRATEGIES", "fp8_amax", "fp8_scales_from_amax", "fp8_scales",
           "fp8_scale_shape", "quantize_fp8", "dequantize_fp8"]

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_STRATEGIES = ("tensor", "channel", "block")


def _block(scheme: str, cols: int, block) -> tuple:
    """``(b0, b1)`` of a strategy; ``b0=None`` for tensor (one scale whatever the row chunk)."""
    if scheme == "tensor":
        return None, cols
    if scheme == "channel":
        return 1, cols
    if scheme == "block":
        b0, b1 = (int(b) for b in block)
        if b0 <= 0 or b1 <= 0:
            raise ValueError(f"block must be two positive sizes, got {tuple(block)}")
        return b0, b1
    raise ValueError(f"unknown fp8 scheme {scheme!r}; valid: {', '.join(FP8_STRATEGIES)}")


def fp8_scale_shape(out_features: int, in_features: int, scheme: str, block=(128, 128)) -> tuple:
    """Shape of the scales: ``(1,)``, ``(out, 1)`` or ``(ceil(out/b0), ceil(in/b1))``."""
    b0, b1 = _block(scheme, in_features, block)
    if b0 is None:
        return (1,)
    return (-(-out_features // b0), -(-in_features // b1))


@torch.no_grad()
def fp8_amax(w: torch.Tensor, scheme: str, block=(128, 128)) -> torch.Tensor:
    """float32 ``max |w|`` per scale, in the scale's shape."""
    return amax_per_scale(w, *_block(scheme, w.shape[-1], block))


@torch.no_grad()
def fp8_scales_from_amax(amax: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``amax / 448`` with the zero/underflow guards; float32 values representable in ``scale_dtype``."""
    return scales_from_amax(amax, FP8_MAX, scale_dtype)


@torch.no_grad()
def fp8_scales(w: torch.Tensor, scheme: str, block=(128, 128),
               scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 dequant scales ``amax / 448`` of shape ``(1,)``, ``(out, 1)`` or ``(ceil(out/b0), ceil(in/b1))``.

    ``scale_dtype=torch.bfloat16`` rounds them to bf16 first (compressed-tensors stores scales in the
    weight dtype): quantize with the returned values and the stored scales are the ones used.
    """
    return fp8_scales_from_amax(fp8_amax(w, scheme, block), scale_dtype)


@torch.no_grad()
def quantize_fp8(w: torch.Tensor, scale: torch.Tensor, scheme: str, block=(128, 128),
                 row_offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``float8_e4m3fn`` of ``clamp(w / scale, -448, 448)`` (float32 division, round-to-nearest-even cast).

    ``w`` may be a row slice ``W[row_offset:row_offset+rows]`` of the tensor that ``scale`` describes.
    ``out``: a float8_e4m3fn tensor of ``w``'s shape to write into (a row slice of a larger result).
    """
    return quantize_blockwise(w, scale, *_block(scheme, w.shape[-1], block), row_offset,
                              -FP8_MAX, FP8_MAX, FP8_DTYPE, rounding=False, out=out)


@torch.no_grad()
def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, scheme: str, block=(128, 128),
                   row_offset: int = 0) -> torch.Tensor:
    """float32 ``q * scale`` (``scale`` of any float dtype; the product is computed in float32)."""
    return dequantize_blockwise(q, scale, *_block(scheme, q.shape[-1], block), row_offset, FP8_DTYPE)
