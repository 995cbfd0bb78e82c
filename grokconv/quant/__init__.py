"""Quantization numerics: pure tensor math, no file I/O, any device (the input's).

Schemes are data: ``SCHEMES`` maps a preset name to a frozen ``QuantScheme`` that knows its scale shape,
its safetensors dtypes, its compressed-tensors config, and which block math (``fp8`` or ``int8``) runs it.
The original Grok-1 8-bit format is ``quantize_rowblocks`` / ``dequantize_rowblocks``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import GrokconvError
from .fp8 import (FP8_DTYPE, FP8_MAX, dequantize_fp8, fp8_amax, fp8_scale_shape, fp8_scales,
                  fp8_scales_from_amax, quantize_fp8)
from .int8 import (dequantize_int8, int8_amax, int8_scale_shape, int8_scales, int8_scales_from_amax,
                   pack_int8, quantize_int8, unpack_int8)
from .metrics import ErrorAccumulator, error_stats
from .rowblocks import dequantize_rowblocks, quantize_rowblocks

__all__ = ["QuantScheme", "SCHEMES", "get_scheme", "UnknownSchemeError",
           "FP8_MAX", "FP8_DTYPE", "fp8_amax", "fp8_scales_from_amax", "fp8_scales", "fp8_scale_shape",
           "quantize_fp8", "dequantize_fp8",
           "int8_amax", "int8_scales_from_amax", "int8_scales", "int8_scale_shape", "quantize_int8",
           "dequantize_int8", "pack_int8", "unpack_int8", "quantize_rowblocks", "dequantize_rowblocks",
           "ErrorAccumulator", "error_stats"]

_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}


class UnknownSchemeError(GrokconvError, ValueError, KeyError):
    """A scheme name that is not in ``SCHEMES``; the message lists the valid ones."""

    __str__ = Exception.__str__  # not KeyError's repr-quoting


@dataclass(frozen=True)
class QuantScheme:
    """One preset. ``strategy`` and its block/group size select the block math of ``family``."""
    name: str
    family: str                        # "fp8" (float8_e4m3fn) or "int8"
    strategy: str                      # tensor | channel | block | group
    ct_format: str                     # compressed-tensors format string
    block: tuple | None = None         # block_structure, for strategy "block"
    group_size: int | None = None      # for strategy "group"
    scale_dtype: str = "BF16"          # safetensors dtype of weight_scale (compressed-tensors: weight dtype)
    act_strategy: str | None = None    # dynamic activation quantization, None = weight-only
    act_group_size: int | None = None

    # -- what the writer needs ------------------------------------------------------------------
    def scale_shape(self, out_features: int, in_features: int) -> tuple:
        if self.family == "fp8":
            return fp8_scale_shape(out_features, in_features, self.strategy, self.block)
        return int8_scale_shape(out_features, in_features, self.strategy, self.group_size or 0)

    @property
    def dtypes(self) -> dict:
        """safetensors dtype string of each tensor a quantized ``X.weight`` becomes (``X.<key>``)."""
        if self.family == "fp8":
            return {"weight": "F8_E4M3", "weight_scale": self.scale_dtype}
        return {"weight_packed": "I32", "weight_scale": self.scale_dtype, "weight_shape": "I64"}

    def weights_args(self) -> dict:
        """compressed-tensors ``weights`` args, portable keys only (accepted by compressed-tensors >= 0.11)."""
        args = {"num_bits": 8, "type": "float" if self.family == "fp8" else "int", "symmetric": True,
                "group_size": self.group_size, "strategy": self.strategy, "dynamic": False}
        if self.block is not None:
            args["block_structure"] = list(self.block)
        return args

    def input_activations_args(self) -> dict | None:
        """compressed-tensors ``input_activations`` args: dynamic fp8 (no calibration), or None."""
        if self.act_strategy is None:
            return None
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": self.act_group_size,
                "strategy": self.act_strategy, "dynamic": True}

    # -- the math -------------------------------------------------------------------------------
    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.scale_dtype]

    def amax(self, w: torch.Tensor) -> torch.Tensor:
        """Per-scale ``max |w|``; for ``tensor`` reduce chunk results with ``torch.maximum``."""
        if self.family == "fp8":
            return fp8_amax(w, self.strategy, self.block)
        return int8_amax(w, self.strategy, self.group_size or 0)

    def scales_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        f = fp8_scales_from_amax if self.family == "fp8" else int8_scales_from_amax
        return f(amax, self.scale_torch_dtype)

    def scales(self, w: torch.Tensor) -> torch.Tensor:
        """float32 scales, rounded to ``scale_dtype`` (so quantizing with them matches what is stored)."""
        return self.scales_from_amax(self.amax(w))

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        """float8_e4m3fn or int8 ``[out, in]`` (pack int8 with ``pack_int8`` for ``weight_packed``)."""
        if self.family == "fp8":
            return quantize_fp8(w, scale, self.strategy, self.block, row_offset)
        return quantize_int8(w, scale, self.strategy, self.group_size or 0, row_offset)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        if self.family == "fp8":
            return dequantize_fp8(q, scale, self.strategy, self.block, row_offset)
        return dequantize_int8(q, scale, self.strategy, self.group_size or 0, row_offset)


# The presets, as data. fp8 ones take dynamic activations (FP8_DYNAMIC / FP8_BLOCK of compressed-
# tensors; static per-tensor activations would need calibration); int8 ones are weight-only W8A16,
# which vLLM accepts only as pack-quantized.
_PRESETS = (
    QuantScheme("fp8-tensor", "fp8", "tensor", "float-quantized", act_strategy="token"),
    QuantScheme("fp8-channel", "fp8", "channel", "float-quantized", act_strategy="token"),
    QuantScheme("fp8-block", "fp8", "block", "float-quantized", block=(128, 128),
                act_strategy="group", act_group_size=128),
    QuantScheme("int8-channel", "int8", "channel", "pack-quantized"),
    QuantScheme("int8-group", "int8", "group", "pack-quantized", group_size=128),
)


class _SchemeRegistry(Mapping):
    """Read-only name -> QuantScheme; an unknown name raises ``UnknownSchemeError`` (a ValueError)."""

    def __init__(self, schemes) -> None:
        self._by_name = {s.name: s for s in schemes}

    def __getitem__(self, name: str) -> QuantScheme:
        try:
            return self._by_name[name]
        except KeyError:
            valid = ", ".join(self._by_name)
            raise UnknownSchemeError(f"unknown quantization scheme {name!r}; valid: {valid}",
                                     hint=f"pick one of: {valid}") from None

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


SCHEMES = _SchemeRegistry(_PRESETS)


def get_scheme(name: str) -> QuantScheme:
    return SCHEMES[name]
