"""An independent float64 numpy implementation of the Grok-1 forward, written from the spec text
(shared/reference/grok1-checkpoint.md section 4), not from grokconv.forward.

It reads raw stored values through ``reader.load`` (int8 + bf16 scales, float32 arrays) and does its
own dequantization. ``bf16=True`` rounds to bfloat16 at the spec's cast points (and computes in
float64 between them); ``bf16=False`` is pure float64.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from grokconv.tensor import QInt8

BF16 = np.dtype(ml_dtypes.bfloat16)


def _dequant(value) -> np.ndarray:
    if isinstance(value, QInt8):
        w, s = np.asarray(value.weight, np.float64), np.asarray(value.scales, np.float32).astype(np.float64)
        K, N, G = w.shape[-2], w.shape[-1], s.shape[-2]
        lead = w.shape[:-2]
        return (w.reshape(*lead, G, K // G, N) * s[..., :, None, :]).reshape(*lead, K, N)
    return np.asarray(value, np.float64)


class NumpyGrok:
    def __init__(self, reader, bf16: bool = False):
        self.r, self.cfg, self.bf16 = reader, reader.config, bf16
        self.min_router_margin = math.inf   # smallest gap between the k-th and (k+1)-th router prob
        self.max_attn_logit = 0.0           # largest |attention logit| before the cap

    def rnd(self, x):
        """Round to bf16 at a spec cast point (no-op in float64 mode)."""
        return np.asarray(x, np.float64).astype(BF16).astype(np.float64) if self.bf16 else np.asarray(x, np.float64)

    def w(self, name):
        # the reference computes with bf16(int8 * scale); in float64 mode the exact product
        return self.rnd(_dequant(self.r.load(name)))

    def p(self, layer, slot, pname="w"):
        return f"transformer/decoder_layer_{layer}/{slot}/{pname}"

    def norm(self, x, scale_name):
        scale = np.asarray(self.r.load(scale_name), np.float64)
        y = x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_norm_eps))
        return self.rnd(scale * y)

    def mult(self, x, c):
        return self.rnd(x * self.rnd(c))   # a bf16 array times a Python scalar: scalar cast to bf16

    def rope(self, x):
        T, K = x.shape[1], x.shape[-1]
        inv_freq = 1.0 / (self.cfg.rope_base ** (np.arange(0, K, 2) / K))
        phase = np.arange(T)[:, None] * inv_freq[None, :]
        phase = np.concatenate([phase, phase], axis=-1)[None, :, None, :]
        rot = np.concatenate([-x[..., K // 2:], x[..., :K // 2]], axis=-1)
        return self.rnd(x * np.cos(phase) + rot * np.sin(phase))

    def attention(self, x, tokens, L):
        cfg = self.cfg
        B, T, _ = x.shape
        Hq, Hkv, K = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
        q = self.rnd(x @ self.w(self.p(L, "multi_head_attention/query"))).reshape(B, T, Hq, K)
        k = self.rnd(x @ self.w(self.p(L, "multi_head_attention/key"))).reshape(B, T, Hkv, K)
        v = self.rnd(x @ self.w(self.p(L, "multi_head_attention/value"))).reshape(B, T, Hkv, K)
        q, k = self.rope(q), self.rope(k)
        out = np.zeros((B, T, Hq, K))
        causal = np.tril(np.ones((T, T), bool))
        for b in range(B):
            mask = causal & (tokens[b] > cfg.pad_token)[None, :]
            for h in range(Hq):
                kv = h // (Hq // Hkv)
                logits = self.rnd(q[b, :, h] @ k[b, :, kv].T) * cfg.attn_output_multiplier
                self.max_attn_logit = max(self.max_attn_logit, float(np.abs(logits[mask]).max()))
                logits = cfg.max_attn_value * np.tanh(logits / cfg.max_attn_value)
                logits = np.where(mask, logits, -1e30)
                e = np.exp(logits - logits.max(-1, keepdims=True))
                out[b, :, h] = self.rnd(self.rnd(e / e.sum(-1, keepdims=True)) @ v[b, :, kv])
        return self.rnd(out.reshape(B, T, Hq * K) @ self.w(self.p(L, "multi_head_attention/linear")))

    def moe(self, x, L):
        cfg = self.cfg
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        logits = flat @ np.asarray(self.r.load(self.p(L, "router")), np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1, kind="stable")
        k = cfg.num_selected_experts
        sorted_p = np.take_along_axis(probs, order, -1)
        if k < cfg.num_experts:
            self.min_router_margin = min(self.min_router_margin, float((sorted_p[:, k - 1] - sorted_p[:, k]).min()))
        wl, wv, w1 = (self.w(self.p(L, s)) for s in ("moe/linear", "moe/linear_v", "moe/linear_1"))
        out = np.zeros_like(flat)
        gelu = lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
        for n in range(flat.shape[0]):
            for j in range(k):
                e = order[n, j]
                gate = self.rnd(probs[n, e])          # not renormalised
                hidden = gelu(self.rnd(flat[n] @ wl[e])) * self.rnd(flat[n] @ wv[e])
                out[n] += gate * (hidden @ w1[e])
        return self.rnd(out).reshape(B, T, D)

    def __call__(self, tokens, layers):
        tokens = np.asarray(tokens)
        emb = np.asarray(self.r.load("language_model/in_out_embed/embeddings"), np.float64)
        h = self.mult(self.rnd(emb[tokens]), self.cfg.embedding_multiplier_scale)
        hidden = {}
        for L in sorted(layers):
            a = self.attention(self.norm(h, self.p(L, "rms_norm", "scale")), tokens, L)
            h = self.rnd(h + self.norm(a, self.p(L, "rms_norm_1", "scale")))
            m = self.moe(self.norm(h, self.p(L, "rms_norm_2", "scale")), L)
            h = self.rnd(h + self.norm(m, self.p(L, "rms_norm_3", "scale")))
            hidden[L] = h
        x = self.norm(h, "language_model/rms_norm/scale")
        logits = self.mult(self.rnd(x @ self.rnd(emb).T), self.cfg.output_multiplier_scale)
        return logits, hidden
