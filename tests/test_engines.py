"""``parity --engine``, the engines' deviations, SGLang's lm_head and the keyfan tokenizer rule."""
import json
import sys

import numpy as np
import pytest
from conftest import require
import torch
from click.testing import CliRunner
from safetensors import safe_open

from grokconv.cli import main
from grokconv.config import load_preset
from grokconv.convert import INDEX_FILE, to_safetensors
from grokconv.errors import EngineUnavailableError
from grokconv.formats.base import open_checkpoint
from grokconv.forward import ENGINE_DEVIATIONS, Semantics, forward
from grokconv.parity import random_tokens, run_engine_parity
from grokconv.synth import synthesize


@pytest.fixture(scope="module")
def hf_export(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("eng") / "hf"
    to_safetensors(tiny_ckpt, d, layout="hf", progress=False)
    return d


def _tensors(d):
    out = {}
    for shard in sorted(set(json.loads((d / INDEX_FILE).read_text())["weight_map"].values())):
        with safe_open(d / shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# -- parity --engine ---------------------------------------------------------------------------------
def test_parity_engine_transformers_cli(tiny_ckpt, hf_export, tmp_path):
    require("transformers")
    rep = tmp_path / "rep.json"
    r = CliRunner().invoke(main, ["parity", str(tiny_ckpt), str(hf_export), "--engine", "transformers",
                                  "--batch", "2", "--seq-len", "8", "--device", "cpu", "--json", str(rep)])
    assert r.exit_code == 0, r.output
    assert "engine transformers" in r.output and "hidden states are not compared" in r.output
    d = json.loads(rep.read_text())
    assert d["passed"] and d["kind"] == "exact" and d["engine"] == "transformers" and d["hidden"] == []
    assert d["logits"] == {"max_abs": 0.0, "kl": 0.0, "top1": 1.0, "top5": 1.0}
    assert d["layers"] == list(range(12)) and d["b"]["engine_version"]


def test_parity_engine_missing_library_is_a_clear_error(tiny_ckpt, hf_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(EngineUnavailableError):
        run_engine_parity(open_checkpoint(tiny_ckpt), hf_export, random_tokens(512, 1, 4), "transformers")
    r = CliRunner().invoke(main, ["parity", str(tiny_ckpt), str(hf_export), "--engine", "transformers"])
    assert r.exit_code == 2 and "error: engine 'transformers' needs" in r.output
    assert "hint: pip install 'grokconv[transformers]'" in r.output


def test_parity_engine_options_and_slices(tiny_ckpt, hf_export, tmp_path):
    r = CliRunner().invoke(main, ["parity", str(tiny_ckpt), str(hf_export), "--engine", "transformers",
                                  "--layers", "0-1"])
    assert r.exit_code == 2 and "--layers does not apply" in r.output
    mid = tmp_path / "mid"
    to_safetensors(tiny_ckpt, mid, layers=[2, 3], progress=False)
    r = CliRunner().invoke(main, ["parity", str(tiny_ckpt), str(mid), "--engine", "transformers"])
    assert r.exit_code == 2 and "layers 0..k-1" in r.output
    first = tmp_path / "first"                               # a slice from layer 0 is a smaller model
    to_safetensors(tiny_ckpt, first, layers=[0, 1], progress=False)
    assert json.loads((first / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((first / "grokconv-config.json").read_text())["num_layers"] == 12
    require("transformers")
    tok = random_tokens(512, 1, 8, seed=0)
    rep = run_engine_parity(open_checkpoint(tiny_ckpt), first, tok, "transformers", device="cpu")
    assert rep.passed and rep.layers == [0, 1] and rep.logits.max_abs == 0.0
    other = tmp_path / "other"                               # same config, other weights: the engine path fails
    synthesize(other, load_preset("tiny"), seed=1)
    rep = run_engine_parity(open_checkpoint(other), first, tok, "transformers", device="cpu")
    assert not rep.passed and rep.logits.max_abs > 1 and rep.logits.top5 < 1.0   # (tiny: top-1 is the input token)


# -- deviations -------------------------------------------------------------------------------------
def test_router_cap_is_the_tanh_cap(tiny_ckpt):
    """A cap far above every router logit is the identity (the switch caps, it does not rescale)."""
    src = open_checkpoint(tiny_ckpt)
    tok = random_tokens(512, 1, 6, seed=2)
    big = Semantics(router_cap=1e6)
    assert (forward(src, tok, layers="0", dtype="fp32", semantics=big).logits
            - forward(src, tok, layers="0", dtype="fp32").logits).abs().max() < 1e-4


def test_deviations_tool_measures_every_row(tiny_ckpt):
    """Every row of ENGINE_DEVIATIONS is a real switch: it changes the logits (max abs > 0)."""
    with pytest.raises(ValueError):
        Semantics(gate_dtype="fp16")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    import deviations
    res = deviations.measure(tiny_ckpt, layers="0", batch=1, seq_len=8)
    assert set(res["engines"]) == set(ENGINE_DEVIATIONS)
    for engine, rows in res["engines"].items():
        assert set(rows) == set(ENGINE_DEVIATIONS[engine])
        for r in rows.values():
            assert r["kl"] >= 0 and 0 <= r["top1"] <= 1 and r["max_abs"] > 0 and r["switches"]


# -- SGLang's lm_head ----------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", ["none", "int8", "fp8"])
def test_sglang_lm_head_is_the_unscaled_bf16_embedding(quantize, tiny_ckpt, tmp_path):
    d = tmp_path / quantize
    to_safetensors(tiny_ckpt, d, layout="sglang", quantize=quantize, progress=False)
    got = _tensors(d)
    emb = np.asarray(open_checkpoint(tiny_ckpt).load("language_model/in_out_embed/embeddings"))
    head = got["lm_head.weight"]
    assert head.dtype == torch.bfloat16 and torch.equal(head, torch.from_numpy(emb.copy()).to(torch.bfloat16))
    assert not any(k.startswith("lm_head.") and k != "lm_head.weight" for k in got)   # never quantized
    qc = json.loads((d / "config.json").read_text()).get("quantization_config")
    if qc:
        assert "lm_head" in qc["ignore"]
    back = open_checkpoint(d)                                 # read back: the copy is accepted and skipped
    assert back.layout.name == "sglang" and not back.problems()
    assert np.array_equal(np.asarray(back.dense("language_model/in_out_embed/embeddings", "f32")),
                          np.asarray(open_checkpoint(tiny_ckpt).dense("language_model/in_out_embed/embeddings",
                                                                      "f32" if quantize == "int8" else "bf16")
                                     .float()))


# -- keyfan needs tokenizer.model ------------------------------------------------------------------------
def test_keyfan_cli_refuses_without_tokenizer(tiny_ckpt, tmp_path):
    dst = tmp_path / "kf"
    r = CliRunner().invoke(main, ["to-safetensors", str(tiny_ckpt), str(dst), "--layout", "keyfan", "--no-progress"])
    assert r.exit_code == 2 and "needs a tokenizer.model" in r.output and "--tokenizer PATH" in r.output
    assert not dst.exists() or not any(dst.iterdir())         # refused before writing anything
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"\x0a\x01spm")
    r = CliRunner().invoke(main, ["to-safetensors", str(tiny_ckpt), str(dst), "--layout", "keyfan", "--tokenizer",
                                  str(tok), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (dst / "tokenizer.model").read_bytes() == tok.read_bytes()
    r = CliRunner().invoke(main, ["to-safetensors", str(tiny_ckpt), str(tmp_path / "hf"), "--no-progress"])
    assert r.exit_code == 0                                    # the other layouts do not need it
