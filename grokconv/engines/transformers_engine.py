"""The transformers engine: ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` on a
grokconv Hugging Face export (layouts ``hf``, ``keyfan``, ``sglang``; bf16, or compressed-tensors int8 /
fp8 through transformers' own compressed-tensors support), loaded strictly, and its logits.

The model code is the ``configuration_grok1.py`` / ``modeling_grok1.py`` the export carries
(``grokconv/hf_code``); transformers imports it from the export as it would from the hub.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import require
from ..errors import CheckpointFormatError, GrokconvError

__all__ = ["logits", "load_model", "ENGINE", "EXTRA"]

ENGINE, EXTRA = "transformers", "transformers"
_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _check_export(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointFormatError("the transformers engine reads a Hugging Face export: no config.json here",
                                    path=path, hint="convert it first: grokconv to-safetensors SRC DST")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"config.json is not JSON: {e}", path=cfg_file) from None
    missing = [f for f in (cfg.get("auto_map") or {}).values() if not (path / (f.split(".")[0] + ".py")).is_file()]
    if not cfg.get("auto_map") or missing:
        raise CheckpointFormatError(
            "config.json names no transformers code (auto_map) or its files are missing", path=path,
            hint="export it again with this grokconv: to-safetensors writes configuration_grok1.py and modeling_grok1.py")
    return cfg


def load_model(path, *, dtype: str = "bf16"):
    """The model, loaded strictly (a missing, unexpected or mismatched tensor is an error)."""
    transformers = require("transformers", EXTRA, ENGINE)
    import torch
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    path = Path(path)
    path = path.parent if path.is_file() else path
    _check_export(path)
    transformers.utils.logging.disable_progress_bar()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, dtype=getattr(torch, _DTYPES[dtype]), output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                                  "error_msgs")}
    if bad:
        raise GrokconvError("transformers did not load every tensor one to one: " +
                            "; ".join(f"{k} {v[:3]}{' ...' if len(v) > 3 else ''}" for k, v in bad.items()), path=path)
    return model.eval()


def logits(path, tokens, *, dtype: str = "bf16") -> np.ndarray:
    """float32 logits ``[B, T, V]`` of every layer the export holds, for int64 ``tokens [B, T]``."""
    import torch
    model = load_model(path, dtype=dtype)
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=False).logits
    return out.to(torch.float32).numpy()
