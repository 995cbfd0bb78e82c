"""Original (or any readable checkpoint) -> llama.cpp GGUF, streaming, with a lossless Q8_0; and back.

Independent expectations: llama.cpp's own ``convert_hf_to_gguf.py`` run on our ``keyfan`` export of
the same tiny model (names, shapes, types, metadata), float64 ``int8 * scale`` from the raw release
bytes (data), gguf-py's reader and quantizer (layout, Q8_0 blocks), and the reference forward (parity).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from conftest import require
import torch
from click.testing import CliRunner

from grokconv.cli import main
from grokconv.formats.base import open_checkpoint
from grokconv.gguf_export import REPORT_SUFFIX, plan_gguf, to_gguf
from grokconv.parity import infer_kind, random_tokens, run_parity
from grokconv.quant.q8_0 import Q8Stats, q8_0_from_int8, quantize_q8_0
from grokconv.tensor import QInt8

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = Path(os.environ.get("GROKCONV_LLAMA_CPP_SRC", ROOT / "build" / "llama-cpp" / "llama.cpp"))
TYPES = ["f32", "f16", "bf16", "q8_0"]
# canonical slot -> GGUF name (llama.cpp gguf-py constants.py TENSOR_NAMES, tensor_mapping.py "# Grok")
NAMES = {"multi_head_attention/query/w": "attn_q", "multi_head_attention/key/w": "attn_k",
         "multi_head_attention/value/w": "attn_v", "multi_head_attention/linear/w": "attn_output",
         "rms_norm/scale": "attn_norm", "rms_norm_1/scale": "attn_output_norm", "rms_norm_2/scale": "ffn_norm",
         "rms_norm_3/scale": "layer_output_norm", "router/w": "ffn_gate_inp", "moe/linear/w": "ffn_gate_exps",
         "moe/linear_v/w": "ffn_up_exps", "moe/linear_1/w": "ffn_down_exps"}


def train_tokenizer(tmp: Path, vocab_size: int = 512) -> Path:
    """A SentencePiece BPE model with byte fallback and Grok-1's special ids (pad 0, bos 1, eos 2,
    unk 3), trained here: Grok-1's own tokenizer.model cannot be fetched in CI."""
    spm = require("sentencepiece")
    rng = np.random.default_rng(0)
    words = ["grok", "tensor", "weight", "llama", "model", "scale", "block", "expert", "the", "of", "and", "to"]
    lines = [" ".join(rng.choice(words) + rng.choice(["", "s", "ed", "ing"]) for _ in range(12)) for _ in range(2000)]
    lines.append("".join(chr(c) for c in range(0x20, 0x7F)))
    (tmp / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "tok"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return tmp / "tok.model"


@pytest.fixture(scope="module")
def work(tiny_ckpt, tmp_path_factory):
    """tiny + a trained tokenizer.model beside it, and its GGUF files of every type."""
    tmp = tmp_path_factory.mktemp("gguf")
    src = tmp / "tiny"
    src.mkdir()
    (src / "ckpt-0").symlink_to(tiny_ckpt / "ckpt-0")
    shutil.copy(tiny_ckpt / "grokconv-config.json", src)
    shutil.copy(train_tokenizer(tmp), src / "tokenizer.model")
    files = {}
    for t in TYPES:
        files[t] = tmp / f"tiny-{t}.gguf"
        to_gguf(src, files[t], type=t, progress=False)
    return {"src": src, "tmp": tmp, **files}


def _fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}, r


