"""Every HF-style export loads in the real transformers (``trust_remote_code``), strictly, and computes
what our reference forward computes on the source.

Tolerances (measured on the tiny model, 12 layers, these tokens):
* bf16: bit-exact (max abs 0). The modeling file runs the reference's operations in the reference's
  order and dtypes (bf16 projections, f32 norms / RoPE / softmax / router / expert products, the
  vocab-chunked output projection), and the bf16 export holds exactly the reference's bf16 weights.
* fp32 against the reference on the same export: 4.1e-5 max abs at |logits| <= 37 (1.1e-6 relative):
  float32 sums taken in another order (``nn.Linear`` on ``[out, in]`` weights against ``x @ W`` on the
  canonical ``[in, out]``), over 12 layers; the limit is 1e-3. Against the source in fp32 the export's
  bf16 weights differ from the exact ``int8 * scale`` by one bf16 rounding, so only the next-token
  distribution is compared there.
* compressed-tensors int8 through transformers' own loader (pack-quantized, decompressed on the CPU):
  bit-exact in bf16 as well. fp8 e4m3 (float-quantized, per channel) loads and runs; against the
  reference on the source it is judged by parity's fp8 row (measured: KL 1.5e-10, top-1 1.0, top-5 0.80).
"""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from grokconv.convert import HF_CODE_FILES, INDEX_FILE, to_safetensors  # noqa: E402
from grokconv.formats.base import open_checkpoint  # noqa: E402
from grokconv.forward import forward  # noqa: E402
from grokconv.parity import compare_logits, random_tokens  # noqa: E402
from grokconv.thresholds import THRESHOLDS  # noqa: E402

LAYOUTS = ["hf", "keyfan", "sglang"]
CLASSES = {"hf": ("Grok1Config", "Grok1ModelForCausalLM"), "keyfan": ("GrokConfig", "GrokForCausalLM"),
           "sglang": ("Grok1Config", "Grok1ModelForCausalLM")}


@pytest.fixture(scope="module")
def exports(tiny_ckpt, tmp_path_factory):
    out = {}
    for lay in LAYOUTS:
        out[lay] = tmp_path_factory.mktemp(f"tf-{lay}")
        to_safetensors(tiny_ckpt, out[lay], layout=lay, progress=False)
    return out


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(512, batch=2, seq_len=12, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tokens):
    src = open_checkpoint(tiny_ckpt)
    return {dt: forward(src, tokens, dtype=dt).logits for dt in ("bf16", "fp32")}


def _load(path, dtype):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, dtype=dtype, output_loading_info=True)
    return model.eval(), info


def _stored_names(path):
    idx = json.loads((path / INDEX_FILE).read_text())
    names = set()
    for shard in sorted(set(idx["weight_map"].values())):
        with safe_open(path / shard, "pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_fields(layout, exports, tiny_ckpt):
    d = exports[layout]
    for fn in HF_CODE_FILES:
        assert (d / fn).is_file()
    cfg = open_checkpoint(tiny_ckpt).config
    c = transformers.AutoConfig.from_pretrained(str(d), trust_remote_code=True)
    assert type(c).__name__ == CLASSES[layout][0]
    raw = json.loads((d / "config.json").read_text())
    assert raw["auto_map"]["AutoModelForCausalLM"] == f"modeling_grok1.{CLASSES[layout][1]}"
    expect = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_size, "intermediate_size": cfg.ffn_size,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_q_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.key_size, "rope_theta": cfg.rope_base,
              "rms_norm_eps": cfg.rms_norm_eps, "attn_output_multiplier": cfg.attn_output_multiplier,
              "embedding_multiplier_scale": cfg.embedding_multiplier_scale,
              "output_multiplier_scale": cfg.output_multiplier_scale, "max_attn_value": cfg.max_attn_value,
              "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_selected_experts,
              "max_position_embeddings": cfg.sequence_len, "hidden_act": "gelu_pytorch_tanh",
              "pad_token_id": cfg.pad_token, "bos_token_id": cfg.bos_token, "eos_token_id": cfg.eos_token,
              "tie_word_embeddings": True, "router_logit_softcapping": 0.0, "moe_router_renormalize": False}
    got = {k: getattr(c, k) for k in expect}
    assert got == expect
    if layout == "hf":   # written into the file itself: vLLM 0.24 reads them from config.json
        assert raw["router_logit_softcapping"] == 0.0 and raw["moe_router_renormalize"] is False


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strict_load_and_logits_bf16(layout, exports, tokens, reference):
    d = exports[layout]
    model, info = _load(d, torch.bfloat16)
    assert not any(info.values()), info
    params = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert params == _stored_names(d)                        # one to one, nothing tied away or left out
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {dtypes[n] for n in dtypes if "norm" in n or n.endswith(("gate.weight", "router.weight"))} == {torch.float32}
    with torch.inference_mode():
        lg = model(input_ids=tokens, use_cache=False).logits
    assert lg.dtype == torch.float32 and lg.shape == reference["bf16"].shape
    assert torch.equal(lg, reference["bf16"]), (lg - reference["bf16"]).abs().max()


def test_fp32_logits_and_generate(exports, tokens, reference):
    d = exports["hf"]
    model, info = _load(d, torch.float32)
    assert not any(info.values()), info
    with torch.inference_mode():
        lg = model(input_ids=tokens, use_cache=False).logits
    same_weights = forward(open_checkpoint(d), tokens, dtype="fp32").logits
    assert (lg - same_weights).abs().max() <= 1e-3
    st = compare_logits(reference["fp32"], lg)               # source: exact int8 * scale weights
    assert st.top1 == 1.0 and st.kl < 1e-6, st
    # generate with the KV cache: each new token is the argmax of the reference at the position before it
    # (one causal reference forward over the whole generated sequence gives every prefix's logits)
    prompt = tokens[:1, :5]
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], prompt)
    ref = forward(open_checkpoint(d), out, dtype="fp32").logits[0]
    assert out[0, 5:].tolist() == ref[4:8].argmax(-1).tolist()


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_compressed_tensors_through_transformers(quantize, tiny_ckpt, tmp_path, tokens, reference):
    """transformers' own compressed-tensors loader (decompresses on the CPU) on our int8 / fp8 exports."""
    pytest.importorskip("compressed_tensors")
    d = tmp_path / quantize
    to_safetensors(tiny_ckpt, d, layout="sglang" if quantize == "int8" else "hf", quantize=quantize, progress=False)
    model, info = _load(d, torch.bfloat16)
    assert not any(info.values()), info
    with torch.inference_mode():
        lg = model(input_ids=tokens, use_cache=False).logits
    if quantize == "int8":   # lossless: the original int8 and scales, decompressed to the reference's bf16
        assert torch.equal(lg, reference["bf16"]), (lg - reference["bf16"]).abs().max()
    else:                    # e4m3 per channel: within parity's fp8 row (compressed-tensors dequantizes in bf16,
        th = THRESHOLDS["fp8"]   # our reader in f32, so even against the same export the bits differ)
        st = compare_logits(reference["bf16"], lg)
        assert st.kl <= th.max_kl and st.top1 >= th.min_top1 and st.top5 >= th.min_top5, st
