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

__all__ = ["ENGINES", "engine_logits", "require"]

# engine name -> (module under grokconv.engines, pip extra that installs the library)
ENGINES: dict[str, tuple[str | None, str | None]] = {
    "reference": (None, None),
    "transformers": ("transformers_engine", "transformers"),
    "megatron-core": ("megatron_core", "megatron"),
    "llama.cpp": ("llama_cpp_engine", "llama-cpp"),
}


def require(module: str, extra: str, engine: str):
    """Import ``module`` or raise the error that tells how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineUnavailableError(
            f"engine {engine!r} needs the Python package {module!r}, which is not installed ({e})",
            hint=f"pip install 'grokconv[{extra}]'") from None


def engine_logits(engine: str, path, tokens, *, dtype: str = "bf16"):
    if engine not in ENGINES or ENGINES[engine][0] is None:
        raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    mod = importlib.import_module(f"grokconv.engines.{ENGINES[engine][0]}")
    return mod.logits(path, tokens, dtype=dtype)
