"""Runs inside an interpreter that has vLLM: full-vocabulary prompt log-probs of a checkpoint.

Standard library, numpy and vLLM only (no grokconv import): ``vllm_engine`` calls :func:`logprobs`
in-process when vLLM is importable there, or runs this file as a script with another interpreter
(vLLM pins its own torch)::

    python _vllm_worker.py REQUEST.json RESULT.npz

REQUEST: ``{"path": ..., "tokens": [[...], ...], "dtype": "float32" | "bfloat16"}``. RESULT: ``logprobs``
float32 ``[B, T, V]`` and ``version``; or, when vLLM fails, ``error`` (its last line), ``error_type``
and ``log`` (the end of the traceback). Position t holds log p(. | tokens[:t+1]): positions 0..T-2 from
vLLM's prompt log-probs of tokens 1..T-1, position T-1 from the raw log-probs of the first sampled token.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np


def _dense(entry: dict, vocab: int) -> np.ndarray:
    row = np.full(vocab, -np.inf, dtype=np.float32)
    for tid, lp in entry.items():
        row[int(tid)] = lp.logprob
    return row


def logprobs(path: str, tokens, dtype: str = "float32") -> tuple[np.ndarray, str]:
    """``[B, T, V]`` float32 log-probs of vLLM for int ``tokens [B, T]``, and vLLM's version."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # one process: errors surface here
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    tok = [list(map(int, row)) for row in tokens]
    T = len(tok[0])
    llm = LLM(model=str(path), dtype=dtype, enforce_eager=True, trust_remote_code=True, skip_tokenizer_init=True,
              max_model_len=max(T + 1, 16), max_num_seqs=max(1, len(tok)), max_logprobs=-1, seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1, logprobs=-1, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=row) for row in tok], params, use_tqdm=False)
    res = np.empty((len(tok), T, vocab), dtype=np.float32)
    for b, out in enumerate(outs):
        prompt = out.prompt_logprobs            # [None, {id: Logprob} for tokens 1..T-1]
        for t in range(1, T):
            res[b, t - 1] = _dense(prompt[t], vocab)
        res[b, T - 1] = _dense(out.outputs[0].logprobs[0], vocab)
    return res, vllm.__version__


def main(argv=None) -> int:
    req_path, out_path = (argv or sys.argv[1:])[:2]
    req = json.loads(open(req_path).read())
    try:
        lp, version = logprobs(req["path"], req["tokens"], req.get("dtype", "float32"))
    except Exception as e:   # noqa: BLE001 - every failure goes back to the caller as data (vLLM raises many kinds)
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        np.savez(out_path, error=np.array(lines[-1] if lines else repr(e)), error_type=np.array(type(e).__name__),
                 log=np.array(traceback.format_exc()[-4000:]))
        return 0
    np.savez(out_path, logprobs=lp, version=np.array(version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