# -- against llama.cpp's own converter ---------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_reference(work):
    """What llama.cpp's convert_hf_to_gguf.py writes from our keyfan export of the same model."""
    script = LLAMA_CPP / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip(f"llama.cpp's converter not found at {script}: `make llama-cpp-src` takes it from the "
                    "llama-cpp-python sdist on PyPI (or set GROKCONV_LLAMA_CPP_SRC to a llama.cpp checkout)")
    from grokconv.convert import to_safetensors
    kf = work["tmp"] / "kf"
    to_safetensors(work["src"], kf, layout="keyfan", progress=False)
    assert (kf / "tokenizer.model").is_file()
    outs = {t: work["tmp"] / f"llama-{t}.gguf" for t in ("q8_0", "f16")}
    procs = [subprocess.Popen([sys.executable, str(script), str(kf), "--outtype", t, "--outfile", str(o)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for t, o in outs.items()]
    for p in procs:
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log[-3000:]
    return outs


@pytest.mark.parametrize("t", ["q8_0", "f16"])
def test_names_shapes_types_and_metadata_equal_llama_cpp_converter(work, llama_reference, t):
    ours, ro = _fields(work[t])
    theirs, rt = _fields(llama_reference[t])
    # grokconv's own keys (the run's fingerprint) come last; the converter's keys are the rest
    mine = [k for k in ours if k.startswith("grokconv.")]
    assert mine == ["grokconv.fingerprint", "grokconv.source", "grokconv.options"] and list(ours)[-3:] == mine
    ours = {k: v for k, v in ours.items() if k not in mine}
    assert [x.name for x in ro.tensors] and \
        {x.name: (x.tensor_type.name, list(x.shape)) for x in ro.tensors} == \
        {x.name: (x.tensor_type.name, list(x.shape)) for x in rt.tensors}
    assert list(ours) == list(theirs)            # the same keys, in the same order
    differ = {k for k in ours if ours[k] != theirs[k]}
    # general.name is the source directory's name in both (tiny vs kf); Grok-1 has no router cap, so we
    # write 0 where the converter writes its default 30 (llama.cpp reads the key and never uses it)
    assert differ == {"general.name", "grok.router_logit_softcapping"}, differ
    assert ours["grok.router_logit_softcapping"][1] == 0.0
    # F32 for norms and the router, the asked type for the rest (the converter's rule, checked above)
    assert {x.tensor_type.name for x in ro.tensors if x.name.endswith("_norm.weight")} == {"F32"}


def test_tensor_names_are_llama_cpp_grok_names(work):
    _, r = _fields(work["f32"])
    names = {x.name for x in r.tensors}
    arch = gguf.MODEL_ARCH.GROK
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    for n in names:
        base = n.removesuffix(".weight")
        assert any(base == a.format(bid=b) for a in allowed for b in range(12)), n
    assert len(names) == 2 + 12 * 12


def test_metadata_values(work):
    kv, _ = _fields(work["q8_0"])
    v = {k: c for k, (_, c) in kv.items()}
    assert v["general.architecture"] == "grok" and v["general.file_type"] == 7
    assert v["grok.block_count"] == 12 and v["grok.context_length"] == 64 and v["grok.embedding_length"] == 256
    assert v["grok.feed_forward_length"] == 512 and v["grok.attention.head_count"] == 16
    assert v["grok.attention.head_count_kv"] == 8 and v["grok.attention.key_length"] == 16
    assert v["grok.expert_count"] == 8 and v["grok.expert_used_count"] == 2
    assert v["grok.attn_logit_softcapping"] == 30.0 and v["grok.embedding_scale"] == 16.0
    assert v["grok.attention.output_scale"] == 0.25 and np.float32(v["grok.logit_scale"]) == np.float32(3 ** -0.5)
    spm = require("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(work["src"] / "tokenizer.model"))
    assert v["tokenizer.ggml.model"] == "llama" and len(v["tokenizer.ggml.tokens"]) == 512
    assert v["tokenizer.ggml.tokens"][100] == sp.IdToPiece(100)
    assert np.float32(v["tokenizer.ggml.scores"][100]) == np.float32(sp.GetScore(100))
    assert v["tokenizer.ggml.token_type"][:5] == [3, 3, 3, 2, 6]     # pad, bos, eos control; unk; byte
    assert (v["tokenizer.ggml.bos_token_id"], v["tokenizer.ggml.eos_token_id"],
            v["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)


# -- data ---------------------------------------------------------------------------------------------
def _exact(value) -> np.ndarray:
    """float64 int8*scale, canonical [.., in, out]."""
    K, G = value.weight.shape[-2], value.scales.shape[-2]
    return value.weight.astype(np.float64) * np.repeat(value.scales.astype(np.float64), K // G, axis=-2)


def _gguf_tensors(path) -> dict:
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}


def test_data_of_every_type_is_the_exact_product_rounded_once(work, tiny_ckpt):
    src = open_checkpoint(tiny_ckpt)
    files = {t: _gguf_tensors(work[t]) for t in TYPES}
    checked = 0
    for layer in (0, 7, 11):
        for slot, g in NAMES.items():
            name = f"transformer/decoder_layer_{layer}/{slot}"
            v = src.load(name)
            if isinstance(v, QInt8):
                want = np.swapaxes(_exact(v), -1, -2).astype(np.float32)   # exact: int8 * bf16 fits float32
                assert np.array_equal(want.astype(np.float64), np.swapaxes(_exact(v), -1, -2))
            else:
                want = (v.T if v.ndim == 2 else v).astype(np.float32)
            f = {t: files[t][f"blk.{layer}.{g}.weight"] for t in TYPES}
            assert np.array_equal(f["f32"].data, want)
            if want.ndim == 1 or g == "ffn_gate_inp":     # norms and the router stay f32 in every type
                for t in TYPES:
                    assert f[t].tensor_type.name == "F32" and np.array_equal(f[t].data, want)
                continue
            assert np.array_equal(f["f16"].data, want.astype(np.float16))
            assert np.array_equal(f["bf16"].data.view(np.uint16).view(ml_dtypes.bfloat16),
                                  want.astype(ml_dtypes.bfloat16))
            deq = gguf.quants.dequantize(np.asarray(f["q8_0"].data), gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(deq, want), f"{name}: q8_0 is not int8*scale"
            checked += 1
    assert checked == 3 * 7
    # the embedding (float32 in the release): f32 as is, q8_0 the ordinary one, as gguf-py quantizes it
    emb = np.asarray(src.load("language_model/in_out_embed/embeddings"))
    assert np.array_equal(files["f32"]["token_embd.weight"].data, emb)
    assert np.array_equal(np.asarray(files["q8_0"]["token_embd.weight"].data),
                          gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0))


def test_report_counts_blocks(work):
    rep = json.loads(work["q8_0"].with_name(work["q8_0"].stem + REPORT_SUFFIX).read_text())
    n = 12 * (3 * 8 * 512 * 256 + 256 * 256 * 2 + 128 * 256 * 2) // 32
    assert rep["q8_0_lossless_totals"] == {"q8_0_blocks": n, "q8_0_exact_blocks": n, "q8_0_inexact_blocks": 0}
    assert 0 < rep["tensors"]["token_embd.weight"]["rel_l2"] < 0.01


def test_q8_0_from_int8_counts_scales_that_are_not_fp16():
    q = torch.randint(-127, 128, (4, 64), dtype=torch.int8)
    s = torch.tensor([[0.5, 2.0 ** -20], [1e-3, 3.0], [2.0 ** -14, 2.0 ** -20 * 1.0078125], [7.0, 1e-30]]).to(torch.bfloat16)
    st = Q8Stats()
    blocks = q8_0_from_int8(q, s, st).numpy()
    deq = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    exact = q.double().numpy() * np.repeat(s.double().numpy(), 32, axis=1)
    fp16_ok = (s.float().half().float() == s.float()).numpy()        # which scales fp16 holds exactly
    # (fp16 subnormals hold a bf16 down to 2**-24 when its low bits fit: 2**-20 does, 2**-20 * (1 + 2**-7) not)
    assert fp16_ok.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    ok = np.repeat(fp16_ok, 32, axis=1)
    assert np.array_equal(deq[ok], exact[ok])
    assert st.blocks == 8 and st.inexact == 2
    assert st.max_abs_error == pytest.approx(np.abs(deq - exact).max(), rel=1e-6)
    # the ordinary quantizer is gguf-py's, bit for bit
    x = torch.randn(8, 96) * torch.logspace(-6, 2, 8)[:, None]
    x[3, 32:64] = 0
    assert np.array_equal(quantize_q8_0(x).numpy(), gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_q8_0_tiles_are_gguf_py_bit_for_bit(dtype):
    """The tiled quantizer (int16 rounding, several tiles, strided rows) against gguf-py's quantize on
    the rounding cases: exact half-way values k/2 (d = 1), the float just below 0.5, the floats just above
    the halves, zero blocks, magnitudes from 1e-30 to 1e4; blocks with inf, NaN or a 1 / d that overflows
    take the float32 steps
    (compared with those, not with gguf-py, whose casts of NaN and inf to int8 are the platform's)."""
    from grokconv.quant.metrics import ErrorAccumulator
    from grokconv.quant.q8_0 import _quantize_ref, dequantize_q8_0
    g = torch.Generator().manual_seed(1)
    R, K = 600, 1024                                                    # 614,400 values: 3 tiles
    x = torch.randn(R, K, generator=g) * torch.logspace(-30, 4, R)[:, None]
    b = x.view(R, K // 32, 32)
    b[5:8, :, 0] = 127.0                                                # d = 1: y = x exactly
    b[5, :, 1:] = torch.randint(-254, 255, (K // 32, 31), generator=g).float() / 2
    b[6, :, 1:5] = torch.tensor([0.49999997, -0.49999997, 0.5, -0.5])
    b[7, :, 1:] = torch.nextafter(torch.randint(-254, 255, (K // 32, 31), generator=g).float() / 2,
                                  torch.tensor(1e9))
    b[8] = 0
    b[9, 4, 7] = -0.0
    x = x.to(dtype)
    fin = torch.isfinite(x.float()).all(1).numpy()
    assert fin.all()
    want = gguf.quants.quantize(x.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(quantize_q8_0(x).numpy(), want)
    assert np.array_equal(quantize_q8_0(x.t().contiguous().t()).numpy(), want)      # strided rows
    acc = ErrorAccumulator()
    quantize_q8_0(x, acc=acc)
    exact = ErrorAccumulator().update(x.float(), dequantize_q8_0(torch.from_numpy(want), K))
    assert acc.result()["max_abs"] == exact.result()["max_abs"]
    assert acc.result()["rel_l2"] == pytest.approx(exact.result()["rel_l2"], rel=1e-12)
    y = x.float().clone()
    y[10, 70], y[11, 3] = float("inf"), float("nan")
    y[12, :32] = torch.linspace(-1e-38, 1e-38, 32)                      # d ~ 8e-41: 1 / d overflows
    ref = _quantize_ref(y, torch.empty(R, K // 32 * 34, dtype=torch.uint8))
    assert torch.equal(quantize_q8_0(y), ref)


# -- the reader: inspect, parity, to-jax ------------------------------------------------------------
def test_parity_exact_for_f32_and_q8_0_row(work, tiny_ckpt, trained_ckpt, trained_tokens, tmp_path):
    """Lossless GGUF types are exact on the random tiny model; the q8_0 row (lossy: the embedding) is
    judged on the trained model, where its limits were calibrated (grokconv/thresholds.py)."""
    a = open_checkpoint(tiny_ckpt)
    tok = random_tokens(512, 1, 16, seed=3)
    for t, dtype, kind, layers in (("f32", "bf16", "exact", "all"), ("f32", "fp32", "exact", "0-2"),
                                   ("bf16", "bf16", "exact", "0-2"), ("q8_0", "bf16", "q8_0", "all"),
                                   ("f16", "bf16", "q8_0", "0-2")):
        b = open_checkpoint(work[t])
        assert infer_kind(a, b, dtype=dtype) == kind, (t, dtype)
        rep = run_parity(a, b, tok, layers=layers, device="cpu", dtype=dtype, thresholds="auto")
        if kind == "exact":
            assert rep.passed, (t, dtype, rep.failures)
            assert rep.logits.max_abs == 0 and all(s.max_abs == 0 for s in rep.hidden)
        else:
            assert rep.logits.max_abs > 0
    a = open_checkpoint(trained_ckpt)
    for t in ("q8_0", "f16"):
        to_gguf(trained_ckpt, tmp_path / f"tt-{t}.gguf", type=t, progress=False)
        b = open_checkpoint(tmp_path / f"tt-{t}.gguf")
        rep = run_parity(a, b, trained_tokens[0], layers="all", device="cpu", dtype="bf16", thresholds="auto")
        assert rep.kind == "q8_0" and rep.passed and rep.logits.max_abs > 0, (t, rep.failures)


def test_cli_parity_inspect_and_to_jax_take_gguf(work, tiny_ckpt, tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["parity", str(tiny_ckpt), str(work["f32"]), "--layers", "0-3", "--device", "cpu",
                          "--no-progress"])
    assert res.exit_code == 0 and "expect exact" in res.output and "PASS" in res.output, res.output
    res = r.invoke(main, ["inspect", str(work["q8_0"]), "--all"])
    assert res.exit_code == 0 and "blk.11.ffn_down_exps.weight" in res.output and "Q8_0" in res.output, res.output
    # back to the release format from the q8_0 file: the weights' int8 and scales come back byte for byte
    res = r.invoke(main, ["to-jax", str(work["q8_0"]), str(tmp_path / "back"), "--no-progress"])
    assert res.exit_code == 0, res.output
    src = open_checkpoint(tiny_ckpt)
    same = [s.file for s in src.specs()
            if (tiny_ckpt / "ckpt-0" / s.file).read_bytes() == (tmp_path / "back" / "ckpt-0" / s.file).read_bytes()]
    assert len(same) == len(src.specs()) - 1           # all but the embedding (q8_0 of a float table)


def test_from_other_formats(work, tiny_ckpt, tmp_path):
    """The int8 safetensors export gives the same lossless q8_0; a bf16 export gives its bf16 values."""
    from grokconv.convert import to_safetensors
    i8 = tmp_path / "i8"
    to_safetensors(work["src"], i8, quantize="int8", progress=False)
    to_gguf(i8, tmp_path / "i8.gguf", type="q8_0", tokenizer=work["src"] / "tokenizer.model", progress=False)
    a, b = _gguf_tensors(work["q8_0"]), _gguf_tensors(tmp_path / "i8.gguf")
    assert [n for n in a if n != "token_embd.weight" and not np.array_equal(a[n].data, b[n].data)] == []
    hf = tmp_path / "hf"
    to_safetensors(work["src"], hf, layout="hf", progress=False)
    to_gguf(hf, tmp_path / "hf.gguf", type="bf16", progress=False)
    a, b = _gguf_tensors(work["bf16"]), _gguf_tensors(tmp_path / "hf.gguf")
    assert all(np.array_equal(a[n].data, b[n].data) for n in a if n != "token_embd.weight")


# -- split, resume, dry run, errors ------------------------------------------------------------------
def test_split_resume_and_dry_run(work, tmp_path):
    out = tmp_path / "sp.gguf"
    plan = to_gguf(work["src"], out, type="q8_0", max_shard_size="12MB", dry_run=True)
    assert not list(tmp_path.iterdir()) and len(plan.parts) == 4
    assert [p.filename for p in plan.parts] == [f"sp-0000{k}-of-00004.gguf" for k in range(1, 5)]
    s = to_gguf(work["src"], out, type="q8_0", max_shard_size="12MB", progress=False)
    parts = sorted(tmp_path.glob("sp-*.gguf"))
    assert s.shards_written == 4 and len(parts) == 4 and all(p.stat().st_size <= 12e6 + 2e5 for p in parts)
    sizes = {p.name: p.read_bytes() for p in parts}
    first = gguf.GGUFReader(parts[0])
    assert first.fields["split.count"].contents() == 4 and first.fields["split.no"].contents() == 0
    assert first.fields["split.tensors.count"].contents() == 146
    assert gguf.GGUFReader(parts[2]).fields["split.no"].contents() == 2
    # the parts read back as the single file does
    whole = _gguf_tensors(work["q8_0"])
    got = {t.name: t for p in parts for t in gguf.GGUFReader(p).tensors}
    assert got.keys() == whole.keys() and all(np.array_equal(got[n].data, whole[n].data) for n in got)
    rd = open_checkpoint(parts[1])
    assert rd.format == "gguf" and rd.layers == list(range(12))
    # resume: a lost part is rewritten, the others are kept; the result is byte-identical
    parts[2].unlink()
    (tmp_path / (parts[3].name + ".incomplete")).write_bytes(b"junk")
    s = to_gguf(work["src"], out, type="q8_0", max_shard_size="12MB", progress=False)
    assert (s.shards_written, s.shards_skipped) == (1, 3)
    assert {p.name: p.read_bytes() for p in sorted(tmp_path.glob("sp-*.gguf"))} == sizes
    assert not list(tmp_path.glob("*.incomplete"))


def test_no_tokenizer_is_a_clear_error(tiny_ckpt, tmp_path):
    res = CliRunner().invoke(main, ["to-gguf", str(tiny_ckpt), str(tmp_path / "x.gguf")])
    assert res.exit_code == 2 and "no tokenizer.model" in res.output and "--tokenizer" in res.output
    assert not list(tmp_path.iterdir())


def test_cli_to_gguf_with_tokenizer_option(work, tiny_ckpt, tmp_path):
    out = tmp_path / "t.gguf"
    res = CliRunner().invoke(main, ["to-gguf", str(tiny_ckpt), str(out), "--type", "q8_0", "--tokenizer",
                                    str(work["src"] / "tokenizer.model"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "1253376 of 1253376 blocks exact, 0 inexact" in res.output
    a, b = _gguf_tensors(out), _gguf_tensors(work["q8_0"])
    assert a.keys() == b.keys() and all(np.array_equal(a[n].data, b[n].data) for n in a)
