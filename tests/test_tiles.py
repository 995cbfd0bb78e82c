"""The tiled CPU transforms (issue 19) against independent arithmetic: float64 / numpy / ml_dtypes
references and the untiled quantizers on the whole matrix, on adversarial values: all 256 int8 values,
every bf16 scale bit pattern (subnormals, the largest finite, inf and NaN), fp8 rounding ties, and
tiles forced small so that every chunk crosses several tiles and ends in a partial one."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from grokconv import runtime
from grokconv.export import SourceRows, encode_chunk, encoding_for
from grokconv.mapping import Target
from grokconv.quant import _blocks, tiles
from grokconv.quant.fp8 import fp8_scales, quantize_fp8
from grokconv.quant.metrics import ErrorAccumulator
from grokconv.quant.rowblocks import dequantize_rowblocks
from grokconv.quant.tiles import transpose_int8
from grokconv.tensor import QInt8, dequantize, from_torch, to_torch

from test_quant_numerics import ref_amax, ref_scales

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn
CPU = torch.device("cpu")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 columns x 32 rows for the shapes below: several tiles per chunk both ways (and per
    row block), the last ones partial."""
    monkeypatch.setattr(tiles, "TILE_BYTES", 4 * 64 * 32)


def all_int8_columns(n: int, seed: int = 0) -> np.ndarray:
    """int8 [256, n]: every column holds all 256 values, each column in its own order."""
    rng = np.random.default_rng(seed)
    base = np.arange(-128, 128, dtype=np.int16)
    return np.stack([rng.permutation(base) for _ in range(n)], axis=1).astype(np.int8)


