"""Where a conversion finds Grok-1's ``tokenizer.model``: where the user points, or beside the source.

Nowhere else: a ``tokenizer.model`` one folder above SRC may belong to another model, and a vocabulary
copied into an export (or built into a GGUF) from the wrong file is silent damage.
"""
from __future__ import annotations

from pathlib import Path

from .errors import MissingTensorError

__all__ = ["TOKENIZER_FILE", "find_tokenizer"]

TOKENIZER_FILE = "tokenizer.model"


def find_tokenizer(src, given=None) -> Path | None:
    """``given`` (it must be a file), else ``SRC/tokenizer.model`` (SRC a directory) or the
    ``tokenizer.model`` in the folder of a one-file SRC; None when there is none."""
    if given is not None:
        p = Path(given)
        if not p.is_file():
            raise MissingTensorError("--tokenizer: no such file", path=p)
        return p
    src = Path(src)
    cand = (src if src.is_dir() else src.parent) / TOKENIZER_FILE
    return cand if cand.is_file() else None
