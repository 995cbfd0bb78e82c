"""CI parity on every conversion path: a table of (path, expected kind); each converted model is run
through the reference forward beside the original and must pass its kind's thresholds. The kind
inferred from the two checkpoints must be the one the table expects. Lossless paths run on two models,
the random `tiny` (seeded random tokens; 12 layers, grouped-query attention 16 / 8) and the trained
`tiny-trained` (held-out English text), and must agree bit for bit. Lossy paths are judged on the trained
model only: its KL, top-1 and hidden-state limits are calibrated there (grokconv/thresholds.py); on the
random model every token's own embedding dominates its logits (KL ~1e-9 whatever the conversion) while
12 random layers amplify any perturbation of the hidden states, so neither figure means anything there."""
import pytest

from grokconv.convert import to_safetensors
from grokconv.formats.base import open_checkpoint
from grokconv.jax_export import to_jax
from grokconv.megatron import to_megatron
from grokconv.parity import random_tokens, run_parity


def _st(**kw):
    return lambda src, dst: to_safetensors(src, dst, progress=False, **kw)


def _gguf(type):
    def run(src, dst):
        from grokconv.gguf_export import to_gguf
        tok = src / "tokenizer.model"
        if not tok.is_file():                 # the random tiny model has none: one trained here
            from test_gguf import train_tokenizer
            (dst.parent / "tok").mkdir(exist_ok=True)
            tok = train_tokenizer(dst.parent / "tok")
        to_gguf(src, dst / "model.gguf", type=type, tokenizer=tok, progress=False)
    return run


def _then(first, second):
    def run(src, dst):
        mid = dst.with_name(dst.name + "-mid")
        first(src, mid)
        second(mid, dst)
    return run


PATHS = {
    # path id: (conversion, expected kind)
    "hf-bf16": (_st(layout="hf"), "exact"),
    "keyfan-bf16": (_st(layout="keyfan"), "exact"),
    "sglang-bf16": (_st(layout="sglang"), "exact"),
    "hf-int8-lossless": (_st(layout="hf", quantize="int8"), "exact"),
    "sglang-int8-lossless": (_st(layout="sglang", quantize="int8"), "exact"),
    "gguf-f32": (_gguf("f32"), "exact"),
    "gguf-q8_0": (_gguf("q8_0"), "q8_0"),
    "fp8-channel": (_st(quantize="fp8", fp8_scheme="channel"), "fp8"),
    "fp8-tensor": (_st(quantize="fp8", fp8_scheme="tensor"), "fp8"),
    "fp8-block": (_st(quantize="fp8", fp8_scheme="block"), "fp8"),
    "fp8-block-deepseek": (_st(quantize="fp8", fp8_scheme="block", fp8_format="fp8"), "fp8"),
    "int8 -> jax (byte-identical)": (_then(_st(quantize="int8"), lambda s, d: to_jax(s, d, progress=False)), "exact"),
    # re-quantizing the bf16 dequantization with the source's scale structure recovers the original
    # int8 and scales (tested byte for byte in test_export); the float32 embeddings come back through
    # bf16, which is what the reference computes with, so a bf16 run is exact
    "bf16 -> jax (re-quantized)": (_then(_st(layout="keyfan"), lambda s, d: to_jax(s, d, progress=False)), "exact"),
    "bf16 -> int8 (re-quantized)": (_then(_st(layout="hf"), _st(layout="sglang", quantize="int8")), "int8"),
    "megatron tp2 pp2 ep2": (lambda s, d: to_megatron(s, d, tp=2, pp=2, ep=2, progress=False), "exact"),
    "megatron tp4 ep8 vp2 -> hf": (_then(lambda s, d: to_megatron(s, d, tp=4, pp=2, ep=8, vp=2, progress=False),
                                         _st(layout="hf")), "exact"),
}


MODELS = {"tiny": "tiny_ckpt", "tiny-trained": "trained_ckpt"}   # model: its fixture


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(512, batch=2, seq_len=12, seed=3)


CASES = [(path, model) for path, (_, kind) in PATHS.items() for model in MODELS
         if kind == "exact" or model == "tiny-trained"]


@pytest.mark.parametrize("path,model", CASES)
def test_parity_table(path, model, request, tmp_path, tokens):
    convert, kind = PATHS[path]
    ckpt = request.getfixturevalue(MODELS[model])
    if model == "tiny-trained":
        tokens = request.getfixturevalue("trained_tokens")[0]
    out = tmp_path / "out"
    convert(ckpt, out)
    a, b = open_checkpoint(ckpt), open_checkpoint(out)
    rep = run_parity(a, b, tokens, layers="all", device="cpu", dtype="bf16", thresholds="auto")
    assert rep.kind == kind, (path, rep.kind)
    rep.check()                                          # raises ParityError past the kind's thresholds
    if kind == "exact":
        assert rep.logits.max_abs == 0 and rep.logits.top1 == 1.0
    else:
        assert rep.logits.top1 >= 0.9 and rep.logits.max_abs > 0
