"""The reader interface every format implements, and format detection."""
from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if TYPE_CHECKING:
    import torch

from ..config import GrokConfig
from ..errors import CheckpointFormatError, MissingTensorError
from ..schema import ParamSpec, param_specs
from ..tensor import QInt8, as_dense

__all__ = ["StoredTensor", "CheckpointReader", "register_format", "open_checkpoint", "FORMATS"]


@dataclass
class StoredTensor:
    """One tensor as stored on disk (what ``inspect`` lists)."""
    name: str
    shape: tuple
    dtype: str
    nbytes: int
    file: str
    quant: dict = field(default_factory=dict)   # e.g. {"scheme": "int8", "scale_shape": [...], "blocks": 8}


class CheckpointReader:
    """A checkpoint seen as canonical Grok-1 parameters.

    ``load(name)`` returns the canonical value: a float array or a :class:`QInt8`, in Haiku layout
    ``[..., in, out]``; ``index`` selects one expert without touching the others.
    """
    format = "?"

    def __init__(self, path: Path, config: GrokConfig, layers: list[int]):
        self.path, self.config, self.layers = Path(path), config, list(layers)

    # -- what subclasses implement -------------------------------------------------------------
    def load(self, name: str, index: int | None = None):
        raise NotImplementedError

    def stored(self) -> list[StoredTensor]:
        raise NotImplementedError

    def problems(self) -> list[str]:
        return []

    def close(self) -> None:
        pass

    def prefetch(self, name: str, index: int | None = None) -> None:
        """A hint: start reading a parameter's bytes in the background (readers of mapped files do)."""

    # -- shared --------------------------------------------------------------------------------
    def require_layers(self, layers, where=None) -> None:
        """One error naming the checkpoint when any of ``layers`` (None: no request) is not in it."""
        missing = sorted(set(layers or ()) - set(self.layers))
        if missing:
            raise MissingTensorError(f"layers {missing} are not in this checkpoint ({_ranges(self.layers)} "
                                     f"of {self.config.num_layers})", path=where or self.path)

    def specs(self) -> list[ParamSpec]:
        present = set(self.layers)
        return [s for s in param_specs(self.config) if s.layer is None or s.layer in present]

    def spec(self, name: str) -> ParamSpec:
        for s in param_specs(self.config):
            if s.name == name:
                if s.layer is not None and s.layer not in self.layers:
                    raise MissingTensorError(f"layer {s.layer} is not in this checkpoint "
                                             f"(it holds layers {_ranges(self.layers)})", path=self.path)
                return s
        raise MissingTensorError(f"no parameter {name!r} in the Grok-1 schema", path=self.path)

    def dense(self, name: str, dtype: str = "f32", index: int | None = None, device="cpu") -> "torch.Tensor":
        """The parameter as the reference computes with it (``bf16(int8*scale)`` for int8 weights)."""
        return as_dense(self.load(name, index), dtype, device)

    def is_quantized_int8(self, name: str) -> bool:
        return isinstance(self.load(name, 0 if self.spec(name).lead > 1 else None), QInt8)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ranges(layers) -> str:
    layers = sorted(layers)
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)


FORMATS: dict[str, tuple] = {}   # name -> (detect(path) -> bool, open(path, **kw) -> CheckpointReader)
FORMAT_MODULES = ("jax", "safetensors", "megatron", "gguf")   # grokconv/formats/<name>.py, tried in this order


def register_format(name: str, detect, opener) -> None:
    FORMATS[name] = (detect, opener)


def open_checkpoint(path, *, layers=None, strict: bool = True, fmt: str | None = None) -> CheckpointReader:
    """Open any checkpoint grokconv reads. ``layers``: only these must be present (a slice)."""
    import importlib
    path = Path(path)
    if not path.exists():
        raise MissingTensorError("no such file or directory", path=path)
    for mod in FORMAT_MODULES:   # each registers itself; imported one by one, so a jax dir never loads torch
        if fmt is None or fmt == mod:
            importlib.import_module(f"grokconv.formats.{mod}")
        if fmt is None and mod in FORMATS and FORMATS[mod][0](path):
            return FORMATS[mod][1](path, layers=layers, strict=strict)
    if fmt is not None:
        if fmt not in FORMATS:
            raise CheckpointFormatError(f"unknown format {fmt!r}; known: {', '.join(FORMAT_MODULES)}")
        return FORMATS[fmt][1](path, layers=layers, strict=strict)
    raise CheckpointFormatError("not a checkpoint grokconv recognises: expected ckpt-0/tensorNNNNN_000 files, "
                                "*.safetensors with an index or config.json, or a Megatron release/ directory",
                                path=path)


def check_array(value: np.ndarray, shape, dtype, where: str, path) -> None:
    from ..errors import ShapeMismatchError
    if tuple(value.shape) != tuple(shape):
        raise ShapeMismatchError(f"{where}: shape {tuple(value.shape)}, expected {tuple(shape)}", path=path,
                                 expected=tuple(shape), got=tuple(value.shape))
    if dtype is not None and value.dtype != dtype:
        raise ShapeMismatchError(f"{where}: dtype {value.dtype}, expected {dtype}", path=path,
                                 expected=str(dtype), got=str(value.dtype))
