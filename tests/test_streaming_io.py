"""Issue 19's second round: the byte transposes, the fp8 tables, the direct-I/O planned file, the job
pool with its prefetch. Each against an independent expectation: torch's own transpose bit for bit, the
float32 quantizer on the whole matrix, the float64 error sums, the bytes a plain buffered write leaves."""
from __future__ import annotations

import errno
import mmap
import os
import threading

import numpy as np
import pytest
import torch

from grokconv.errors import DiskFullError
from grokconv.formats import atomic, safetensors_io
from grokconv.formats.atomic import PlannedFile, write_planned
from grokconv.quant.fp8 import fp8_scales, quantize_fp8
from grokconv.quant.from_int8 import fp8_from_int8
from grokconv.quant.metrics import ErrorAccumulator
from grokconv.quant.tiles import transpose_into
from grokconv.runtime import run_jobs
from grokconv.tensor import to_torch


# ------------------------------------------------------------------------- transpose_into
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.bfloat16, torch.float32, torch.float64])
def test_transpose_into_moves_every_bit(dtype):
    """Random bit patterns (NaN payloads and signalling NaNs included for the float types), odd shapes,
    strided and misaligned slices: the result is src.t() bit for bit."""
    g = torch.Generator().manual_seed(int(torch.empty(0, dtype=dtype).element_size()))
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty(0, dtype=dtype).element_size()]
    for K, N, c0, c1 in ((64, 64, 0, 64), (520, 1000, 8, 523), (37, 301, 3, 290), (8, 8, 0, 8), (5, 3, 0, 3),
                         (1000, 17, 1, 16), (4096, 96, 0, 96)):
        raw = torch.randint(-2 ** 31, 2 ** 31 - 1, (K * N * 8 // 4 + 8,), generator=g, dtype=torch.int64)
        full = raw.view(torch.uint8)[:K * N * torch.empty(0, dtype=dtype).element_size()].view(dtype).view(K, N)
        src = full[:, c0:c1]
        out = torch.empty(c1 - c0, K, dtype=dtype)
        transpose_into(src, out)
        assert torch.equal(out.view(bits), src.t().contiguous().view(bits)), (dtype, K, N, c0, c1)


def test_transpose_into_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="src"):
        transpose_into(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(4, 8, dtype=torch.int8))


# ------------------------------------------------------------------------- fp8 tables at real tile sizes
@pytest.mark.parametrize("scheme", ["channel", "tensor", "block"])
@pytest.mark.parametrize("K,N,G", [(4096, 520, 8), (1152, 300, 1), (640, 136, 2), (2048, 1024, 8), (1024, 896, 1)])
def test_fp8_from_int8_equals_the_float32_quantizer(scheme, K, N, G):
    """The default tiles (no small_tiles): several column and row tiles, partial ones, groups whose rows
    are not whole 128-blocks, and shapes of whole 128-blocks only (the block scheme's one-pass tiles);
    bytes and scales equal quantize_fp8 on the exact float32 matrix, and the error sums (table-weighted,
    or from the decoded tiles) equal the float64 sums over every element."""
    rng = np.random.default_rng(K + N)
    q = torch.from_numpy(rng.integers(-128, 128, size=(K, N), dtype=np.int8))
    s = torch.from_numpy((rng.random((G, N), dtype=np.float32) * 0.02 + 1e-4)).to(torch.bfloat16)
    s[:, 5] = -s[:, 5]                                                    # a negative scale: -0.0 codes
    w = (q.double() * s.double().repeat_interleave(K // G, dim=0)).t().float().contiguous()   # exact
    ts = torch.tensor([float(w.abs().max()) / 448]).to(torch.bfloat16).float() if scheme == "tensor" else None
    want_s = ts if scheme == "tensor" else fp8_scales(w, scheme, (128, 128), torch.bfloat16)
    want = quantize_fp8(w, want_s, scheme).view(torch.uint8)
    acc = ErrorAccumulator()
    junk = torch.full((N, K), 0x5A, dtype=torch.uint8).view(torch.float8_e4m3fn)   # a reused buffer's old bytes
    got, got_s = fp8_from_int8(q, s, scheme, (128, 128), torch.bfloat16, ts, acc, out=junk)
    assert got.data_ptr() == junk.data_ptr()
    assert torch.equal(got.view(torch.uint8), want)
    if scheme != "tensor":
        assert torch.equal(got_s, want_s)
    exact = ErrorAccumulator().update(w, want.view(torch.float8_e4m3fn).float() *
                                      (want_s if scheme != "block" else
                                       want_s.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]))
    a, b = acc.result(), exact.result()
    assert a["numel"] == b["numel"] == K * N and a["max_abs"] == b["max_abs"] and a["amax"] == b["amax"]
    assert a["rel_l2"] == pytest.approx(b["rel_l2"], rel=1e-6)


@pytest.mark.parametrize("n_cols", [96, 256])
@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("scheme", ["channel", "tensor", "block"])
def test_fp8_from_int8_adversarial_values(scheme, groups, n_cols):
    """Every int8 value in each column, scales from bf16 subnormals to 2**100, fp8 rounding ties and the
    clamp at 448 (test_tiles' adversarial source, called directly: the export sends tensors this small
    to the float32 path, below TABLE_MIN_ROWS); 256 columns are whole blocks (the one-pass tiles)."""
    from test_tiles import adversarial_source
    v = adversarial_source(n_cols=n_cols, groups=groups)
    K, N = v.weight.shape
    q, s = torch.from_numpy(v.weight), to_torch(v.scales)
    w = (q.double() * s.double().repeat_interleave(K // groups, dim=0)).t().float().contiguous()
    ts = torch.tensor([1.0]) if scheme == "tensor" else None
    want_s = ts if scheme == "tensor" else fp8_scales(w, scheme, (128, 128), torch.bfloat16)
    got, got_s = fp8_from_int8(q, s, scheme, (128, 128), torch.bfloat16, ts, ErrorAccumulator())
    assert torch.equal(got.view(torch.uint8), quantize_fp8(w, want_s, scheme).view(torch.uint8))
    if scheme != "tensor":
        assert torch.equal(got_s, want_s)


@pytest.mark.parametrize("over", [1.0, 449.75 / 448, 463.9 / 448, 470 / 448, 600 / 448])
def test_block_tile_clamps_only_where_a_quotient_could_reach_464(over):
    """_quantize_tile against quantize_blockwise with scales ``amax / (448 * over)``: quotients up to 449.75
    (a bf16 scale rounded down) and just under 464 take the one-pass division, which must still give the
    clamped bytes (448); 470 and 600 take the clamp. Errors: the float64 sums of the decoded bytes."""
    from grokconv.quant._blocks import dequantize_blockwise, quantize_blockwise
    from grokconv.quant.from_int8 import _quantize_tile
    g = torch.Generator().manual_seed(7)
    x = (torch.randint(-128, 128, (256, 384), generator=g).float() * 0.01)
    x[0, 0], x[200, 300] = 1.28, -1.28                      # every block's amax: 1.28 at the corners
    amax = x.abs().view(2, 128, 3, 128).amax(dim=(1, 3))
    S = amax / (448 * over)
    want = quantize_blockwise(x, S, 128, 128, 0, -448.0, 448.0, torch.float8_e4m3fn, rounding=False)
    got = torch.empty(256, 384, dtype=torch.float8_e4m3fn)
    acc = ErrorAccumulator()
    _quantize_tile(x, S, amax, 128, 128, got, acc)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert not torch.isnan(got.float()).any()
    exact = ErrorAccumulator().update(x, dequantize_blockwise(want, S, 128, 128, 0, torch.float8_e4m3fn))
    a, b = acc.result(), exact.result()
    assert a["max_abs"] == b["max_abs"] and a["rel_l2"] == pytest.approx(b["rel_l2"], rel=1e-12)


def test_update_counts_ignores_values_that_never_occur():
    acc = ErrorAccumulator().update_counts(torch.tensor([1.0, float("inf"), 2.0]), torch.tensor([1.5, 0.0, 2.0]),
                                           torch.tensor([2, 0, 1]))
    r = acc.result()
    assert r["numel"] == 3 and r["max_abs"] == 0.5 and r["amax"] == 2.0
    assert r["rel_l2"] == pytest.approx((2 * 0.25 / (2 * 1 + 4)) ** 0.5)


def test_a_float_source_stored_as_wanted_is_written_from_the_mapping_itself():
    """bf16 rows to bf16 (the embedding of every conversion): no copy at all, the source's own bytes (NaN
    payloads included); float32 rows to bf16 round as torch's cast does."""
    import ml_dtypes
    from grokconv.export import SourceRows, encode_chunk, encoding_for
    from grokconv.mapping import Target
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 16, size=(64, 96), dtype=np.uint16)
    src = bits.view(ml_dtypes.bfloat16)
    t = Target("e.weight", "e", None, "embedding", False, (64, 96))
    enc = encoding_for("none", "embedding")
    (name, r0, rows), = encode_chunk(enc, SourceRows(src, False, 16, 48, torch.device("cpu")), t, {})[0]
    assert (name, r0) == ("e.weight", 16)
    assert rows.data_ptr() == to_torch(src[16:48]).data_ptr()                # a view of the source
    assert np.array_equal(rows.view(torch.int16).numpy().view(np.uint16), bits[16:48])
    f32 = rng.standard_normal((64, 96)).astype(np.float32)
    (_, _, rows), = encode_chunk(enc, SourceRows(f32, False, 0, 64, torch.device("cpu")), t, {})[0]
    assert torch.equal(rows.view(torch.int16), torch.from_numpy(f32).to(torch.bfloat16).view(torch.int16))


# ------------------------------------------------------------------------- the planned file
def _writes(size: int, seed: int = 0):
    """(offset, bytes) pieces tiling [64, size): lengths around page multiples, odd offsets."""
    rng = np.random.default_rng(seed)
    out, off = [], 64
    while off < size:
        n = int(min(size - off, rng.choice([1, 100, 4095, 4096, 4097, 9000, 3 * 4096 + 17, 70000])))
        out.append((off, rng.integers(0, 256, n, dtype=np.uint8)))
        off += n
    return out


@pytest.mark.parametrize("direct", [True, False])
def test_planned_file_bytes_from_many_threads(tmp_path, monkeypatch, direct):
    """Every byte where it was planned, whichever way it went (direct, bounced, buffered ends)."""
    monkeypatch.setattr(PlannedFile, "BOUNCE", 8192)                    # several buffers per write
    monkeypatch.setattr(PlannedFile, "DIRECT_MIN", 4096)                # and direct from one page up
    monkeypatch.setattr(PlannedFile, "BUFFERS", 3)
    if not direct:
        real_open = os.open
        monkeypatch.setattr(atomic.os, "open", lambda p, flags, *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "no"))
                            if flags & getattr(os, "O_DIRECT", 0) else real_open(p, flags, *a))
    size = 400_000
    pieces = _writes(size)
    want = bytearray(size)
    want[:64] = b"H" * 64
    for off, b in pieces:
        want[off:off + len(b)] = b.tobytes()
    seen = {}

    def fill(f):
        seen["direct"] = f.dfd is not None
        run_jobs(pieces, lambda p: f.pwrite(p[1], p[0]), 3)
    write_planned(tmp_path / "f.bin", size, b"H" * 64, fill)
    monkeypatch.undo()
    assert (tmp_path / "f.bin").read_bytes() == bytes(want)
    assert seen["direct"] == (direct and _takes_direct(tmp_path))


def _takes_direct(d) -> bool:
    """Whether this file system opens files with O_DIRECT (tmpfs does not: then the buffered path runs)."""
    try:
        os.close(os.open(d / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False
    finally:
        (d / "probe").unlink(missing_ok=True)


def test_planned_file_background_error_is_a_full_disk(tmp_path, monkeypatch):
    """ENOSPC in a background direct write: one DiskFullError naming the file, no temporary left."""
    monkeypatch.setattr(PlannedFile, "BOUNCE", 8192)
    monkeypatch.setattr(PlannedFile, "DIRECT_MIN", 4096)
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(atomic.os, "pwrite", pwrite)
    with pytest.raises(DiskFullError, match="f.bin"):
        write_planned(tmp_path / "f.bin", 200_000, b"H", lambda f: [f.pwrite(b, o) for o, b in _writes(200_000)])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- jobs and prefetch
def test_run_jobs_keeps_order_and_hints_every_job():
    hinted, lock = [], threading.Lock()

    def hint(j):
        with lock:
            hinted.append(j)
        if j == 3:
            raise RuntimeError("a failed hint is only a hint")
    assert run_jobs(list(range(20)), lambda j: j * j, 3, prefetch=hint) == [j * j for j in range(20)]
    assert sorted(hinted) == list(range(20))
    with pytest.raises(ZeroDivisionError):
        run_jobs([1, 0, 2], lambda j: 1 // j, 2)


def test_willneed_covers_the_range_in_steps(monkeypatch, tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"\0" * (10 << 20))
    calls = []
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    monkeypatch.setattr(safetensors_io, "_WILLNEED_STEP", 1 << 20)

    class Spy:
        def __init__(self, m):
            self.m = m

        def madvise(self, flag, a, n):
            calls.append((a, n))
            return self.m.madvise(flag, a, n)

        def __len__(self):
            return len(self.m)
    monkeypatch.setattr(safetensors_io.mmap, "mmap", Spy)
    safetensors_io.madvise_willneed(Spy(mm), 5000, (10 << 20) - 6000)
    assert calls[0][0] == 4096 and all(n <= 1 << 20 for _, n in calls)
    assert sum(n for _, n in calls) == (10 << 20) - 1000 - 4096 and all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))
