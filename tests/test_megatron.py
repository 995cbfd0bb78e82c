"""Megatron-Core export and import (``to-megatron`` / ``from-megatron``) on the tiny preset.

Expected names, shapes, split dimensions and values are computed here with independent index
arithmetic (not with ``grokconv.sharding``); rank files are opened with plain
``torch.load(weights_only=True)`` so the checks do not go through grokconv's reader either.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from grokconv.config import GrokConfig, load_preset
from grokconv.errors import CheckpointFormatError, LayoutError, OutputMismatchError
from grokconv.formats.base import CheckpointReader, open_checkpoint
from grokconv.megatron import to_megatron

TINY = load_preset("tiny")


# -- helpers (independent of grokconv.sharding) ------------------------------------------------------
def rank_dir(t, p, e, PP, EP):
    name = f"mp_rank_{t:02d}"
    if PP > 1:
        name += f"_{p:03d}"
    if EP > 1:
        name += f"_{e:03d}"
    return name


def load_pt(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def padded(V, TP):
    m = 128 * TP
    return (V + m - 1) // m * m


# the input norm's name is the only one that depends on the layer spec's impl (Megatron-Core
# gpt_layer_specs.py: local spec input_layernorm, TE spec fused into linear_qkv); the post-norms are
# grokconv.mcore.spec's (post-attention: Megatron-Bridge's linear_proj.post_layernorm)
INPUT_NORM = {"local": "input_layernorm.weight",
              "transformer_engine": "self_attention.linear_qkv.layer_norm_weight"}
NORMS = ("self_attention.linear_proj.post_layernorm.weight", "pre_mlp_layernorm.weight",
         "post_mlp_layernorm.weight")


def expected_keys(cfg: GrokConfig, TP, PP, EP, p, untie=False, impl="local"):
    """{key: (shape, dtype)} of one rank file's "model" (no virtual pipeline)."""
    D, F, E, hd = cfg.emb_size, cfg.ffn_size, cfg.num_experts, cfg.key_size
    nq, nkv = cfg.num_q_heads, cfg.num_kv_heads
    out = {}
    if p == 0:
        out["embedding.word_embeddings.weight"] = ((padded(cfg.vocab_size, TP) // TP, D), torch.float32)
    for li in range(cfg.num_layers // PP):
        pre = f"decoder.layers.{li}."
        out[pre + INPUT_NORM[impl]] = ((D,), torch.float32)
        out[pre + "self_attention.linear_qkv.weight"] = (((nq + 2 * nkv) * hd // TP, D), torch.bfloat16)
        out[pre + "self_attention.linear_proj.weight"] = ((D, nq * hd // TP), torch.bfloat16)
        for n in NORMS:
            out[pre + n] = ((D,), torch.float32)
        out[pre + "mlp.router.weight"] = ((E, D), torch.float32)
        for j in range(E // EP):
            out[pre + f"mlp.experts.local_experts.{j}.linear_fc1.weight"] = ((2 * F // TP, D), torch.bfloat16)
            out[pre + f"mlp.experts.local_experts.{j}.linear_fc2.weight"] = ((D, F // TP), torch.bfloat16)
    if p == PP - 1:
        out["decoder.final_layernorm.weight"] = ((D,), torch.float32)
        if untie or PP > 1:
            out["output_layer.weight"] = ((padded(cfg.vocab_size, TP) // TP, D), torch.float32)
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's intra-op threads only add overhead (and stall badly on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def L(i, rest):
    return f"transformer/decoder_layer_{i}/{rest}"


@pytest.fixture(scope="session")
def megatron_dirs(tiny_ckpt, tmp_path_factory):
    """Converted checkpoints, written once per (tp, pp, ep, vp, untie) for the whole session."""
    made = {}

    def get(tp=1, pp=1, ep=1, vp=None, untie=False):
        key = (tp, pp, ep, vp, untie)
        if key not in made:
            dst = tmp_path_factory.mktemp(f"meg_tp{tp}_pp{pp}_ep{ep}_vp{vp}_u{int(untie)}")
            to_megatron(tiny_ckpt, dst, tp=tp, pp=pp, ep=ep, vp=vp, untie=untie, progress=False)
            made[key] = dst
        return made[key]
    return get


@pytest.fixture(scope="session")
def orig(tiny_ckpt):
    return open_checkpoint(tiny_ckpt)


# -- names, shapes, split dimensions, values ----------------------------------------------------------
LAYOUTS = [(1, 1, 1), (2, 1, 1), (4, 2, 2), (8, 1, 8), (2, 2, 4), (8, 2, 1)]


@pytest.mark.parametrize("tp,pp,ep", LAYOUTS)
def test_rank_files_names_shapes_and_splits(megatron_dirs, orig, tp, pp, ep):
    cfg = TINY
    dst = megatron_dirs(tp, pp, ep)
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "release"
    dirs = sorted(d.name for d in (dst / "release").iterdir())
    assert dirs == sorted(rank_dir(t, p, e, pp, ep) for t in range(tp) for p in range(pp) for e in range(ep))
    F, E, V = cfg.ffn_size, cfg.num_experts, cfg.vocab_size
    Q = cfg.q_size
    lpp = cfg.num_layers // pp
    Vp = padded(V, tp)
    emb = orig.dense("language_model/in_out_embed/embeddings", "f32")
    for p in range(pp):
        for e in range(ep):
            for t in range(tp):
                sd = load_pt(dst / "release" / rank_dir(t, p, e, pp, ep) / "model_optim_rng.pt")
                assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 0
                a = sd["args"]
                assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                        a.expert_model_parallel_size) == (tp, pp, ep)
                assert a.padded_vocab_size == Vp and a.params_dtype == torch.bfloat16
                model = sd["model"]
                want = expected_keys(cfg, tp, pp, ep, p)
                assert set(model) == set(want)
                for k, (shape, dtype) in want.items():
                    assert tuple(model[k].shape) == shape and model[k].dtype == dtype, k
                # values along the split dimensions, one layer per rank file
                li = lpp - 1
                g = p * lpp + li
                pre = f"decoder.layers.{li}."
                wo = orig.dense(L(g, "multi_head_attention/linear/w"), "bf16")          # [Q, D]
                n = Q // tp
                assert torch.equal(model[pre + "self_attention.linear_proj.weight"], wo[t * n:(t + 1) * n].T)
                for j in range(E // ep):
                    ge = e * (E // ep) + j
                    w1 = orig.dense(L(g, "moe/linear_1/w"), "bf16", index=ge)          # [F, D]
                    f = F // tp
                    assert torch.equal(model[pre + f"mlp.experts.local_experts.{j}.linear_fc2.weight"],
                                       w1[t * f:(t + 1) * f].T)
                router = orig.dense(L(g, "router/w"), "f32")
                assert torch.equal(model[pre + "mlp.router.weight"], router.T)
                if p == 0:
                    rows = torch.arange(t * Vp // tp, (t + 1) * Vp // tp).clamp(max=V - 1)  # padding repeats row V-1
                    assert torch.equal(model["embedding.word_embeddings.weight"], emb[rows])
                if "output_layer.weight" in model:
                    rows = torch.arange(t * Vp // tp, (t + 1) * Vp // tp).clamp(max=V - 1)
                    assert torch.equal(model["output_layer.weight"], emb[rows])


class KnownReader(CheckpointReader):
    """A checkpoint whose every value says where it came from (exact in bf16: small integers times
    powers of two): column n of q/k/v, row f of an expert's down projection, layer l and expert e."""
    format = "known"

    def __init__(self, path, cfg):
        super().__init__(path, cfg, list(range(cfg.num_layers)))

    @staticmethod
    def s(layer, expert=0):
        return 2.0 ** (8 * layer + expert)

    def load(self, name, index=None):
        spec = self.spec(name)
        cfg = self.config
        D = cfg.emb_size
        layer = spec.layer
        if spec.slot == "language_model/in_out_embed":
            return np.repeat(np.arange(cfg.vocab_size, dtype=np.float32)[:, None], D, 1)
        if spec.slot == "language_model/rms_norm":
            return np.full(D, 7.0, np.float32)
        if spec.slot.startswith("rms_norm"):
            k = 0 if spec.slot == "rms_norm" else int(spec.slot.rsplit("_", 1)[1])
            return (np.arange(D) + 100 * k + 10000 * layer).astype(np.float32)
        if spec.slot == "router":
            return (np.arange(D)[:, None] + 1000 * np.arange(cfg.num_experts)[None]).astype(np.float32)

        def cols(n, f):
            return np.repeat(f(np.arange(n, dtype=np.float64))[None], spec.shape[-2], 0).astype(np.float32)
        s = self.s(layer)
        if spec.slot == "multi_head_attention/query":
            return cols(cfg.q_size, lambda n: (n + 1) * s)
        if spec.slot == "multi_head_attention/key":
            return cols(cfg.kv_size, lambda n: -(n + 1) * s)
        if spec.slot == "multi_head_attention/value":
            return cols(cfg.kv_size, lambda n: (n + 1) / 64 * s)
        if spec.slot == "multi_head_attention/linear":      # [Q, D]: row r
            return np.repeat(((np.arange(cfg.q_size) + 1) * s)[:, None], D, 1).astype(np.float32)
        experts = range(cfg.num_experts) if index is None else [index]
        out = []
        for e in experts:
            se = self.s(layer, e)
            if spec.slot == "moe/linear":
                out.append(cols(cfg.ffn_size, lambda n: (n + 1) * se))
            elif spec.slot == "moe/linear_v":
                out.append(cols(cfg.ffn_size, lambda n: -(n + 1) * se))
            else:                                          # moe/linear_1 [F, D]: row f
                out.append(np.repeat(((np.arange(cfg.ffn_size) + 1) * se)[:, None], D, 1).astype(np.float32))
        return out[0] if index is not None else np.stack(out)


SMALL = GrokConfig(vocab_size=200, emb_size=64, widening_factor=3, key_size=8, num_q_heads=8, num_kv_heads=4,
                   num_layers=4, num_experts=4, num_selected_experts=2, sequence_len=32).validate()


@pytest.mark.parametrize("tp,pp,ep", [(2, 2, 2), (4, 1, 4), (1, 4, 1)])
def test_qkv_interleave_and_fc1_fusion_by_index(tmp_path, tp, pp, ep):
    cfg = SMALL
    to_megatron(KnownReader(tmp_path, cfg), tmp_path / "m", tp=tp, pp=pp, ep=ep, progress=False)
    nq, nkv, hd, F, E, V = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size, cfg.ffn_size, cfg.num_experts, 200
    hpg = nq // nkv
    gpr = nkv // tp                      # query groups per TP rank
    per_group = (hpg + 2) * hd
    lpp = cfg.num_layers // pp
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                model = load_pt(tmp_path / "m/release" / rank_dir(t, p, e, pp, ep) / "model_optim_rng.pt")["model"]
                for li in range(lpp):
                    g_layer = p * lpp + li
                    s = KnownReader.s(g_layer)
                    pre = f"decoder.layers.{li}."
                    qkv = model[pre + "self_attention.linear_qkv.weight"].float()
                    assert qkv.shape == (gpr * per_group, cfg.emb_size)
                    for j in range(qkv.shape[0]):
                        g = t * gpr + j // per_group
                        slot, d = divmod(j % per_group, hd)
                        if slot < hpg:
                            want = ((g * hpg + slot) * hd + d + 1) * s          # query head g*hpg+slot
                        elif slot == hpg:
                            want = -(g * hd + d + 1) * s                          # key of group g
                        else:
                            want = (g * hd + d + 1) / 64 * s                      # value of group g
                        assert torch.all(qkv[j] == want), (t, p, e, li, j)
                    for lj in range(E // ep):
                        se = KnownReader.s(g_layer, e * (E // ep) + lj)
                        fc1 = model[pre + f"mlp.experts.local_experts.{lj}.linear_fc1.weight"].float()
                        f = F // tp
                        assert fc1.shape == (2 * f, cfg.emb_size)
                        for j in range(2 * f):
                            want = (t * f + j + 1) * se if j < f else -(t * f + (j - f) + 1) * se
                            assert torch.all(fc1[j] == want), (t, lj, j)
                        fc2 = model[pre + f"mlp.experts.local_experts.{lj}.linear_fc2.weight"].float()
                        assert torch.equal(fc2, ((torch.arange(f) + t * f + 1) * se).expand(cfg.emb_size, f))
                    proj = model[pre + "self_attention.linear_proj.weight"].float()
                    q = cfg.q_size // tp
                    assert torch.equal(proj, ((torch.arange(q) + t * q + 1) * s).expand(cfg.emb_size, q))
                    for name, k in ((INPUT_NORM["local"], 0), (NORMS[0], 1), (NORMS[1], 2), (NORMS[2], 3)):
                        assert model[pre + name][0].item() == 100 * k + 10000 * g_layer, name
                    assert model[pre + "mlp.router.weight"][3, 5].item() == 5 + 3000
                if p == 0:
                    Vp = padded(V, tp)
                    want = torch.arange(t * Vp // tp, (t + 1) * Vp // tp).clamp(max=V - 1).float()
                    assert torch.equal(model["embedding.word_embeddings.weight"][:, 0], want)


# -- round trips ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp,pp,ep", [(2, 2, 2), (8, 1, 8), (4, 2, 1)])
def test_reader_dense_equals_original_bit_for_bit(megatron_dirs, orig, tp, pp, ep):
    r = open_checkpoint(megatron_dirs(tp, pp, ep))
    assert r.format == "megatron" and r.config == orig.config and r.problems() == []
    for spec in orig.specs():
        a, b = orig.dense(spec.name, "bf16"), r.dense(spec.name, "bf16")
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), spec.name
        if spec.kind == "f32":                       # embeddings, norms, router: stored float32, lossless
            assert torch.equal(orig.dense(spec.name, "f32"), r.dense(spec.name, "f32")), spec.name
    e = orig.config.num_experts - 1
    name = L(3, "moe/linear_v/w")
    assert torch.equal(orig.dense(name, "bf16", index=e), r.dense(name, "bf16", index=e))


def _hf_bytes(d: Path) -> dict:
    """Every shard's header and data bytes; the run's fingerprint (``grokconv.*`` in ``__metadata__``,
    issue 17) names the source, which differs between the two paths by design, so it is left out."""
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header["__metadata__"] = {k: v for k, v in header.get("__metadata__", {}).items()
                                  if not k.startswith("grokconv.")}
        out[p.name] = (header, raw[8 + n:])
    return out | {"index": json.loads((d / "model.safetensors.index.json").read_text())}


@pytest.mark.parametrize("tp,pp,ep,vp,untie", [(2, 2, 4, None, False), (4, 2, 2, 3, True)])
def test_round_trip_to_hf_is_byte_identical(megatron_dirs, tiny_ckpt, tmp_path_factory, tp, pp, ep, vp, untie):
    from grokconv.convert import to_safetensors
    direct = tmp_path_factory.getbasetemp() / "hf_direct"
    if not direct.exists():
        to_safetensors(tiny_ckpt, direct, quantize="none", progress=False)
    via = tmp_path_factory.mktemp("hf_via")
    to_safetensors(megatron_dirs(tp, pp, ep, vp, untie), via, quantize="none", progress=False)
    assert _hf_bytes(via) == _hf_bytes(direct)


# -- virtual pipeline ------------------------------------------------------------------------------------
def test_virtual_pipeline_chunk_layers(megatron_dirs, orig):
    PP, VP, Lyr = 2, 3, TINY.num_layers
    per_chunk = Lyr // (PP * VP)
    dst = megatron_dirs(1, PP, 1, VP)
    for p in range(PP):
        sd = load_pt(dst / "release" / rank_dir(0, p, 0, PP, 1) / "model_optim_rng.pt")
        assert "model" not in sd and sorted(k for k in sd if k.startswith("model")) == ["model0", "model1", "model2"]
        assert sd["args"].virtual_pipeline_model_parallel_size == VP
        assert sd["args"].num_layers_per_virtual_pipeline_stage == per_chunk
        for v in range(VP):
            model = sd[f"model{v}"]
            assert ("embedding.word_embeddings.weight" in model) == (p == 0 and v == 0)
            assert ("decoder.final_layernorm.weight" in model) == (p == PP - 1 and v == VP - 1)
            assert ("output_layer.weight" in model) == (p == PP - 1 and v == VP - 1)
            assert {k.split(".")[2] for k in model if k.startswith("decoder.layers.")} == {"0", "1"}
            for li in range(per_chunk):
                g = v * Lyr // VP + p * per_chunk + li            # get_transformer_layer_offset + local index
                want = orig.dense(L(g, "rms_norm_2/scale"), "f32")
                assert torch.equal(model[f"decoder.layers.{li}.pre_mlp_layernorm.weight"], want), (p, v, li)


def test_chunk_layers_matches_megatron_offsets():
    """The even-split table of Megatron-LM's test_get_layer_offset_parametrized (24 layers, pp 4, vp 2)."""
    from grokconv.sharding import chunk_layers, layer_location
    table = {(0, 0): 0, (0, 1): 12, (1, 0): 3, (1, 1): 15, (2, 0): 6, (2, 1): 18, (3, 0): 9, (3, 1): 21}
    for (p, v), off in table.items():
        assert chunk_layers(24, 4, p, 2, v) == range(off, off + 3)
        for li in range(3):
            assert layer_location(off + li, 24, 4, 2) == (p, v, li)


# -- refusals ----------------------------------------------------------------------------------------
def test_memory_limit_refused_up_front_with_the_figure(tiny_ckpt, tmp_path):
    c = TINY
    D, F, E, Q, KV = c.emb_size, c.ffn_size, c.num_experts, c.q_size, c.kv_size
    per_layer = 4 * D * 4 + E * D * 4 + (Q + 2 * KV) * D * 2 + D * Q * 2 + E * 3 * F * D * 2
    size = padded(c.vocab_size, 1) * D * 4 + D * 4 + c.num_layers * per_layer
    with pytest.raises(LayoutError) as ei:
        to_megatron(tiny_ckpt, tmp_path / "m", memory_limit="1MiB", progress=False)
    msg = str(ei.value)
    assert f"({size} bytes)" in msg and "1.00 MiB" in msg and "mp_rank_00" in msg
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("kw,words", [
    (dict(tp=3), ["8 query groups", "tp=3"]),
    (dict(tp=16), ["8 query groups", "tp=16"]),
    (dict(ep=3), ["8 experts", "ep=3"]),
    (dict(pp=5), ["12 layers", "pp=5"]),
    (dict(pp=2, vp=4), ["12 layers", "pp*vp=8"]),
    (dict(pp=1, vp=2), ["pp > 1"]),
])
def test_bad_parallel_sizes_name_the_numbers(tiny_ckpt, tmp_path, kw, words):
    with pytest.raises(LayoutError) as ei:
        to_megatron(tiny_ckpt, tmp_path / "m", progress=False, **kw)
    for w in words:
        assert w in str(ei.value)


def test_cli_round_trip_and_one_line_error(tiny_ckpt, tmp_path):
    from click.testing import CliRunner
    from grokconv.cli import main
    run = CliRunner().invoke
    res = run(main, ["to-megatron", str(tiny_ckpt), str(tmp_path / "m"), "--tp", "3"])
    assert res.exit_code == 2 and "error: cannot split 8 query groups" in res.output and "Traceback" not in res.output
    res = run(main, ["to-megatron", str(tiny_ckpt), str(tmp_path / "m"), "--tp", "2", "--ep", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = run(main, ["from-megatron", str(tmp_path / "m"), str(tmp_path / "hf"), "--layout", "sglang", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert open_checkpoint(tmp_path / "hf").layout.name == "sglang"


def test_resume_skips_complete_rank_files_and_stray_layouts_are_refused(tiny_ckpt, tmp_path):
    dst = tmp_path / "m"
    to_megatron(tiny_ckpt, dst, tp=2, progress=False)
    s = to_megatron(tiny_ckpt, dst, tp=2, progress=False)
    assert (s.shards_written, s.shards_skipped) == (0, 2)
    # another layout into the same DST: the fingerprint names what differs; --overwrite replaces it whole
    with pytest.raises(OutputMismatchError, match="tp was 2, now 1"):
        to_megatron(tiny_ckpt, dst, tp=1, progress=False)
    s = to_megatron(tiny_ckpt, dst, tp=1, progress=False, overwrite=True)
    assert s.shards_written == 1
    assert sorted(p.name for p in (dst / "release").iterdir()) == ["mp_rank_00"]
    # rank directories that no recorded run made are still refused
    (dst / "release" / "mp_rank_07").mkdir()
    (dst / "release" / "mp_rank_07" / "model_optim_rng.pt").write_bytes(b"x")
    with pytest.raises(LayoutError, match="mp_rank_07"):
        to_megatron(tiny_ckpt, dst, tp=1, progress=False)


def test_torch_dist_rerun_from_another_source_is_refused_and_overwrite_replaces_it(tiny_ckpt, tmp_path):
    from grokconv.config import load_preset
    from grokconv.synth import synthesize
    other = tmp_path / "other"
    synthesize(other, load_preset("tiny"), seed=1)
    dst = tmp_path / "d"
    to_megatron(tiny_ckpt, dst, fmt="torch_dist", progress=False)
    first = {p.name: p.read_bytes() for p in (dst / "release").iterdir() if p.is_file()}
    s = to_megatron(tiny_ckpt, dst, fmt="torch_dist", progress=False)
    assert s.shards_skipped == 1 and s.shards_written == 0
    with pytest.raises(OutputMismatchError, match="source"):
        to_megatron(other, dst, fmt="torch_dist", progress=False)
    to_megatron(other, dst, fmt="torch_dist", progress=False, overwrite=True)
    fresh = tmp_path / "fresh"
    to_megatron(other, fresh, fmt="torch_dist", progress=False)
    again = {p.name: p.read_bytes() for p in (dst / "release").iterdir() if p.is_file()}
    assert again == {p.name: p.read_bytes() for p in (fresh / "release").iterdir() if p.is_file()}
    assert again != first


def test_untied_output_layer_that_differs_is_refused(megatron_dirs, tmp_path):
    import shutil
    src = megatron_dirs(4, 2, 2, 3, True)
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    f = dst / "release" / rank_dir(1, 1, 0, 2, 2) / "model_optim_rng.pt"
    sd = load_pt(f)
    sd["model2"]["output_layer.weight"][5] += 1
    torch.save(sd, f)
    with pytest.raises(CheckpointFormatError, match="output_layer.weight differs"):
        open_checkpoint(dst).load("language_model/in_out_embed/embeddings")


# -- safe loading ------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_hostile_rank_file_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "m" / "release" / "mp_rank_00"
    d.mkdir(parents=True)
    torch.save({"args": argparse.Namespace(x=_Evil()), "model": {}}, d / "model_optim_rng.pt")
    (tmp_path / "m" / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(CheckpointFormatError, match="posix.system|nt.system"):
        open_checkpoint(tmp_path / "m")
    assert not (tmp_path / "PWNED").exists()


def test_megatron_enums_in_args_load_as_inert_stand_ins(megatron_dirs, tmp_path):
    """Real Megatron args carry enums (megatron.core.transformer.enums.AttnBackend): read as stand-ins,
    never imported. With megatron-core installed and imported (the megatron-core engine tests) the real
    enum is pickled; without it, a look-alike class under the same module name."""
    import shutil
    dst = tmp_path / "m"
    shutil.copytree(megatron_dirs(), dst)
    f = dst / "release" / "mp_rank_00" / "model_optim_rng.pt"
    sd = load_pt(f)
    if "megatron.core" in sys.modules:
        from megatron.core.transformer.enums import AttnBackend as Real
        sd["args"].attention_backend = Real.auto
        torch.save(sd, f)
    else:
        mod = types.ModuleType("megatron.core.transformer.enums")

        class AttnBackend:
            def __init__(self, v=0):
                self.v = v

            def __reduce__(self):
                return (AttnBackend, (self.v,))
        AttnBackend.__module__ = mod.__name__
        AttnBackend.__qualname__ = "AttnBackend"
        mod.AttnBackend = AttnBackend
        chain = ["megatron", "megatron.core", "megatron.core.transformer"]
        assert not any(n in sys.modules for n in chain + [mod.__name__])
        fake = {n: types.ModuleType(n) for n in chain} | {mod.__name__: mod}
        sys.modules.update(fake)             # only so pickle can name the class; removed right after
        try:
            sd["args"].attention_backend = AttnBackend(5)
            torch.save(sd, f)
        finally:
            for n in fake:
                del sys.modules[n]
    r = open_checkpoint(dst)
    got = r.args.attention_backend
    if "megatron.core" in sys.modules:
        # megatron/core/safe_globals.py registers its enums with torch's weights_only loader: the real
        # enum comes back, through torch's allow-list, not ours
        assert got is Real.auto
    else:
        assert got.args == (5,) and type(got).__module__ != mod.__name__
    assert torch.equal(r.dense("language_model/rms_norm/scale", "f32"),
                       open_checkpoint(megatron_dirs()).dense("language_model/rms_norm/scale", "f32"))


def test_detects_root_and_release_dir(megatron_dirs):
    d = megatron_dirs(2, 1, 1)
    assert open_checkpoint(d).format == "megatron"
    assert open_checkpoint(d / "release").format == "megatron"
    assert math.prod(open_checkpoint(d).load("language_model/in_out_embed/embeddings").shape) == \
        TINY.vocab_size * TINY.emb_size


def test_read_block_is_a_block_of_the_reference_dequantization(orig, monkeypatch):
    """Row-chunked, row-block-scaled dequantization of a slice == the slice of tensor.dequantize."""
    import grokconv.formats.megatron.layout as gm
    monkeypatch.setattr(gm, "_DEQUANT_CHUNK", 1000)           # force many chunks, crossing scale blocks
    for name, index in ((L(2, "moe/linear_1/w"), 5), (L(2, "multi_head_attention/linear/w"), None),
                        (L(2, "multi_head_attention/query/w"), None)):
        full = orig.dense(name, "bf16", index=index)
        rows, cols = slice(37, full.shape[0] - 11), slice(3, full.shape[1] - 5)
        got = gm.read_block(orig, name, index, rows, cols)
        assert torch.equal(got.view(torch.int16), full[rows, cols].contiguous().view(torch.int16)), name


def test_transformer_impl_names_the_input_norm_and_both_read_back(tiny_ckpt, orig, tmp_path):
    """--transformer-impl picks the input norm's name from the mapping data; the reader takes either."""
    from click.testing import CliRunner
    from grokconv.cli import main
    d = tmp_path / "te"
    res = CliRunner().invoke(main, ["to-megatron", str(tiny_ckpt), str(d), "--format", "torch", "--tp", "2",
                                    "--transformer-impl", "transformer_engine", "--no-progress"])
    assert res.exit_code == 0, res.output
    for t in range(2):
        sd = load_pt(d / "release" / rank_dir(t, 0, 0, 1, 1) / "model_optim_rng.pt")
        assert set(sd["model"]) == set(expected_keys(TINY, 2, 1, 1, 0, impl="transformer_engine"))
        assert sd["args"].transformer_impl == "transformer_engine"
    r = open_checkpoint(d)
    assert r.impl == "transformer_engine" and r.problems() == []
    name = L(4, "rms_norm/scale")
    assert torch.equal(r.dense(name, "f32"), orig.dense(name, "f32"))
    to_megatron(tiny_ckpt, tmp_path / "local", progress=False)
    local = open_checkpoint(tmp_path / "local")
    assert local.impl == "local" and torch.equal(local.dense(name, "f32"), orig.dense(name, "f32"))
    with pytest.raises(LayoutError, match="unknown transformer impl 'te'"):
        to_megatron(tiny_ckpt, tmp_path / "bad", transformer_impl="te", progress=False)
