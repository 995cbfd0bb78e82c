"""The original format: byte layout, safe reading, validation, dequantization, synthesis."""
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
import torch

from grokconv.config import load_preset
from grokconv.errors import (CheckpointFormatError, MissingTensorError, ShapeMismatchError, TruncatedFileError,
                             UnsafePickleError)
from grokconv.formats.base import open_checkpoint
from grokconv.formats.pickle_walk import walk_file
from grokconv.formats.pickle_write import layout_array, layout_quantized
from grokconv.synth import synthesize
from grokconv.tensor import QInt8, dequantize
from pickle_oracle import oracle_dumps

# Real file sizes and payload offsets (grok1-checkpoint.md section 1.4, from a real ckpt-0 listing).
REAL = [
    ("embeddings", lambda: layout_array(np.float32, (131072, 6144)), 3_221_225_637, [151]),
    ("norm", lambda: layout_array(np.float32, (6144,)), 24_727, [146]),
    ("router", lambda: layout_array(np.float32, (6144, 8)), 196_770, [148]),
    ("moe linear/linear_v", lambda: layout_quantized((8, 6144, 32768), (8, 1, 32768)), 1_611_137_347,
     [201, 1_610_613_043]),
    ("moe linear_1", lambda: layout_quantized((8, 32768, 6144), (8, 8, 6144)), 1_611_399_491, [201, 1_610_613_043]),
    ("attn out-proj", lambda: layout_quantized((6144, 6144), (8, 6144)), 37_847_359, [199, 37_749_039]),
    ("attn query", lambda: layout_quantized((6144, 6144), (1, 6144)), 37_761_334, [199, 37_749_039]),
    ("attn key/value", lambda: layout_quantized((6144, 1024), (1, 1024)), 6_293_814, [199, 6_291_759]),
]


@pytest.mark.parametrize("kind,make,size,offsets", REAL, ids=[r[0] for r in REAL])
def test_real_sizes_and_offsets(kind, make, size, offsets):
    lay = make()
    assert lay.size == size
    assert lay.offsets == offsets


def test_real_file_endings():
    # moe files end with their own last frame FRAME(7) ... ; q/k/v close inside one final frame
    moe = layout_quantized((8, 6144, 32768), (8, 1, 32768)).segments[-1]
    assert moe == bytes.fromhex("95 0700000000000000 94 74 94 62 75 62 2e".replace(" ", ""))
    kv = layout_quantized((6144, 1024), (1, 1024))
    after_weight = kv.segments[kv.segments.index(0) + 1]
    assert after_weight[:9] == b"\x95" + (2150).to_bytes(8, "little")
    q = layout_quantized((6144, 6144), (1, 6144))
    assert q.segments[q.segments.index(0) + 1][:9] == b"\x95" + (12390).to_bytes(8, "little")


def _render(lay, arrays):
    return b"".join(arrays[s].tobytes() if isinstance(s, int) else s for s in lay.segments)


@pytest.mark.parametrize("shape", [(4,), (300,), (16383,), (16384,), (16385,), (100, 700), (8, 16, 512)])
def test_array_bytes_equal_cpython_pickler(shape):
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert _render(layout_array(np.float32, shape), [a]) == oracle_dumps(a)


@pytest.mark.parametrize("ws,ss", [((16, 8), (1, 8)), ((256, 256), (8, 256)), ((8, 256, 512), (8, 1, 512)),
                                   ((8, 512, 256), (8, 8, 256)), ((256, 60000), (1, 60000)),
                                   ((65536, 1), (1, 1)), ((8, 256, 16384), (8, 8, 16384))])
def test_quantized_bytes_equal_cpython_pickler(ws, ss):
    rng = np.random.default_rng(2)
    w = rng.integers(-128, 127, ws, dtype=np.int8)
    s = rng.standard_normal(ss).astype(ml_dtypes.bfloat16)
    assert _render(layout_quantized(ws, ss), [w, s]) == oracle_dumps((w, s))


def _std_unpickle(path):
    """What the original loader does (pickle.load), restricted to the release's globals."""
    class QuantizedWeight8bit:
        pass

    class U(pickle.Unpickler):
        def find_class(self, m, n):
            if (m, n) == ("numpy.core.multiarray", "_reconstruct"):
                from numpy._core.multiarray import _reconstruct
                return _reconstruct
            if (m, n) == ("__main__", "QuantizedWeight8bit"):
                return QuantizedWeight8bit
            if (m, n) in (("numpy", "ndarray"), ("numpy", "dtype"), ("ml_dtypes", "bfloat16")):
                return super().find_class(m, n)
            raise pickle.UnpicklingError(f"{m}.{n}")
    with open(path, "rb") as f:
        return U(f).load()


def test_write_read_round_trip_bit_exact(tiny_ckpt):
    from grokconv.synth import synth_value
    r = open_checkpoint(tiny_ckpt)
    cfg = r.config
    for spec in r.specs()[:16]:
        v = r.load(spec.name)
        std = _std_unpickle(r.dir / spec.file)
        if spec.kind == "qw8":
            assert isinstance(v, QInt8) and not v.weight.flags.writeable
            assert np.array_equal(v.weight, std.weight)
            assert np.array_equal(v.scales.view(np.uint16), std.scales.view(np.uint16))
            chunks, scales = synth_value(spec, cfg, 0)
            assert np.array_equal(np.concatenate([c.reshape(-1) for c in chunks]), v.weight.reshape(-1))
            assert np.array_equal(scales.view(np.uint16), v.scales.view(np.uint16))
        else:
            assert v.dtype == np.float32 and np.array_equal(v, std)


