"""Precision of each role (embedding, norm, router, linear) under each ``--quantize`` choice: data only."""

__all__ = ["ENCODINGS"]

# --quantize choice -> role -> encoding. Unquantized roles keep the precision the reference computes
# with: embeddings are used in bf16, norms and the router in float32 (grok1-checkpoint.md section 4).
# "output" is a stored copy of the tied embedding (SGLang's lm_head): bf16, never quantized.
ENCODINGS = {
    "none": {"linear": "BF16", "embedding": "BF16", "norm": "F32", "router": "F32", "output": "BF16"},
    "int8": {"linear": "int8-pack", "embedding": "F32", "norm": "F32", "router": "F32", "output": "BF16"},
    "fp8": {"linear": "fp8", "embedding": "BF16", "norm": "F32", "router": "F32", "output": "BF16"},
}

