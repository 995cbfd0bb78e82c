"""grokconv.quant against independent numpy references (float64 scales, ml_dtypes casts), edge cases,
chunked == whole, packing bytes, the original Grok-1 row-block format, and compressed-tensors itself."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from conftest import require
import torch

from grokconv import quant as Q
from grokconv.tensor import QInt8, dequantize as grok_dequantize, from_torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TINY = float(np.finfo(np.float32).tiny)
FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------- independent numpy references
def ref_block(scheme: str, shape, block=(128, 128), group=128) -> tuple:
    rows, cols = shape
    return {"tensor": (rows, cols), "channel": (1, cols), "block": tuple(block), "group": (1, group)}[scheme]


def ref_amax(w64: np.ndarray, b0: int, b1: int) -> np.ndarray:
    rows, cols = w64.shape
    R, C = -(-rows // b0) * b0, -(-cols // b1) * b1
    a = np.zeros((R, C))
    a[:rows, :cols] = np.abs(w64)
    return a.reshape(R // b0, b0, C // b1, b1).max(axis=(1, 3))


def ref_scales(amax: np.ndarray, qmax: float, bf16: bool = False) -> np.ndarray:
    s = (amax / qmax).astype(np.float32)  # float64 division, one rounding to float32
    if bf16:
        s = s.astype(BF16).astype(np.float32)
    s = np.where(s < TINY, np.float32(TINY), s)
    return np.where(amax == 0, np.float32(1.0), s).astype(np.float32)


def expand(s: np.ndarray, shape, b0: int, b1: int) -> np.ndarray:
    return np.repeat(np.repeat(s, b0, axis=0), b1, axis=1)[:shape[0], :shape[1]]


def ref_fp8(w32: np.ndarray, s_full: np.ndarray) -> np.ndarray:
    """The spec: float32 quotient, clamp to +-448, round-to-nearest-even cast (ml_dtypes)."""
    return np.clip(w32 / s_full, -448, 448).astype(np.float32).astype(FP8)


def round_e4m3_f64(x: np.ndarray) -> np.ndarray:
    """Exact RNE of float64 ``x`` (|x| <= 448) onto the e4m3fn grid, without ml_dtypes."""
    _, e = np.frexp(x)                      # x = m * 2**e, 0.5 <= |m| < 1
    ulp = np.exp2(np.maximum(e - 4, -9))    # 3 mantissa bits; subnormal spacing 2**-9
    return np.round(x / ulp) * ulp


def ref_int8(w32: np.ndarray, s_full: np.ndarray) -> np.ndarray:
    return np.round(np.clip(w32 / s_full, -128, 127)).astype(np.int8)


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()


def fp8_bytes(t: torch.Tensor) -> np.ndarray:
    return t.cpu().view(torch.uint8).numpy()


def rand(shape, seed=0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g))
    return w.to(dtype).to(device)


def edge_cases() -> dict:
    g = torch.Generator().manual_seed(1)
    out = {"zeros": torch.zeros(200, 300)}
    w = torch.randn(200, 300, generator=g)
    w[7, 11] = 1e30
    w[150, 299] = -3e38
    out["huge outliers"] = w
    w = torch.randn(200, 300, generator=g)
    w[:, :5] = 448.0                        # one row/col block at amax; the rest lands in fp8 subnormals
    w[:, 5:] *= 448 * 2.0 ** -11
    out["fp8 subnormal range"] = w
    out["tiny 1e-30"] = torch.randn(200, 300, generator=g) * 1e-30
    out["f32 subnormals"] = torch.randn(200, 300, generator=g) * 1e-40
    w = torch.full((200, 300), 1e-45)
    w[::3] = 0.0
    w[1::3] = -1e-45
    out["smallest subnormal"] = w
    w = torch.randn(200, 300, generator=g)
    w[100:] = 0.0                           # zero rows and zero blocks beside non-zero ones
    w[:, 250:] = 0.0
    out["partly zero"] = w
    return out


# ---------------------------------------------------------------- fp8
FP8_SHAPES = [(200, 300), (256, 384), (1, 300), (300, 1), (1, 1), (129, 257)]


def check_fp8(w: torch.Tensor, scheme: str, scale_dtype=torch.float32) -> None:
    q_scale = Q.fp8_scales(w, scheme, scale_dtype=scale_dtype)
    q = Q.quantize_fp8(w, q_scale, scheme)
    deq = Q.dequantize_fp8(q, q_scale, scheme)
    w32 = np32(w)
    b0, b1 = ref_block(scheme, w.shape)
    s = ref_scales(ref_amax(w32.astype(np.float64), b0, b1), 448.0, scale_dtype == torch.bfloat16)
    s = s.reshape(1) if scheme == "tensor" else s
    assert q_scale.dtype == torch.float32 and q_scale.shape == Q.fp8_scale_shape(*w.shape, scheme)
    np.testing.assert_array_equal(np32(q_scale), s)
    s_full = expand(s.reshape(-1, s.shape[-1]), w.shape, b0, b1)
    ref_q = ref_fp8(w32, s_full)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    np.testing.assert_array_equal(fp8_bytes(q), ref_q.view(np.uint8))
    assert not np.isnan(ref_q.astype(np.float32)).any()
    d = np32(deq)
    np.testing.assert_array_equal(d, ref_q.astype(np.float32) * s_full)
    assert np.isfinite(d).all()
    # e4m3: half-ulp relative error 2**-4 for normals, absolute 2**-10 * scale for subnormals
    err = np.abs(d.astype(np.float64) - w32)
    bound = 2.0 ** -4 * np.abs(w32.astype(np.float64)) * (1 + 1e-6) + s_full * 2.0 ** -9
    assert (err <= bound).all(), float((err - bound).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", FP8_SHAPES)
@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_fp8_matches_reference(scheme, shape, dtype, device):
    check_fp8(rand(shape, dtype=dtype, device=device), scheme)


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
@pytest.mark.parametrize("case", list(edge_cases()))
def test_fp8_edge_cases(scheme, case):
    check_fp8(edge_cases()[case], scheme)


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_fp8_bf16_scales(scheme):
    check_fp8(rand((200, 300), seed=3), scheme, scale_dtype=torch.bfloat16)


def test_fp8_saturates_beyond_448_without_nan():
    # a given scale smaller than amax/448: w/scale at and beyond 448, incl. 464/465 (the NaN edge of
    # non-saturating casts) and values that overflow float32 in the division
    w = torch.tensor([[447.0, 448.0, 448.5, 464.0, 465.0, 1000.0, 3e38, -465.0, -3e38, 0.0]])
    q = Q.quantize_fp8(w, torch.tensor([1.0]), "tensor")
    assert fp8_bytes(q).tolist()[0] == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x00]
    q = Q.quantize_fp8(w, torch.tensor([1e-38]), "tensor")
    assert not torch.isnan(q.float()).any()
    assert Q.dequantize_fp8(q, torch.tensor([1e-38]), "tensor").isfinite().all()


def test_fp8_round_to_nearest_even():
    w = torch.tensor([[1.0625, 1.1875, -1.0625, 2.0 ** -10, 3 * 2.0 ** -10, 448.0]])
    q = Q.quantize_fp8(w, torch.tensor([1.0]), "tensor").float()
    assert q.tolist()[0] == [1.0, 1.25, -1.0, 0.0, 2.0 ** -8, 448.0]


def test_fp8_float32_division_vs_exact():
    """Against an exact float64 rounding: differences only where the float32 quotient sits exactly on
    an e4m3 tie (double rounding, inherent to the float32 division the spec fixes), one step apart."""
    s = torch.tensor([0.7853981852531433])  # float32(pi / 4)
    mids = torch.tensor([1.0625, 1.1875, 3.375, 100.0, 2.0 ** -9 * 1.5, 400.0])  # e4m3 midpoints
    w = torch.cat([rand((64, 1024), seed=5).flatten() * 100, (mids * s).repeat(50) * (-1) ** torch.arange(300)])
    w = w.reshape(1, -1)                     # float32(midpoint * s): quotients land on or near ties
    q = np32(Q.quantize_fp8(w, s, "tensor").float())
    exact = round_e4m3_f64(np.clip(np32(w).astype(np.float64) / np32(s).astype(np.float64), -448, 448))
    x32 = np.clip(np32(w) / np32(s), -448, 448).astype(np.float64)
    on_tie = round_e4m3_f64(np.nextafter(x32, np.inf)) != round_e4m3_f64(np.nextafter(x32, -np.inf))
    diff = q != exact
    assert diff.any() and (~diff | on_tie).all()
    assert (np.abs(q - exact) <= np.abs(exact) * 2.0 ** -3 + 2.0 ** -9).all()  # one e4m3 step at most
    np.testing.assert_array_equal(q, round_e4m3_f64(x32))  # our own rounding of the float32 quotient


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_chunked_equals_whole(scheme, dtype):
    w = rand((700, 300), seed=7, dtype=dtype)
    s = Q.fp8_scales(w, scheme)
    q = Q.quantize_fp8(w, s, scheme)
    bounds = [0, 128, 384, 512, 700]
    if scheme == "tensor":
        amax = torch.stack([Q.fp8_amax(w[a:b], scheme) for a, b in zip(bounds, bounds[1:])]).amax(0)
        assert torch.equal(Q.fp8_scales_from_amax(amax), s)
    else:
        local = [Q.fp8_scales(w[a:b], scheme) for a, b in zip(bounds, bounds[1:])]
        assert torch.equal(torch.cat(local), s)
    for a, b in zip(bounds, bounds[1:]):
        qc = Q.quantize_fp8(w[a:b], s, scheme, row_offset=a)
        assert torch.equal(qc.view(torch.uint8), q[a:b].view(torch.uint8))
        dc = Q.dequantize_fp8(qc, s, scheme, row_offset=a)
        assert torch.equal(dc, Q.dequantize_fp8(q, s, scheme)[a:b])


def test_fp8_bad_arguments():
    w = rand((256, 256))
    s = Q.fp8_scales(w, "block")
    with pytest.raises(ValueError, match="multiple of the block rows"):
        Q.quantize_fp8(w[64:192], s, "block", row_offset=64)
    with pytest.raises(ValueError, match="need scale rows"):
        Q.quantize_fp8(w, s, "block", row_offset=128)
    with pytest.raises(ValueError, match="does not fit"):
        Q.quantize_fp8(w, s, "channel")
    with pytest.raises(ValueError, match="finite and > 0"):
        Q.quantize_fp8(w, torch.zeros(1), "tensor")
    with pytest.raises(ValueError, match="valid: tensor, channel, block"):
        Q.fp8_scales(w, "row")
    with pytest.raises(ValueError, match="2-D"):
        Q.fp8_scales(w[0], "tensor")


# ---------------------------------------------------------------- int8 (compressed-tensors convention)
def check_int8(w: torch.Tensor, strategy: str, group=128) -> None:
    s = Q.int8_scales(w, strategy, group)
    q = Q.quantize_int8(w, s, strategy, group)
    w32 = np32(w)
    b0, b1 = ref_block(strategy, w.shape, group=group)
    rs = ref_scales(ref_amax(w32.astype(np.float64), b0, b1), 127.5)
    rs = rs.reshape(1) if strategy == "tensor" else rs
    assert s.shape == Q.int8_scale_shape(*w.shape, strategy, group)
    np.testing.assert_array_equal(np32(s), rs)
    s_full = expand(rs.reshape(-1, rs.shape[-1]), w.shape, b0, b1)
    np.testing.assert_array_equal(q.cpu().numpy(), ref_int8(w32, s_full))
    d = np32(Q.dequantize_int8(q, s, strategy, group))
    np.testing.assert_array_equal(d, q.cpu().numpy().astype(np.float32) * s_full)
    assert np.isfinite(d).all()
    # half a step, plus float32 rounding of the quotient and the product (<= 2 * 128 * 2**-24 steps)
    assert (np.abs(d.astype(np.float64) - w32) <= s_full * (0.5 + 2.0 ** -15)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", FP8_SHAPES)
@pytest.mark.parametrize("strategy", ["channel", "group", "tensor"])
def test_int8_matches_reference(strategy, shape, dtype, device):
    check_int8(rand(shape, dtype=dtype, device=device), strategy)


@pytest.mark.parametrize("strategy", ["channel", "group"])
@pytest.mark.parametrize("case", list(edge_cases()))
def test_int8_edge_cases(strategy, case):
    check_int8(edge_cases()[case], strategy, group=64)


@pytest.mark.parametrize("strategy", ["channel", "group", "tensor"])
def test_int8_chunked_equals_whole(strategy):
    w = rand((300, 200), seed=9, dtype=torch.bfloat16)
    s = Q.int8_scales(w, strategy)
    q = Q.quantize_int8(w, s, strategy)
    bounds = [0, 1, 100, 300]
    if strategy != "tensor":
        assert torch.equal(torch.cat([Q.int8_scales(w[a:b], strategy) for a, b in zip(bounds, bounds[1:])]), s)
    for a, b in zip(bounds, bounds[1:]):
        assert torch.equal(Q.quantize_int8(w[a:b], s, strategy, row_offset=a), q[a:b])


# ---------------------------------------------------------------- pack-quantized
@pytest.mark.parametrize("shape", [(3, 1), (3, 2), (3, 3), (3, 4), (5, 5), (2, 300), (4, 7, 13)])
def test_pack_round_trip(shape):
    g = torch.Generator().manual_seed(11)
    q = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    p = Q.pack_int8(q)
    assert p.dtype == torch.int32 and p.shape == (*shape[:-1], -(-shape[-1] // 4))
    assert torch.equal(Q.unpack_int8(p, shape[-1]), q)


def test_pack_byte_convention():
    q = np.random.default_rng(12).integers(-128, 128, (6, 11)).astype(np.int8)
    q[0, :4] = [-128, -1, 0, 127]
    padded = np.zeros((6, 12), np.int64)
    padded[:, :11] = q.astype(np.int64) + 128           # value q + 128; padding byte 0
    words = sum(padded[:, i::4] << (8 * i) for i in range(4))  # element i of each 4 in bits 8i..8i+7
    expected = words.astype(np.uint32).view(np.int32)
    got = Q.pack_int8(torch.from_numpy(q)).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got[0, 0] == np.uint32(0xFF_80_7F_00).view(np.int32)


def test_pack_bad_arguments():
    with pytest.raises(TypeError):
        Q.pack_int8(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="hold"):
        Q.unpack_int8(torch.zeros(2, 3, dtype=torch.int32), 13)


# ---------------------------------------------------------------- original Grok-1 row blocks
def original_style(K: int, N: int, G: int, seed: int, lead=()) -> tuple:
    """Random int8 whose every (block, column) reaches +-127, and random positive bf16 scales."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (*lead, G, K // G, N), generator=g).to(torch.int8)
    at = torch.randint(0, K // G, (*lead, G, 1, N), generator=g)
    sign = torch.where(torch.rand(*lead, G, 1, N, generator=g) < 0.5, -127, 127).to(torch.int8)
    q.scatter_(-2, at, sign)
    s = torch.exp(torch.empty(*lead, G, N).uniform_(-14, 3, generator=g)).to(torch.bfloat16)
    return q.reshape(*lead, K, N), s


@pytest.mark.parametrize("lead", [(), (2,)])
@pytest.mark.parametrize("G", [1, 8])
def test_rowblocks_recover_original(G, lead):
    q, s = original_style(256, 512, G, seed=G, lead=lead)
    w32 = grok_dequantize(QInt8(from_torch(q), from_torch(s)), "f32")
    wbf = grok_dequantize(QInt8(from_torch(q), from_torch(s)), "bf16")
    assert torch.equal(Q.dequantize_rowblocks(q, s).view(torch.int16), wbf.view(torch.int16))
    for w in (w32, wbf, wbf.float()):
        q2, s2 = Q.quantize_rowblocks(w, G)
        assert q2.dtype == torch.int8 and s2.dtype == torch.bfloat16 and s2.shape == s.shape
        assert torch.equal(q2, q)
        assert torch.equal(s2.view(torch.int16), s.view(torch.int16))


def test_rowblocks_bf16_needs_neighbour_scales():
    """bf16(amax/127) alone misses the original scale in ~1% of columns; the candidate search doesn't."""
    q, s = original_style(512, 4096, 8, seed=21)
    wbf = Q.dequantize_rowblocks(q, s)
    naive = (wbf.float().reshape(8, 64, 4096).abs().amax(1) / 127).to(torch.bfloat16)
    assert (naive != s).sum() > 0
    q2, s2 = Q.quantize_rowblocks(wbf, 8)
    assert torch.equal(q2, q) and torch.equal(s2, s)


def test_rowblocks_ambiguous_column_still_round_trips():
    # bf16(127 * 1.5) == bf16(127 * 1.4921875): a column of only 0 and +-127 cannot tell the two apart
    s = torch.tensor([[1.5, 1.4921875, 1.25 * 2.0 ** -9]], dtype=torch.bfloat16)
    q = torch.zeros(64, 3, dtype=torch.int8)
    q[5], q[9] = 127, -127
    wbf = Q.dequantize_rowblocks(q, s)
    q2, s2 = Q.quantize_rowblocks(wbf, 1)
    assert s2[0].tolist() == [1.4921875, 1.4921875, 1.25 * 2.0 ** -9]  # the first column's scale is lost
    assert torch.equal(q2, q)
    assert torch.equal(Q.dequantize_rowblocks(q2, s2).view(torch.int16), wbf.view(torch.int16))


def test_rowblocks_general_source_and_edges():
    w = rand((256, 300), seed=13)
    w[:, 7] = 0.0
    w[:, 8] = 1e-40
    q, s = Q.quantize_rowblocks(w, 8)
    sf = s.float().repeat_interleave(32, 0)
    d = Q.dequantize_rowblocks(q, s).float()
    assert torch.isfinite(d).all() and torch.isfinite(sf).all() and (sf > 0).all()
    assert ((d - w).abs() <= sf * 0.5 + w.abs() * 2.0 ** -8).all()
    assert (q[:, 7] == 0).all() and s[0, 7] == 1.0
    with pytest.raises(ValueError, match="not divisible"):
        Q.quantize_rowblocks(w[:100], 8)


# ---------------------------------------------------------------- metrics
def test_error_stats_reference_and_chunked():
    ref = rand((300, 257), seed=14, dtype=torch.bfloat16)
    s = Q.fp8_scales(ref, "block")
    approx = Q.dequantize_fp8(Q.quantize_fp8(ref, s, "block"), s, "block")
    r64, a64 = np32(ref).astype(np.float64), np32(approx).astype(np.float64)
    e = a64 - r64
    st = Q.error_stats(ref, approx)
    assert st["rel_l2"] == pytest.approx(np.linalg.norm(e) / np.linalg.norm(r64), rel=1e-12)
    assert st["sqnr_db"] == pytest.approx(10 * np.log10((r64 ** 2).sum() / (e ** 2).sum()), rel=1e-12)
    assert st["max_abs"] == np.abs(e).max() and st["amax"] == np.abs(r64).max() and st["numel"] == ref.numel()
    acc = Q.ErrorAccumulator()
    for a, b in [(0, 1), (1, 128), (128, 300)]:
        acc.update(ref[a:b], approx[a:b])
    chunked = acc.result()
    for k in ("max_abs", "amax", "numel"):
        assert chunked[k] == st[k]
    for k in ("rel_l2", "sqnr_db"):
        assert chunked[k] == pytest.approx(st[k], rel=1e-12)
    # the converter's fast mode: float32 per-chunk norms; max_abs/amax exact, sums to ~1e-6 relative
    fast = Q.ErrorAccumulator(fast=True)
    for a, b in [(0, 1), (1, 128), (128, 300)]:
        fast.update(ref[a:b], approx[a:b])
    fr = fast.result()
    for k in ("max_abs", "amax", "numel"):
        assert fr[k] == st[k]
    assert fr["rel_l2"] == pytest.approx(st["rel_l2"], rel=1e-5)
    assert fr["sqnr_db"] == pytest.approx(st["sqnr_db"], rel=1e-5)


def test_error_stats_edges():
    z = torch.zeros(4, 4)
    assert Q.error_stats(z, z) == {"rel_l2": 0.0, "sqnr_db": math.inf, "max_abs": 0.0, "amax": 0.0, "numel": 16}
    st = Q.error_stats(z, z + 1)
    assert st["rel_l2"] == math.inf and st["sqnr_db"] == -math.inf
    with pytest.raises(ValueError):
        Q.error_stats(z, torch.zeros(4, 5))


# ---------------------------------------------------------------- scheme registry
def test_schemes_registry():
    assert list(Q.SCHEMES) == ["fp8-tensor", "fp8-channel", "fp8-block", "int8-channel", "int8-group"]
    with pytest.raises(ValueError, match="valid: fp8-tensor, fp8-channel, fp8-block, int8-channel, int8-group"):
        Q.SCHEMES["int4"]
    assert "int4" not in Q.SCHEMES and Q.get_scheme("fp8-block") is Q.SCHEMES["fp8-block"]
    w = rand((200, 300), seed=15, dtype=torch.bfloat16)
    shapes = {"fp8-tensor": (1,), "fp8-channel": (200, 1), "fp8-block": (2, 3), "int8-channel": (200, 1),
              "int8-group": (200, 3)}
    for name, sch in Q.SCHEMES.items():
        s = sch.scales(w)
        assert sch.scale_shape(200, 300) == shapes[name] == tuple(s.shape)
        assert torch.equal(s.to(torch.bfloat16).float(), s)  # BF16 scales: stored == used
        q = sch.quantize(w, s)
        assert q.dtype == (torch.float8_e4m3fn if sch.family == "fp8" else torch.int8)
        assert Q.error_stats(w, sch.dequantize(q, s))["rel_l2"] < (0.04 if sch.family == "fp8" else 0.01)
    assert Q.SCHEMES["fp8-block"].dtypes == {"weight": "F8_E4M3", "weight_scale": "BF16"}
    assert Q.SCHEMES["int8-group"].dtypes == {"weight_packed": "I32", "weight_scale": "BF16", "weight_shape": "I64"}
    assert Q.SCHEMES["int8-group"].weights_args() == {"num_bits": 8, "type": "int", "symmetric": True,
                                                      "group_size": 128, "strategy": "group", "dynamic": False}
    assert Q.SCHEMES["fp8-block"].weights_args()["block_structure"] == [128, 128]
    assert Q.SCHEMES["int8-channel"].input_activations_args() is None


# ---------------------------------------------------------------- compressed-tensors itself
@pytest.fixture(scope="module")
def ct():
    return require("compressed_tensors")


def test_ct_accepts_our_config(ct):
    from compressed_tensors.quantization import QuantizationArgs
    for sch in Q.SCHEMES.values():
        QuantizationArgs(**sch.weights_args())
        if sch.input_activations_args():
            QuantizationArgs(**sch.input_activations_args())


@pytest.mark.parametrize("shape", [(3, 8), (5, 13), (4, 3, 9)])
def test_ct_packing_agrees(ct, shape):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    q = torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(16), dtype=torch.int8)
    assert torch.equal(pack_to_int32(q, 8), Q.pack_int8(q))
    assert torch.equal(unpack_from_int32(Q.pack_int8(q), 8, torch.Size(shape)), q)


@pytest.mark.parametrize("name", list(Q.SCHEMES))
def test_ct_quantize_dequantize_agree(ct, name):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    sch = Q.SCHEMES[name]
    args = QuantizationArgs(**sch.weights_args())
    w = rand((256, 384), seed=17)              # float32: compressed-tensors divides in the weight dtype
    s = Q.fp8_scales(w, sch.strategy, sch.block) if sch.family == "fp8" else Q.int8_scales(w, sch.strategy)
    amax = sch.amax(w)
    ct_s, _ = calculate_qparams(-amax, amax, args)
    assert torch.equal(ct_s.reshape(s.shape), s)
    ours = sch.quantize(w, s)
    theirs = quantize(w, s, None, args, dtype=ours.dtype)
    assert torch.equal(theirs.view(torch.int8), ours.view(torch.int8))
    assert torch.equal(dequantize(ours, s, None, args, dtype=torch.float32), sch.dequantize(ours, s))