def test_listing_reads_no_payload(tiny_ckpt):
    r = open_checkpoint(tiny_ckpt)
    stored = r.stored()
    sizes = sum(os.path.getsize(r.dir / s.file) for s in r.specs())
    payload = sum(t.nbytes for t in stored)
    assert len(stored) == 146
    # every byte read is pickle opcodes; skipped: the array payloads and, once per file, the one-byte
    # b'b' argument of _reconstruct (a bytes literal too, skipped like any payload)
    assert r.bytes_read == sizes - payload - len(stored)


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_hostile_pickle_refused_without_running(tmp_path, tiny_ckpt):
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    sentinel = tmp_path / "pwned"
    target = ck / "ckpt-0" / "tensor00001_000"
    target.write_bytes(pickle.dumps(_Exploit(sentinel), protocol=4))
    with pytest.raises(UnsafePickleError) as e:
        walk_file(target)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert str(target) in str(e.value)
    with pytest.raises(UnsafePickleError):
        open_checkpoint(ck).load("language_model/rms_norm/scale")
    assert not sentinel.exists()
    pickle.loads(target.read_bytes())      # the payload is live: plain pickle would have run it
    assert sentinel.exists()


def test_truncated_missing_extra_and_wrong_shape(tmp_path, tiny_ckpt):
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    d = ck / "ckpt-0"
    f = d / "tensor00005_000"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedFileError, match="tensor00005_000"):
        open_checkpoint(ck).load("transformer/decoder_layer_0/multi_head_attention/key/w")
    f.write_bytes(data)
    (d / "tensor00145_000").rename(d / "moved")
    with pytest.raises(MissingTensorError, match="tensor00145_000"):
        open_checkpoint(ck)
    (d / "moved").rename(d / "tensor00145_000")
    (d / "tensor00146_000").write_bytes(b"")
    with pytest.raises(MissingTensorError, match="tensor00146_000"):
        open_checkpoint(ck)
    (d / "tensor00146_000").unlink()
    # a file from another model size: shape disagrees with the config
    from grokconv.formats.jax import write_param_file
    spec = open_checkpoint(ck).spec("transformer/decoder_layer_0/router/w")
    bad = type(spec)(spec.index, spec.name, (spec.shape[0], 4), "f32", 0, "router")
    write_param_file(d / spec.file, bad, np.zeros((spec.shape[0], 4), np.float32))
    with pytest.raises(ShapeMismatchError, match="router"):
        open_checkpoint(ck).load(spec.name)
    (d / spec.file).write_bytes(data + b"junk")
    with pytest.raises(CheckpointFormatError, match="trailing"):
        walk_file(d / spec.file)


@pytest.mark.parametrize("groups", [1, 8])
def test_dequantization_against_float64(groups):
    rng = np.random.default_rng(3)
    K, N = 64, 24
    q = rng.integers(-127, 128, (K, N), dtype=np.int8)
    s = (rng.lognormal(-6, 1, (groups, N))).astype(ml_dtypes.bfloat16)
    exact = np.empty((K, N))
    for k in range(K):
        for n in range(N):
            exact[k, n] = float(q[k, n]) * float(s[k // (K // groups), n])
    f32 = dequantize(QInt8(q, s), "f32").numpy()
    assert np.array_equal(f32.astype(np.float64), exact)          # int8 x bf16 is exact in float32
    bf = dequantize(QInt8(q, s), "bf16")
    ref = exact.astype(ml_dtypes.bfloat16)                        # one rounding, to nearest even
    assert np.array_equal(bf.view(torch.int16).numpy(), ref.view(np.int16))
    if groups == 8:  # applying only the first block's scales would be wrong
        wrong = dequantize(QInt8(q, np.repeat(s[:1], 8, 0)), "f32").numpy()
        assert not np.array_equal(wrong, f32)


def test_synth_is_deterministic(tmp_path):
    cfg = load_preset("tiny").replace(num_layers=2)
    a, b, c = synthesize(tmp_path / "a", cfg, seed=5), synthesize(tmp_path / "b", cfg, seed=5), \
        synthesize(tmp_path / "c", cfg, seed=6)
    names = sorted(p.name for p in (a / "ckpt-0").iterdir())
    assert len(names) == 26
    assert all((a / "ckpt-0" / n).read_bytes() == (b / "ckpt-0" / n).read_bytes() for n in names)
    assert any((a / "ckpt-0" / n).read_bytes() != (c / "ckpt-0" / n).read_bytes() for n in names)
    r = open_checkpoint(a)
    q = r.load("transformer/decoder_layer_0/moe/linear_1/w")
    assert np.abs(q.weight.astype(np.int16)).max(axis=-2).min() == 127   # absmax-quantized columns
    assert r.load("transformer/decoder_layer_0/rms_norm/scale").dtype == np.float32


def test_inspect_cli(tiny_ckpt):
    import json
    from click.testing import CliRunner
    from grokconv.cli import main
    res = CliRunner().invoke(main, ["inspect", str(tiny_ckpt)])
    assert res.exit_code == 0, res.output
    assert "146 tensors" in res.output and "problems: none" in res.output
    res = CliRunner().invoke(main, ["inspect", "--json", str(tiny_ckpt)])
    rep = json.loads(res.output)
    down = next(t for t in rep["tensors"] if t["name"].endswith("decoder_layer_0/moe/linear_1/w"))
    assert down["quant"]["scale_shape"] == [8, 8, 256] and down["quant"]["blocks"] == 8
    assert rep["totals"]["bytes"] == sum(t["bytes"] for t in rep["tensors"])
