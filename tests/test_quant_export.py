"""fp8 / int8 outputs as engines load them: headers, configs, compressed-tensors' own decompressor,
float64 error bounds, no NaN, the shared device code path, and re-quantization from bf16."""
import json
import math
import re

import numpy as np
import pytest
from conftest import require
import torch
from safetensors import safe_open

import grokconv.convert as conv
from grokconv.convert import INDEX_FILE, REPORT_FILE, to_safetensors
from grokconv.formats.base import open_checkpoint
from grokconv.tensor import QInt8, to_torch

SCHEMES = ["channel", "tensor", "block"]


def _load_all(d):
    idx = json.loads((d / INDEX_FILE).read_text())
    out = {}
    for shard in sorted(set(idx["weight_map"].values())):
        with safe_open(d / shard, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def fp8_exports(tiny_ckpt, tmp_path_factory):
    out = {}
    for scheme in SCHEMES:
        d = tmp_path_factory.mktemp(f"fp8-{scheme}")
        to_safetensors(tiny_ckpt, d, quantize="fp8", fp8_scheme=scheme, progress=False)
        out[scheme] = d
    d = tmp_path_factory.mktemp("fp8-deepseek")
    to_safetensors(tiny_ckpt, d, quantize="fp8", fp8_scheme="block", fp8_format="fp8", progress=False)
    out["deepseek"] = d
    return out


def _exact(src, module_name):
    """float64 exact dequantization of the source behind an hf-layout module, in [out, in]."""
    m = re.match(r"model\.layers\.(\d+)\.(attn|moe_block\.experts\.(\d+))\.(\w+)$", module_name)
    L, _, e, proj = m.groups()
    slot = {"q_proj": "multi_head_attention/query", "k_proj": "multi_head_attention/key",
            "v_proj": "multi_head_attention/value", "o_proj": "multi_head_attention/linear",
            "linear": "moe/linear", "linear_v": "moe/linear_v", "linear_1": "moe/linear_1"}[proj]
    v = src.load(f"transformer/decoder_layer_{L}/{slot}/w", None if e is None else int(e))
    K, G = v.weight.shape[0], v.scales.shape[0]
    w = v.weight.astype(np.float64) * np.repeat(v.scales.astype(np.float64), K // G, axis=0)
    return w.T


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fp8_headers_config_bounds(scheme, fp8_exports, tiny_ckpt):
    d = fp8_exports[scheme]
    t = _load_all(d)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert set(w) <= {"num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "dynamic"}
    assert (w["type"], w["num_bits"], w["strategy"]) == ("float", 8, scheme)
    assert ("block_structure" in w) == (scheme == "block")
    gate = "model.layers.4.moe_block.gate"
    assert any(p.startswith("re:") and re.match(p[3:], gate) for p in qc["ignore"]) and "lm_head" in qc["ignore"]
    assert t[gate + ".weight"].dtype == torch.float32                     # router stays unquantized
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.pre_attn_norm.scale"].dtype == torch.float32
    src = open_checkpoint(tiny_ckpt)
    mods = sorted(k[: -len(".weight_scale")] for k in t if k.endswith(".weight_scale"))
    assert len(mods) == 12 * (4 + 3 * 8)
    for m in mods:
        q, s = t[m + ".weight"], t[m + ".weight_scale"]
        out, inn = q.shape
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.bfloat16
        assert tuple(s.shape) == {"channel": (out, 1), "tensor": (1,),
                                  "block": (math.ceil(out / 128), math.ceil(inn / 128))}[scheme]
        assert torch.isfinite(q.float()).all() and (s.float() > 0).all()
    for m in mods[::7]:                                   # float64 bound per element, every scheme
        q, s = t[m + ".weight"].float().double(), t[m + ".weight_scale"].float().double()
        if scheme == "block":
            s = s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
        deq = (q * s).numpy()
        ref = _exact(src, m)
        sc = np.broadcast_to(s.numpy(), ref.shape)
        assert (np.abs(deq - ref) <= 2.0 ** -4 * np.abs(ref) + sc * 2.0 ** -9 + 1e-30).all(), m
    rep = json.loads((d / REPORT_FILE).read_text())["tensors"]
    r = rep[mods[0] + ".weight"]
    assert set(r) >= {"rel_l2", "sqnr_db", "max_abs", "amax", "scale_min", "scale_max"}
    assert 0 < r["rel_l2"] < 2 ** -4 and r["sqnr_db"] > 20


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_tensors_library_reads_our_fp8(scheme, fp8_exports, tiny_ckpt):
    ct = require("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    d = fp8_exports[scheme]
    qc = QuantizationConfig.model_validate(json.loads((d / "config.json").read_text())["quantization_config"])
    group = qc.config_groups["group_0"]
    sch = QuantizationScheme(targets=group.targets, weights=group.weights, input_activations=group.input_activations)
    comp = BaseCompressor.load_from_registry(qc.format)
    t = _load_all(d)
    ours = open_checkpoint(d)
    assert ours.layout.name == "hf"
    for L, slot, proj in [(0, "multi_head_attention/linear", "attn.o_proj"), (7, "moe/linear_1", None)]:
        name = f"model.layers.{L}." + (proj or "moe_block.experts.3.linear_1")
        got = comp.decompress({"weight": t[name + ".weight"], "weight_scale": t[name + ".weight_scale"]}, sch)
        mine = ours.dense(f"transformer/decoder_layer_{L}/{slot}/w", "f32", None if proj else 3).t()
        assert torch.equal(got["weight"].float(), mine.to(got["weight"].dtype).float()), (scheme, name, ct.__version__)


def test_compressed_tensors_library_reads_our_int8(tiny_ckpt, tmp_path):
    require("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    to_safetensors(tiny_ckpt, tmp_path, quantize="int8", progress=False)
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    g = qc.config_groups["group_0"]
    comp = BaseCompressor.load_from_registry(qc.format)
    t = _load_all(tmp_path)
    src = open_checkpoint(tiny_ckpt)
    name = "model.layers.2.moe_block.experts.6.linear_1"
    sd = {k: t[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
    got = comp.decompress(sd, QuantizationScheme(targets=g.targets, weights=g.weights))["weight"]
    ref = src.dense("transformer/decoder_layer_2/moe/linear_1/w", "bf16", 6).t()
    assert torch.equal(got.to(torch.bfloat16).view(torch.int16), ref.contiguous().view(torch.int16))


def test_deepseek_fp8_format(fp8_exports, tiny_ckpt):
    d = fp8_exports["deepseek"]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert qc["activation_scheme"] == "dynamic"
    t = _load_all(d)
    name = "model.layers.1.moe_block.experts.0.linear"
    q, s = t[name + ".weight"], t[name + ".weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == (math.ceil(q.shape[0] / 128), math.ceil(q.shape[1] / 128))
    # DeepSeek's weight_dequant: each 128x128 tile times its scale
    deq = q.float() * s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
    mine = open_checkpoint(d).dense("transformer/decoder_layer_1/moe/linear/w", "f32", 0).t()
    assert torch.equal(deq, mine)
    assert not any(k.endswith(".weight_scale") for k in t)


def test_fp8_needs_block_for_deepseek_format(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="block"):
        to_safetensors(tiny_ckpt, tmp_path, quantize="fp8", fp8_scheme="channel", fp8_format="fp8", progress=False)


def test_device_staged_path_gives_the_cpu_bytes(tiny_ckpt, tmp_path, monkeypatch):
    """The GPU path stages each slice as torch tensors on the device; run that path on the CPU."""
    def stage_as_tensors(value, device):
        mv = lambda a: to_torch(np.ascontiguousarray(a)).to(device)  # noqa: E731 - what stage() does, minus pinning
        return QInt8(mv(value.weight), mv(value.scales)) if isinstance(value, QInt8) else mv(value)
    for q, extra in (("none", {}), ("int8", {}), ("fp8", {"fp8_scheme": "block"})):
        a, b = tmp_path / f"{q}-a", tmp_path / f"{q}-b"
        to_safetensors(tiny_ckpt, a, quantize=q, layers=[0, 3], progress=False, **extra)
        with monkeypatch.context() as m:
            m.setattr(conv, "stage", stage_as_tensors)
            to_safetensors(tiny_ckpt, b, quantize=q, layers=[0, 3], progress=False, **extra)
        for p in a.glob("*.safetensors"):
            assert p.read_bytes() == (b / p.name).read_bytes(), (q, p.name)


def test_requantize_bf16_source_to_int8(tiny_ckpt, tmp_path):
    """A bf16 model (e.g. fine-tuned) -> compressed-tensors int8 -> dequantized: error within half a step."""
    bf = tmp_path / "bf16"
    to_safetensors(tiny_ckpt, bf, quantize="none", layers=[0, 1], progress=False)
    i8 = tmp_path / "int8"
    s = to_safetensors(bf, i8, quantize="int8", progress=False)
    a, b = open_checkpoint(bf), open_checkpoint(i8)
    t = _load_all(i8)
    for e in (0, 5):
        name = "transformer/decoder_layer_1/moe/linear_1/w"
        x = a.dense(name, "f32", e).t().double()
        y = b.dense(name, "f32", e).t().double()
        scale = t[f"model.layers.1.moe_block.experts.{e}.linear_1.weight_scale"].double()
        gs = x.shape[1] // scale.shape[1]
        assert ((y - x).abs() <= scale.repeat_interleave(gs, 1) * 0.5 * (1 + 2 ** -7) + 1e-12).all()
    rep = s.errors["model.layers.1.moe_block.experts.5.linear_1.weight"]
    assert 0 < rep["rel_l2"] < 0.01


def test_int8_channel_strategy(tiny_ckpt, tmp_path):
    """Per-channel int8: exact for the weights with one scale per column; the row-blocked ones
    (attention output, expert down) are re-quantized per channel, and their error is reported."""
    s = to_safetensors(tiny_ckpt, tmp_path, quantize="int8", int8_scheme="channel", layers=[0, 2], progress=False)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["strategy"], w["group_size"]) == ("channel", None)
    t = _load_all(tmp_path)
    assert tuple(t["model.layers.2.attn.q_proj.weight_scale"].shape) == (256, 1)
    a, b = open_checkpoint(tiny_ckpt), open_checkpoint(tmp_path)
    q = "transformer/decoder_layer_2/multi_head_attention/query/w"
    assert isinstance(b.load(q), QInt8)
    assert np.array_equal(b.load(q).weight, a.load(q).weight)
    o = "transformer/decoder_layer_2/multi_head_attention/linear/w"
    x, y = a.dense(o, "f32"), b.dense(o, "f32")
    assert 0 < float((x - y).norm() / x.norm()) < 0.02
    assert "model.layers.2.attn.o_proj.weight" in s.errors
    assert "model.layers.2.attn.q_proj.weight" not in s.errors      # lossless: nothing to report
