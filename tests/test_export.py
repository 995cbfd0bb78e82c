"""Original -> HF safetensors (three layouts, bf16 / lossless int8) -> original, streaming and resumable."""
import json
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from grokconv.convert import INDEX_FILE, to_safetensors
from grokconv.errors import GrokconvError
from grokconv.formats.base import open_checkpoint
from grokconv.jax_export import to_jax
from grokconv.mapping import load_layout

LAYOUTS = ["hf", "keyfan", "sglang"]
# Expected names of layer 3, expert 5 and the globals, spelled out per layout (peer-converters.md).
NAMES = {
    "hf": ["model.embed_tokens.weight", "model.norm.scale", "model.layers.3.attn.q_proj.weight",
           "model.layers.3.attn.o_proj.weight", "model.layers.3.moe_block.gate.weight",
           "model.layers.3.moe_block.experts.5.linear.weight", "model.layers.3.moe_block.experts.5.linear_v.weight",
           "model.layers.3.moe_block.experts.5.linear_1.weight", "model.layers.3.pre_attn_norm.scale",
           "model.layers.3.post_attn_norm.scale", "model.layers.3.pre_moe_norm.scale",
           "model.layers.3.post_moe_norm.scale"],
    "keyfan": ["transformer.in_out_embed.weight", "transformer.rms_norm.weight",
               "transformer.decoder_layer.3.multi_head_attention.query.weight",
               "transformer.decoder_layer.3.multi_head_attention.linear.weight",
               "transformer.decoder_layer.3.router.weight", "transformer.decoder_layer.3.moe.5.linear.weight",
               "transformer.decoder_layer.3.moe.5.linear_v.weight", "transformer.decoder_layer.3.moe.5.linear_1.weight",
               "transformer.decoder_layer.3.rms_norm.weight", "transformer.decoder_layer.3.rms_norm_1.weight",
               "transformer.decoder_layer.3.rms_norm_2.weight", "transformer.decoder_layer.3.rms_norm_3.weight"],
    "sglang": ["model.embed_tokens.weight", "model.norm.weight", "model.layers.3.self_attn.q_proj.weight",
               "model.layers.3.self_attn.o_proj.weight", "model.layers.3.block_sparse_moe.gate.weight",
               "model.layers.3.block_sparse_moe.experts.5.w1.weight",
               "model.layers.3.block_sparse_moe.experts.5.w3.weight",
               "model.layers.3.block_sparse_moe.experts.5.w2.weight", "model.layers.3.pre_attn_norm.weight",
               "model.layers.3.post_attn_norm.weight", "model.layers.3.pre_moe_norm.weight",
               "model.layers.3.post_moe_norm.weight"],
}
CANON = ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale",
         "multi_head_attention/query/w", "multi_head_attention/linear/w", "router/w", "moe/linear/w", "moe/linear_v/w",
         "moe/linear_1/w", "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale"]


def _canon(c):
    return c if c.startswith("language_model") else f"transformer/decoder_layer_3/{c}"


