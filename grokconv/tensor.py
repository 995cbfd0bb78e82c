"""Values that flow along reader -> mapping -> quantizer -> writer, and the reference dequantization.

A reader hands out canonical tensors (Haiku layout: ``[..., in, out]``, experts stacked first) as
either a plain float array or a :class:`QInt8` -- the original int8 values with their bf16 scales.
Arrays are read-only views on mmapped files wherever the format allows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, so reading headers (inspect, planning) starts in milliseconds

__all__ = ["QInt8", "BF16", "dequantize", "to_torch", "from_torch", "as_dense"]

BF16 = np.dtype(ml_dtypes.bfloat16)
F8E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


@dataclass(frozen=True)
class QInt8:
    """``W[..., k, n] = weight[..., k, n] * scales[..., k // (K / G), n]`` (original Grok-1 int8)."""
    weight: np.ndarray   # int8  [..., K, N]
    scales: np.ndarray   # bf16  [..., G, N]

    @property
    def shape(self) -> tuple:
        return self.weight.shape

    @property
    def groups(self) -> int:
        return self.scales.shape[-2]

    def __getitem__(self, i) -> "QInt8":
        """Select along the leading (expert) axis."""
        return QInt8(self.weight[i], self.scales[i])


def to_torch(a: np.ndarray) -> "torch.Tensor":
    """Zero-copy torch view of a numpy array (bf16 included); read-only inputs stay shared."""
    import torch
    if a.dtype == BF16:
        return to_torch(a.view(np.int16)).view(torch.bfloat16)
    if a.dtype == F8E4M3:
        return to_torch(a.view(np.uint8)).view(torch.float8_e4m3fn)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only mmap views: we never write through them
        try:
            return torch.from_numpy(a)                  # strided views too (positive strides)
        except ValueError:
            return torch.from_numpy(np.ascontiguousarray(a))


def from_torch(t: "torch.Tensor") -> np.ndarray:
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def dequantize(q: QInt8, dtype: str = "bf16", device="cpu") -> "torch.Tensor":
    """The reference dequantization, as a torch tensor on ``device``.

    ``bf16``: ``bf16(int8 * scale)`` exactly as ``model.py`` computes it (an int8 times a bf16 is exact in
    float32, so one rounding); ``f32``: the exact product. One implementation for every caller:
    :func:`grokconv.quant.rowblocks.dequantize_rowblocks`.
    """
    import torch
    from .quant.rowblocks import dequantize_rowblocks
    w = to_torch(q.weight).to(device)
    s = to_torch(q.scales).to(device)
    return dequantize_rowblocks(w, s, torch.bfloat16 if dtype == "bf16" else torch.float32)


def as_dense(value, dtype: str = "f32", device="cpu") -> "torch.Tensor":
    """Any canonical value as a float torch tensor (``bf16`` or ``f32``)."""
    import torch
    if isinstance(value, QInt8):
        return dequantize(value, dtype, device)
    t = to_torch(value).to(device) if isinstance(value, np.ndarray) else value.to(device)
    return t.to(torch.bfloat16 if dtype == "bf16" else torch.float32).contiguous()
