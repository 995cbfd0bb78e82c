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


# -- a catalogue of plausible lossy-conversion bugs ----------------------------------------------------
# Each ``bug_*`` is what a converter with that mistake would hand an engine (as float32 canonical
# [..., in K, out N] values, or a QInt8); each ``ok_*`` is the same conversion done right. On the trained
# preset every bug must fail the parity row of its kind while its twin passes (tests/test_trained.py).
# Weights are seen as an engine sees them: the HF layout [out, in], scales per output channel.
F8 = np.dtype(ml_dtypes.float8_e4m3fn)


def _per_channel(d: np.ndarray, qmax: float) -> np.ndarray:
    """Per output channel absmax scale [..., 1, N] (reduced over the input axis), 1 where a column is 0."""
    s = np.abs(d).max(axis=-2, keepdims=True) / qmax
    s[s == 0] = 1
    return s


def _fp8(x: np.ndarray) -> np.ndarray:
    """Round to e4m3 (nearest even), values clamped to +-448 first."""
    return np.clip(x, -448, 448).astype(F8).astype(np.float32)


def _fp8_toward_zero(x: np.ndarray) -> np.ndarray:
    """Round to e4m3 toward zero: the nearest value, stepped one code toward zero where it is larger in
    magnitude than ``x`` (e4m3 magnitudes are ordered like their 7-bit codes)."""
    x = np.clip(x, -448, 448)
    near = x.astype(F8)
    bits = near.view(np.uint8)
    mag = (bits & 0x7F).astype(np.int16)
    over = np.abs(near.astype(np.float32)) > np.abs(x)
    mag = np.where(over & (mag > 0), mag - 1, mag).astype(np.uint8)
    return ((bits & 0x80) | mag).view(F8).astype(np.float32)


def ok_int8_channel(q: QInt8) -> np.ndarray:
    return requant_int8(q)


def bug_int8_round_toward_zero(q: QInt8) -> np.ndarray:
    """int8 re-quantization that truncates (``astype(int8)`` on the quotient) instead of rounding."""
    d = _bf16_dense(q)
    s = _per_channel(d, 127)
    return (np.clip(np.trunc(d / s), -127, 127) * s).astype(np.float32)


def bug_int8_amax_wrong_axis(q: QInt8) -> np.ndarray:
    """Per-channel int8 whose amax is taken over the output axis (one value per input row) and then used
    as the output channels' scales (resized to N as ``numpy.resize`` does; for the square query and
    output projections of the real model no resize is even needed): columns with larger values clip."""
    d = _bf16_dense(q)
    wrong = np.abs(d).max(axis=-1) / 127                      # [..., K]: per input row
    N = d.shape[-1]
    s = np.stack([np.resize(w, N) for w in wrong.reshape(-1, wrong.shape[-1])]).reshape(*d.shape[:-2], 1, N)
    s[s == 0] = 1
    return (np.clip(np.rint(d / s), -127, 127) * s).astype(np.float32)


def _groups(K: int, g: int, whole_only: bool):
    stops = list(range(g, K + 1, g))
    if not whole_only and (not stops or stops[-1] != K):
        stops.append(K)
    return list(zip([0, *stops[:-1]], stops))


def _int8_group(q: QInt8, g: int, whole_only: bool) -> np.ndarray:
    d = _bf16_dense(q)
    out = np.zeros_like(d)
    for a, b in _groups(d.shape[-2], g, whole_only):
        part = d[..., a:b, :]
        s = _per_channel(part, 127)
        out[..., a:b, :] = np.clip(np.rint(part / s), -127, 127) * s
    return out


def ok_int8_group48(q: QInt8) -> np.ndarray:
    """int8 with groups of 48 input features per scale; the last group is short where 48 does not divide."""
    return _int8_group(q, 48, whole_only=False)


def bug_int8_group48_not_dividing(q: QInt8) -> np.ndarray:
    """The same with ``K // 48`` groups: the input features past the last whole group are not written
    (they come back as zeros)."""
    return _int8_group(q, 48, whole_only=True)


class ExpertScalesReader(TransformReader):
    """Expert e's int8 weights paired with expert e+1's scales (an off-by-one in the expert split),
    whether the forward loads the stacked experts or one at a time (``index=e``)."""

    def __init__(self, base: CheckpointReader, scheme: str | None = None):
        super().__init__(base, bug_expert_scales_from_next_expert, scheme)

    def load(self, name, index=None):
        value = self.base.load(name, index)
        if not isinstance(value, QInt8) or index is None:
            return self.fn(value) if isinstance(value, QInt8) else value
        nxt = self.base.load(name, (index + 1) % self.config.num_experts)
        return QInt8(value.weight, nxt.scales)