def every_bf16() -> np.ndarray:
    """All 65536 bf16 bit patterns as bf16 values (NaNs and infinities included)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(BF16)


def same_values(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit-equal except that any NaN matches any NaN."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    nan = np.isnan(w)
    if not np.array_equal(np.isnan(g), nan):
        return False
    bits = {2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
    return np.array_equal(got.view(bits)[~nan], want.view(bits)[~nan])


# ------------------------------------------------------------------------- the one dequantization
@pytest.mark.parametrize("groups", [1, 8])
def test_dequantize_every_int8_times_every_bf16_scale(small_tiles, groups):
    q = all_int8_columns(1 << 16)                                   # [256, 65536]
    s = np.repeat(every_bf16()[None, :], groups, axis=0)            # [G, 65536]: column n scaled by pattern n
    rows = np.arange(256) // (256 // groups)
    with np.errstate(invalid="ignore", over="ignore"):              # inf * 0 and products past float32's max
        exact = q.astype(np.float64) * s.astype(np.float64)[rows]   # exact in float64 (and in float32)
        want_f32 = exact.astype(np.float32)
    want_bf16 = want_f32.astype(BF16)                               # one rounding of the exact product
    qt, st = torch.from_numpy(q), to_torch(s)
    for dtype, want in ((torch.float32, want_f32), (torch.bfloat16, want_bf16)):
        got = from_torch(dequantize_rowblocks(qt, st, dtype))
        assert same_values(got, want)
        got_t = from_torch(dequantize_rowblocks(qt, st, dtype, transpose=True))
        assert got_t.flags.c_contiguous and same_values(got_t, np.ascontiguousarray(want.T))
    # the reader-facing entry point is the same function
    assert same_values(from_torch(dequantize(QInt8(q, s), "bf16")), want_bf16)


def test_dequantize_leading_axes_out_and_errors(small_tiles):
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, size=(3, 64, 40), dtype=np.int8)
    s = rng.random((3, 8, 40), dtype=np.float32).astype(BF16)
    want = (q.astype(np.float64) * np.repeat(s.astype(np.float64), 8, axis=1)).astype(np.float32)
    out = torch.empty(3, 64, 40)
    got = dequantize_rowblocks(torch.from_numpy(q), to_torch(s), torch.float32, out=out)
    assert got.data_ptr() == out.data_ptr() and np.array_equal(out.numpy(), want)
    with pytest.raises(ValueError, match="transpose needs a 2-D"):
        dequantize_rowblocks(torch.from_numpy(q), to_torch(s), transpose=True)
    with pytest.raises(ValueError, match="out must be"):
        dequantize_rowblocks(torch.from_numpy(q), to_torch(s), torch.float32, out=torch.empty(3, 40, 64))
    with pytest.raises(ValueError, match="not divisible"):
        dequantize_rowblocks(torch.from_numpy(q[:, :60]), to_torch(s))


def test_transpose_int8_every_value_odd_shapes(small_tiles):
    for K, R in ((256, 1), (256, 37), (13, 300), (1, 5)):
        q = np.resize(np.arange(-128, 128, dtype=np.int16).astype(np.int8), (K, R + 3))
        src = torch.from_numpy(q)[:, 2:2 + R]                       # a strided column slice, as the readers give
        got = transpose_int8(src)
        assert got.is_contiguous() and np.array_equal(got.numpy(), q[:, 2:2 + R].T)


def test_e4m3_widening_every_code():
    codes = np.arange(256, dtype=np.uint8)
    got = _blocks.e4m3_to_float32(torch.from_numpy(codes).view(torch.float8_e4m3fn)).numpy()
    want = codes.view(FP8).astype(np.float32)                       # ml_dtypes: the independent decoding
    assert same_values(got, want)
    assert np.isnan(got[0x7F]) and np.isnan(got[0xFF]) and got[0x7E] == 448 and got[0x01] == 2.0 ** -9


# ------------------------------------------------------------------------- the encodings, tiled
def ref_fp8(w32: np.ndarray, scale_rows: np.ndarray, b0: int, b1: int) -> np.ndarray:
    """numpy/ml_dtypes: fp8(clip(w / s, -448, 448)), the division in float32 (scales broadcast per block)."""
    rows, cols = w32.shape
    s = np.repeat(np.repeat(scale_rows, b0, axis=0)[:rows], b1, axis=1)[:, :cols]
    return np.clip(w32 / s, -448, 448).astype(FP8)


def adversarial_source(n_cols: int = 96, groups: int = 1) -> QInt8:
    """[256 in, n_cols out]: every int8 value in each column; scales from 2**-133 (bf16 subnormal) to 2**100,
    and exactly 1.0 and 0.25 (whose fp8 quotients land on round-to-nearest-even ties: 17, 19, ... / S)."""
    q = all_int8_columns(n_cols, seed=groups)
    pick = np.concatenate([[2.0 ** -133, 2.0 ** -126, 1.0, 0.25, 1.0, 3.0 ** 0.5, 2.0 ** 100],
                           np.geomspace(1e-30, 1e30, n_cols - 7)])
    s = (pick[None, :] * 2.0 ** np.arange(groups)[:, None]).astype(np.float32).astype(BF16)  # row blocks differ
    return QInt8(q, s)


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("scheme", ["channel", "block", "tensor"])
def test_fp8_tiled_equals_whole_matrix_arithmetic(small_tiles, scheme, groups):
    v = adversarial_source(groups=groups)
    K, N = v.weight.shape
    t = Target("m.weight", "m", None, "linear", True, (N, K))
    enc = encoding_for("fp8", "linear", fp8_scheme=scheme)
    w64 = (v.weight.astype(np.float64) * np.repeat(v.scales.astype(np.float64), K // groups, axis=0)).T
    w32 = np.ascontiguousarray(w64.astype(np.float32))              # exact: int8 x bf16 fits float32
    whole = torch.from_numpy(w32)
    ctx = {}
    if scheme == "tensor":
        ctx["tensor_scale"] = torch.tensor([1.0])                   # w / 1: the ties and the clamp at 448
    # the arithmetic path: untiled quantizers on the whole matrix
    scale = ctx["tensor_scale"] if scheme == "tensor" else fp8_scales(whole, scheme, enc.block, torch.bfloat16)
    want_q = quantize_fp8(whole, scale, scheme, enc.block).view(torch.uint8).numpy()
    # ... and the independent numpy one, with scales from float64 amax
    b0, b1 = {"channel": (1, K), "block": enc.block, "tensor": (N, K)}[scheme]
    ref_s = np.float32(1.0) * np.ones((1, 1), np.float32) if scheme == "tensor" else \
        ref_scales(ref_amax(w64, b0, b1), 448.0, bf16=True)
    assert np.array_equal(want_q, ref_fp8(w32, ref_s, b0, b1).view(np.uint8))
    if scheme != "tensor":
        assert np.array_equal(scale.numpy(), ref_s)
    # the fast path: chunks of rows (as rows_per_chunk cuts them), each quantized in tiles of 8 rows
    step = 128 if scheme == "block" else 40
    got_q, got_s = np.zeros((N, K), np.uint8), []
    acc = ErrorAccumulator(fast=True)
    for r0 in range(0, N, step):
        ctx.update(measure=True, acc=acc)
        outs, measured = encode_chunk(enc, SourceRows(v, True, r0, min(N, r0 + step), CPU), t, ctx)
        assert measured
        for name, first, tens in outs:
            if name == "m.weight":
                got_q[first:first + tens.shape[0]] = tens.view(torch.uint8).numpy()
            elif scheme != "tensor":
                got_s.append(tens.float().numpy())
    assert np.array_equal(got_q, want_q)
    if scheme != "tensor":
        assert np.array_equal(np.concatenate(got_s), scale.numpy())
    assert acc.numel == N * K


def test_bf16_and_int8_chunks_equal_the_arithmetic(small_tiles):
    v = adversarial_source(groups=8)
    K, N = v.weight.shape
    t = Target("m.weight", "m", None, "linear", True, (N, K))
    want = (v.weight.astype(np.float64) * np.repeat(v.scales.astype(np.float64), K // 8, axis=0)).T
    outs, _ = encode_chunk(encoding_for("none", "linear"), SourceRows(v, True, 8, 72, CPU), t, {})
    assert same_values(from_torch(outs[0][2]), want[8:72].astype(np.float32).astype(BF16))
    enc = encoding_for("int8", "linear", group_size=32)
    outs, measured = encode_chunk(enc, SourceRows(v, True, 0, 50, CPU), t, {"measure": True,
                                                                              "acc": ErrorAccumulator(fast=True)})
    assert not measured                                             # lossless: nothing to measure
    packed = outs[0][2].contiguous().view(torch.uint8).numpy().reshape(50, K)
    assert np.array_equal((packed ^ 0x80).view(np.int8), v.weight[:, :50].T)


# ------------------------------------------------------------------------- --workers
def test_workers_default_is_the_available_cores(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert runtime.available_cores() == 3 and runtime.resolve_workers(None) == 3
    assert runtime.resolve_workers(5) == 5 and runtime.torch_threads_per_worker(2) == 1
    with pytest.raises(runtime.GrokconvError, match="at least 1"):
        runtime.resolve_workers(0)


def test_cli_refuses_zero_workers(tmp_path):
    from grokconv.cli import main
    for cmd in (["to-safetensors", str(tmp_path), str(tmp_path / "o")], ["to-gguf", str(tmp_path), str(tmp_path / "o.gguf")]):
        r = CliRunner().invoke(main, [*cmd, "--workers", "0"])
        assert r.exit_code == 2 and "--workers" in r.output and "Traceback" not in r.output


def test_tensor_amax_equals_float64_max():
    from grokconv.export import tensor_amax
    rng = np.random.default_rng(3)
    for K, N, G in ((256, 96, 8), (640, 70, 1), (64, 5, 1)):
        for fill in (None, -128, 0):
            w = rng.integers(-128, 128, size=(K, N), dtype=np.int8) if fill is None else np.full((K, N), fill, np.int8)
            s = (rng.standard_normal((G, N)) * 10.0 ** rng.integers(-30, 30, size=(G, N))).astype(np.float32).astype(BF16)
            want = np.abs(w.astype(np.float64) * np.repeat(s.astype(np.float64), K // G, axis=0)).max()
            assert tensor_amax(QInt8(w, s)) == np.float32(want)


def test_work_buffers_inside_and_outside_inference_mode(small_tiles):
    q = torch.from_numpy(all_int8_columns(20))
    s = torch.ones(1, 20, dtype=torch.bfloat16)
    with torch.inference_mode():
        a = dequantize_rowblocks(q, s, torch.float32, transpose=True).clone()
        assert torch.equal(transpose_int8(q), q.t())
    b = dequantize_rowblocks(q, s, torch.float32, transpose=True)        # the buffers of the other mode
    assert torch.equal(a, b) and torch.equal(transpose_int8(q), q.t())
