"""Readers that get a checkpoint deliberately wrong (or lossy), for the parity tests.

Each wraps a real reader and changes what ``load`` returns; ``dense`` (in the base class) goes
through ``load``, so the forward sees exactly what a faulty converter would have produced.
"""
from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np

from grokconv.formats.base import CheckpointReader, StoredTensor
from grokconv.formats.jax import ckpt_dir
from grokconv.schema import param_specs
from grokconv.tensor import BF16, QInt8


class TransformReader(CheckpointReader):
    """``base`` with every int8 weight passed through ``fn(value) -> value``."""

    def __init__(self, base: CheckpointReader, fn, scheme: str | None = None):
        super().__init__(base.path, base.config, base.layers)
        self.base, self.fn, self.scheme = base, fn, scheme
        self.format = f"{base.format}+{getattr(fn, '__name__', 'transform')}"

    def load(self, name, index=None):
        value = self.base.load(name, index)
        return self.fn(value) if isinstance(value, QInt8) else value

    def stored(self):
        out = []
        for t in self.base.stored():
            quant = {"scheme": self.scheme} if (self.scheme and t.quant) else t.quant
            out.append(StoredTensor(t.name, t.shape, t.dtype, t.nbytes, t.file, quant))
        return out

    def close(self):
        self.base.close()


def first_scale_row(q: QInt8) -> QInt8:
    """The G=8 row-block scales applied as if G were 1: the first row's scales on every row."""
    if q.groups == 1:
        return q
    s = np.ascontiguousarray(q.scales[..., :1, :])
    return QInt8(q.weight, np.ascontiguousarray(np.broadcast_to(s, q.scales.shape)))


def _bf16_dense(q: QInt8) -> np.ndarray:
    """The reference's bf16(int8 * scale), as float32."""
    w = q.weight.astype(np.float32)
    s = q.scales.astype(np.float32)
    K, N, G = w.shape[-2], w.shape[-1], s.shape[-2]
    lead = w.shape[:-2]
    d = (w.reshape(*lead, G, K // G, N) * s[..., :, None, :]).reshape(*lead, K, N)
    return d.astype(BF16).astype(np.float32)


def requant_int8(q: QInt8) -> np.ndarray:
    """Simulated int8 re-quantization of the bf16 weight: per output channel absmax, float32 scale."""
    d = _bf16_dense(q)
    scale = np.abs(d).max(axis=-2, keepdims=True) / 127
    scale[scale == 0] = 1
    return (np.clip(np.rint(d / scale), -127, 127) * scale).astype(np.float32)


def quant_fp8(q: QInt8) -> np.ndarray:
    """Simulated fp8 (e4m3) per output channel: scale = absmax / 448, values rounded to e4m3."""
    d = _bf16_dense(q)
    scale = np.abs(d).max(axis=-2, keepdims=True) / 448
    scale[scale == 0] = 1
    f8 = (d / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return (f8 * scale).astype(np.float32)


def write_numeric_order_copy(src: Path, dst: Path) -> Path:
    """The checkpoint a converter that assumes *numeric* layer order for file positions produces.

    Such a converter reads file ``p`` as the p-th parameter in numeric order (layers 0, 1, 2, ...)
    and writes it under that name. Shapes agree across layers, so the result is a well-formed
    checkpoint whose layers 2.. hold other layers' weights (for 12 layers, "layer 2" gets layer 10's).
    Files are hard links (or copies) of the source's.
    """
    from grokconv.config import CONFIG_FILE, find_config

    src, dst = Path(src), Path(dst)
    sdir = ckpt_dir(src)
    cfg = find_config(sdir)
    lex = param_specs(cfg)                                      # the true file order
    numeric = sorted(lex, key=lambda s: (s.layer is not None, -1 if s.layer is None else s.layer,
                                         s.name if s.layer is None else s.slot))
    by_name = {s.name: s for s in lex}
    ddir = dst / "ckpt-0"
    ddir.mkdir(parents=True, exist_ok=True)
    cfg.save(dst / CONFIG_FILE)
    for position, believed in enumerate(numeric):
        source = sdir / lex[position].file                      # what file ``position`` really holds
        target = ddir / by_name[believed.name].file             # where that name lives on disk
        try:
            os.link(source, target)
        except OSError:
            target.write_bytes(source.read_bytes())
    return dst