def bug_expert_scales_from_next_expert(q: QInt8) -> QInt8:
    """On a stacked [E, ...] weight: expert e's int8 with expert e+1's scales (see ExpertScalesReader)."""
    if q.weight.ndim < 3:
        return q
    return QInt8(q.weight, np.ascontiguousarray(np.roll(q.scales, -1, axis=0)))


def bug_rowblock_scale_shifted(q: QInt8) -> QInt8:
    """Row block b of a row-blocked weight scaled with block b+1's scales (block index off by one)."""
    if q.groups == 1:
        return q
    return QInt8(q.weight, np.ascontiguousarray(np.roll(q.scales, -1, axis=-2)))


def ok_fp8_channel(q: QInt8) -> np.ndarray:
    return quant_fp8(q)


def bug_fp8_round_toward_zero(q: QInt8) -> np.ndarray:
    """fp8 per channel, with the cast rounding toward zero instead of to nearest."""
    d = _bf16_dense(q)
    s = _per_channel(d, 448)
    return _fp8_toward_zero(d / s) * s


def _fp8_blocks(q: QInt8, b: int, transposed: bool) -> np.ndarray:
    """fp8 with one scale per b x b block of the HF-layout [out, in] weight; ``transposed``: the scale grid
    is written as [in blocks, out blocks] and read back as [out blocks, in blocks] (same bytes, other shape)."""
    d = np.swapaxes(_bf16_dense(q), -1, -2)                   # [..., N out, K in]
    N, K = d.shape[-2:]
    nb, kb = -(-N // b), -(-K // b)
    pad = np.zeros((*d.shape[:-2], nb * b, kb * b), np.float32)
    pad[..., :N, :K] = d
    blocks = pad.reshape(*d.shape[:-2], nb, b, kb, b)
    s = np.abs(blocks).max(axis=(-3, -1), keepdims=True) / 448
    s[s == 0] = 1
    qv = _fp8(blocks / s)
    if transposed:
        grid = s[..., :, 0, :, 0]                              # [..., nb, kb]
        grid = np.swapaxes(grid, -1, -2).reshape(grid.shape)    # written transposed, read in the other order
        s = grid[..., :, None, :, None]
    out = (qv * s).reshape(*d.shape[:-2], nb * b, kb * b)[..., :N, :K]
    return np.ascontiguousarray(np.swapaxes(out, -1, -2)).astype(np.float32)


def ok_fp8_block32(q: QInt8) -> np.ndarray:
    """fp8 with 32 x 32 block scales (the DeepSeek block layout at this model's scale; 128 x 128 blocks
    would cover whole tensors of the tiny models)."""
    return _fp8_blocks(q, 32, transposed=False)


def bug_fp8_block32_scales_transposed(q: QInt8) -> np.ndarray:
    return _fp8_blocks(q, 32, transposed=True)


def bug_reader(base: CheckpointReader, bug: str) -> CheckpointReader:
    """The reader of ``LOSSY_BUGS[bug]``'s faulty conversion of ``base``."""
    fn, _, scheme, _ = LOSSY_BUGS[bug]
    if fn is bug_expert_scales_from_next_expert:
        return ExpertScalesReader(base, scheme=scheme)
    return TransformReader(base, fn, scheme=scheme)


# bug id: (bug transform, its correct twin, the scheme name its reader reports, the threshold row)
LOSSY_BUGS = {
    "expert scales from the next expert": (bug_expert_scales_from_next_expert, ok_int8_channel, "int8-group", "int8"),
    "row block scale shifted by one block": (bug_rowblock_scale_shifted, ok_int8_channel, "int8-group", "int8"),
    "fp8 block scales transposed": (bug_fp8_block32_scales_transposed, ok_fp8_block32, "fp8-block", "fp8"),
    "int8 group size that does not divide": (bug_int8_group48_not_dividing, ok_int8_group48, "int8-group", "int8"),
    "int8 amax over the wrong axis": (bug_int8_amax_wrong_axis, ok_int8_channel, "int8-channel", "int8"),
    "int8 round toward zero": (bug_int8_round_toward_zero, ok_int8_channel, "int8-channel", "int8"),
    "fp8 round toward zero": (bug_fp8_round_toward_zero, ok_fp8_channel, "fp8-channel", "fp8"),
}
