"""llama.cpp as a parity engine: libllama (through llama-cpp-python) loads a GGUF and returns its logits.

The GGUF's own tensor types decide the arithmetic (``dtype`` is not used): llama.cpp's CPU backend
multiplies F32 weights in float32, and for F16 / BF16 / Q8_0 weights it first converts the
activations to that type (Q8_0 activations for Q8_0 weights). Each sequence of the batch is
evaluated on its own, from an empty KV cache, with every position's logits kept (``logits_all``).
What llama.cpp's ``grok`` graph computes differently from Grok-1 is in the README (llama.cpp engine).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import require

__all__ = ["logits", "load"]

_CACHE: dict = {}


def load(path, n_ctx: int):
    """A ``llama_cpp.Llama`` for the GGUF at ``path`` (its first part for a split set), kept for reuse."""
    llama_cpp = require("llama_cpp", "llama-cpp", "llama.cpp")
    from ..formats.gguf import gguf_parts
    first = gguf_parts(Path(path))[0]
    key = (str(first.resolve()), first.stat().st_mtime_ns, n_ctx)
    if key not in _CACHE:
        _CACHE.clear()
        from ..errors import GrokconvError
        from ..formats.base import open_checkpoint
        with open_checkpoint(first) as r:
            cfg = r.config
        if cfg.num_q_heads * cfg.key_size != cfg.emb_size:
            raise GrokconvError(
                f"llama.cpp's grok graph takes the head size as embedding_length / head_count, so it cannot run "
                f"a model with {cfg.num_q_heads} heads of {cfg.key_size} and d_model {cfg.emb_size} "
                f"({cfg.num_q_heads * cfg.key_size} != {cfg.emb_size}; Grok-1 itself has 48 x 128 = 6144)", path=first,
                hint="compare this model with --engine reference, or use a model whose heads fill d_model (--preset tiny)")
        try:
            model = llama_cpp.Llama(model_path=str(first), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                    logits_all=True, verbose=False, n_threads=os.cpu_count() or 1,
                                    n_threads_batch=os.cpu_count() or 1, flash_attn=False)
        except ValueError as e:   # llama-cpp-python's "Failed to load model from file"
            raise GrokconvError(f"llama.cpp refused the file ({e})", path=first,
                                hint="llama.cpp logs why with verbose=True: python -c \"import llama_cpp; "
                                     f"llama_cpp.Llama(model_path='{first}', verbose=True)\"") from None
        _CACHE[key] = model
    return _CACHE[key]


def logits(path, tokens, *, dtype: str = "bf16") -> np.ndarray:
    """float32 ``[B, T, V]`` logits of llama.cpp for int64 ``tokens [B, T]``."""
    del dtype   # the GGUF's tensor types decide llama.cpp's arithmetic
    tok = np.asarray(tokens, dtype=np.int64)
    if tok.ndim != 2 or tok.shape[1] < 1:
        raise ValueError(f"tokens must be [batch, seq], got shape {tok.shape}")
    B, T = tok.shape
    llm = load(path, max(T, 8))
    out = np.empty((B, T, llm.n_vocab()), dtype=np.float32)
    for b in range(B):
        llm.reset()
        llm.eval([int(x) for x in tok[b]])
        out[b] = np.asarray(llm.scores[:T], dtype=np.float32)
    return out