def _ref_bf16(q, s):
    """Reference dequantization in float64 then one rounding to bf16, target layout [out, in]."""
    K, G = q.shape[0], s.shape[0]
    w = q.astype(np.float64) * np.repeat(s.astype(np.float64), K // G, axis=0)
    return w.T.astype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def exports(tiny_ckpt, tmp_path_factory):
    out = {}
    for lay in LAYOUTS:
        for q in ("none", "int8"):
            d = tmp_path_factory.mktemp(f"{lay}-{q}")
            to_safetensors(tiny_ckpt, d, layout=lay, quantize=q, max_shard_size="12MB", progress=False)
            out[lay, q] = d
    return out


def _tensors(d):
    idx = json.loads((d / INDEX_FILE).read_text())
    got = {}
    for shard in sorted(set(idx["weight_map"].values())):
        with safe_open(d / shard, "pt") as f:       # the safetensors library validates every header
            for k in f.keys():
                got[k] = f.get_tensor(k)
    return idx, got


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_export_names_values_index_config(layout, exports, tiny_ckpt):
    d = exports[layout, "none"]
    idx, got = _tensors(d)
    src = open_checkpoint(tiny_ckpt)
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1                   # sharded by --max-shard-size
    assert set(idx["weight_map"]) == set(got)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    cfg = src.config
    lm_head = layout == "sglang"                                                # SGLang's untied lm_head copy
    assert len(got) == 2 + lm_head + cfg.num_layers * (4 + 4 + 1 + 3 * cfg.num_experts)  # q k v o, 4 norms, router, experts
    for name, c in zip(NAMES[layout], CANON):
        assert name in got, name
        v = src.load(_canon(c), 5 if "moe/" in c else None)
        t = got[name]
        if hasattr(v, "scales"):                                                  # quantized linear -> bf16
            assert t.dtype == torch.bfloat16
            assert np.array_equal(t.view(torch.int16).numpy(), _ref_bf16(v.weight, v.scales).view(np.int16))
        elif c.endswith("embeddings"):
            assert t.dtype == torch.bfloat16 and torch.equal(t, torch.from_numpy(v.copy()).to(torch.bfloat16))
        else:                                                                     # norms, router: float32
            ref = v.T if c.endswith("router/w") else v
            assert t.dtype == torch.float32 and np.array_equal(t.numpy(), ref)
    hf = json.loads((d / "config.json").read_text())
    assert hf["hidden_act"] == "gelu_pytorch_tanh" and hf["rope_theta"] == 10000.0
    assert hf["max_position_embeddings"] == cfg.sequence_len and hf["tie_word_embeddings"] is True
    assert hf["embedding_multiplier_scale"] == cfg.embedding_multiplier_scale
    assert hf["output_multiplier_scale"] == cfg.output_multiplier_scale
    assert hf["attn_output_multiplier"] == cfg.attn_output_multiplier
    assert hf["architectures"] == {"hf": ["Grok1ModelForCausalLM"], "keyfan": ["GrokForCausalLM"],
                                   "sglang": ["Grok1ForCausalLM"]}[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backwards_every_layout(layout, exports, tiny_ckpt):
    a, b = open_checkpoint(tiny_ckpt), open_checkpoint(exports[layout, "none"])
    assert b.layout.name == layout and b.config == a.config
    for spec in a.specs():
        assert torch.equal(a.dense(spec.name, "bf16").view(-1).float(), b.dense(spec.name, "bf16").view(-1).float())


def _unpack_ct(packed: np.ndarray, scale: np.ndarray, shape) -> np.ndarray:
    """compressed-tensors pack-quantized 8-bit, independently: bytes little-endian in int32, value q+128."""
    out, inn = shape
    u8 = packed.astype("<i4").view(np.uint8).reshape(out, -1)[:, :inn]
    q = u8.astype(np.int16) - 128
    gs = inn // scale.shape[1]
    return q.astype(np.float64) * np.repeat(scale.astype(np.float64), gs, axis=1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_lossless(layout, exports, tiny_ckpt, tmp_path):
    d = exports[layout, "int8"]
    idx, got = _tensors(d)
    hf = json.loads((d / "config.json").read_text())
    qc = hf["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert w == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                 "dynamic": False}   # tiny: o_proj row blocks are 256/8 = 32 rows
    src = open_checkpoint(tiny_ckpt)
    name = NAMES[layout][7].removesuffix(".weight")                               # expert 5 down projection
    v = src.load(_canon("moe/linear_1/w"), 5)
    assert got[name + ".weight_packed"].dtype == torch.int32
    assert got[name + ".weight_shape"].tolist() == [v.weight.shape[1], v.weight.shape[0]]
    deq = _unpack_ct(got[name + ".weight_packed"].numpy(), got[name + ".weight_scale"].float().numpy(),
                     got[name + ".weight_shape"].tolist())
    assert np.array_equal(deq.astype(ml_dtypes.bfloat16).view(np.int16), _ref_bf16(v.weight, v.scales).view(np.int16))
    emb = got[NAMES[layout][0]]
    assert emb.dtype == torch.float32 and np.array_equal(emb.numpy(), src.load(CANON[0]))   # nothing lost
    # and back to the original format: byte-identical files
    back = tmp_path / "back"
    to_jax(d, back, progress=False)
    names = sorted(p.name for p in (tiny_ckpt / "ckpt-0").iterdir())
    assert names == sorted(p.name for p in (back / "ckpt-0").iterdir())
    for n in names:
        assert (back / "ckpt-0" / n).read_bytes() == (tiny_ckpt / "ckpt-0" / n).read_bytes(), n


def test_bf16_back_to_jax_recovers_the_original_int8(exports, tiny_ckpt, tmp_path):
    """bf16(int8 * scale) re-quantized with the source's scale structure gives back the very int8 and
    scales when each block column reaches 127 (as absmax quantization leaves it): byte-identical files,
    but for the float32 embeddings, which went through bf16."""
    s = to_jax(exports["hf", "none"], tmp_path / "j", progress=False)
    assert s.tensors == 146
    names = sorted(p.name for p in (tiny_ckpt / "ckpt-0").iterdir())
    differ = [n for n in names if (tmp_path / "j" / "ckpt-0" / n).read_bytes() != (tiny_ckpt / "ckpt-0" / n).read_bytes()]
    assert differ == ["tensor00000_000"]
    rep = json.loads((tmp_path / "j" / "grokconv-report.json").read_text())["tensors"]
    assert rep["transformer/decoder_layer_2/moe/linear_1/w"]["rel_l2"] == 0.0
    assert "bfloat16" in rep["language_model/in_out_embed/embeddings"]["note"]


def test_perturbed_bf16_back_to_jax_reports_the_error(tiny_ckpt, tmp_path):
    """A bf16 model that is not a dequantized int8 (say, fine-tuned) is re-quantized with G = 8 row
    blocks kept, and the error against it is reported."""
    from grokconv.formats.safetensors_io import SafetensorsFile
    src = tmp_path / "bf16"
    to_safetensors(tiny_ckpt, src, layout="hf", progress=False)
    for shard in src.glob("model-*.safetensors"):   # perturb every weight in place: a "fine-tune"
        f = SafetensorsFile(shard)
        data = bytearray(shard.read_bytes())
        for name, t in f.tensors.items():
            if t.dtype == "BF16" and "experts" in name:
                a = np.frombuffer(data, np.uint16, t.nbytes // 2, f.data_start + t.begin)
                a[::3] ^= 1                            # flip the lowest mantissa bit of every third value
        shard.write_bytes(bytes(data))
    s = to_jax(src, tmp_path / "j", progress=False)
    a, b = open_checkpoint(tiny_ckpt), open_checkpoint(tmp_path / "j")
    spec = a.spec("transformer/decoder_layer_2/moe/linear_1/w")
    assert b.load(spec.name).scales.shape == spec.scale_shape                      # G = 8 row blocks kept
    x, y = a.dense(spec.name, "f32"), b.dense(spec.name, "f32")
    rel = float((x - y).norm() / x.norm())
    assert 0 < rel < 0.01
    assert 0 < s.errors[spec.name]["rel_l2"] < 0.01


def test_dry_run_and_deterministic_bytes(tiny_ckpt, tmp_path):
    plan = to_safetensors(tiny_ckpt, tmp_path / "x", dry_run=True, max_shard_size="10MB")
    assert not (tmp_path / "x").exists()
    assert len(plan.shards) > 1 and sum(len(s.tensors) for s in plan.shards) == 398
    for run in ("a", "b"):
        to_safetensors(tiny_ckpt, tmp_path / run, layers=[0, 10], progress=False)
    for p in (tmp_path / "a").rglob("*"):          # the .grokconv record too: it holds no run-specific bytes
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()
    r = open_checkpoint(tmp_path / "a")
    assert r.layers == [0, 10]


def test_kill_and_resume_gives_identical_bytes(tiny_ckpt, tmp_path):
    full = tmp_path / "full"
    to_safetensors(tiny_ckpt, full, max_shard_size="4MB", progress=False)
    part = tmp_path / "part"
    code = ("import sys, time, grokconv.convert as c; orig = c._run_job\n"
            "def slow(*a, **k):\n    time.sleep(0.01); return orig(*a, **k)\n"
            "c._run_job = slow\n"
            f"c.to_safetensors({str(tiny_ckpt)!r}, {str(part)!r}, max_shard_size='4MB', progress=False, workers=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline and len(list(part.glob("model-*.safetensors"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = list(part.glob("model-*.safetensors"))
    assert 3 <= len(finished) < len(list(full.glob("model-*.safetensors")))
    assert not (part / INDEX_FILE).exists()                        # nothing looks complete
    for p in finished:                                             # every file under its final name is whole
        assert p.read_bytes() == (full / p.name).read_bytes()
    before = {p.name: p.stat().st_mtime_ns for p in finished}
    s = to_safetensors(tiny_ckpt, part, max_shard_size="4MB", progress=False)
    assert s.shards_skipped == len(finished)
    assert all((part / n).stat().st_mtime_ns == t for n, t in before.items())   # not redone
    assert sorted(p.name for p in part.iterdir()) == sorted(p.name for p in full.iterdir())
    for p in full.rglob("*"):                                      # the .grokconv record as well
        if p.is_file():
            assert p.read_bytes() == (part / p.relative_to(full)).read_bytes(), p.name


def test_corrupt_source_clear_error_and_no_complete_output(tiny_ckpt, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    f = src / "ckpt-0" / "tensor00100_000"
    f.write_bytes(f.read_bytes()[:-100])
    from click.testing import CliRunner
    from grokconv.cli import main
    res = CliRunner().invoke(main, ["to-safetensors", str(src), str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code != 0
    assert "tensor00100_000" in res.output
    assert not (tmp_path / "out" / INDEX_FILE).exists()
    assert not list((tmp_path / "out").glob("*.incomplete"))
    with pytest.raises(GrokconvError):
        to_safetensors(src, tmp_path / "out2", progress=False)


def test_mapping_runs_backwards_for_every_name(tiny_ckpt):
    src = open_checkpoint(tiny_ckpt)
    for lay in LAYOUTS:
        layout = load_layout(lay)
        for t in layout.plan(src.config):
            entry, canonical, index = layout.parse(t.name)
            assert canonical == t.source and index == t.index
