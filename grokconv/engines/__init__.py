"""Engines that compute side B of ``grokconv parity --engine``: a real library loads the converted
checkpoint and returns its logits, which parity compares with our reference forward on side A.

Each engine is a module ``grokconv/engines/<module>.py`` exposing::

    def logits(path: Path, tokens: np.ndarray, *, dtype: str = "bf16") -> np.ndarray

``tokens`` is int64 ``[batch, seq]``; the result is float32 ``[batch, seq, vocab]`` over every layer
the checkpoint at ``path`` holds. A missing library raises :class:`EngineUnavailableError` naming the
extra that installs it. Modules are imported only when their engine is asked for.
"""
from __future__ import annotations

import importlib

from ..errors import EngineUnavailableError

__all__ = ["ENGINES", "engine_logits", "engine_module", "engine_semantics", "require"]

# engine name -> (module under grokconv.engines, pip extra that installs the library)
ENGINES: dict[str, tuple[str | None, str | None]] = {
    "reference": (None, None),
    "transformers": ("transformers_engine", "transformers"),
    "megatron-core": ("megatron_core", "megatron"),
    "llama.cpp": ("llama_cpp_engine", "llama-cpp"),
    "vllm": ("vllm_engine", None),   # its own interpreter (make vllm-venv): vLLM pins its own torch
}


def require(module: str, extra: str, engine: str):
    """Import ``module`` or raise the error that tells how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineUnavailableError(
            f"engine {engine!r} needs the Python package {module!r}, which is not installed ({e})",
            hint=f"pip install 'grokconv[{extra}]'") from None


def engine_module(engine: str):
    if engine not in ENGINES or ENGINES[engine][0] is None:
        raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    return importlib.import_module(f"grokconv.engines.{ENGINES[engine][0]}")


def engine_logits(engine: str, path, tokens, *, dtype: str = "bf16", **options):
    """``options``: engine-specific (vllm: ``python``, the interpreter that has vLLM)."""
    return engine_module(engine).logits(path, tokens, dtype=dtype, **options)


def engine_semantics(engine: str, dtype: str):
    """What ``engine`` computes differently from Grok-1 whatever the checkpoint says, as the reference's
    switches (a module's ``SEMANTICS[dtype]``; none for the others), and whether it returns log-probs."""
    from ..forward import Semantics
    mod = engine_module(engine)
    return getattr(mod, "SEMANTICS", {}).get(dtype, Semantics()), getattr(mod, "RETURNS", "logits") == "logprobs"
