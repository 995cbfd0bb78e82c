"""The reference forward pass of Grok-1, streamed one decoder layer at a time.

It follows ``model.py`` of the release (``shared/reference/grok1-checkpoint.md`` section 4), dtype
point by dtype point, with weights taken through any :class:`CheckpointReader`:

* embeddings: the bf16 table row (f32 -> bf16), times ``embedding_multiplier_scale``. The product is
  a bf16 array times a Python float, which JAX computes with the scalar first cast to the array's
  dtype (weak-type promotion): 78.38367... becomes 78.5 in bf16. :func:`_mul_scalar` does the same.
* every layer: ``h += norm1(attn(norm0(h)))``; ``h += norm3(moe(norm2(h)))``. RMSNorm in f32 with
  ``scale`` used directly and eps 1e-5, cast back to the input's dtype.
* attention: bf16 projections; rotate-half RoPE over the whole head in f32 (base 10000), cast back;
  query head ``h`` reads kv head ``h // (Hq / Hkv)``; logits bf16 -> f32, times
  ``attn_output_multiplier``, ``30 * tanh(x / 30)``, causal and key-padding mask (-1e30), f32
  softmax -> bf16; output projection.
* MoE: fp32 router, softmax over experts then top-k, gates not renormalised, cast to bf16. Inside an
  expert ``model.py`` selects its bf16 matmul outputs with an f32 one-hot einsum, which promotes
  them to f32, so ``gelu_tanh(x @ linear) * (x @ linear_v)`` and the down projection ``@ linear_1``
  run in f32 on bf16-rounded inputs and bf16 weights; the gate-weighted sum is f32, then cast to bf16.
* head: final RMSNorm, tied output ``h @ emb.T`` in bf16, times ``output_multiplier_scale`` (bf16).

``dtype="fp32"`` runs the same graph with every activation, weight and scalar in float32 (weights are
the exact ``int8 * scale`` products). Memory is bounded by one layer: attention weights are loaded,
used and dropped, and experts are loaded one at a time (``index=e``), only those some token is routed
to. :class:`Semantics` holds switches for deliberately wrong variants that the parity tests use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .runtime import peak_memory, resolve_device
from .formats.base import CheckpointReader
from .schema import LAYER_PREFIX, parse_layers
from .tensor import as_dense

__all__ = ["Semantics", "WRONG_VARIANTS", "ENGINE_DEVIATIONS", "ForwardResult", "ReferenceForward", "forward", "resolve_device",
           "resolve_layers", "exact_matmul", "DTYPES", "EMBEDDINGS", "FINAL_NORM", "peak_memory"]

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
EMBEDDINGS = "language_model/in_out_embed/embeddings"
FINAL_NORM = "language_model/rms_norm/scale"
_ALIGN = 64   # bytes; torch's CPU allocator aligns to 64, mapped views need not be
_VOCAB_CHUNK = 16384   # rows of the tied embedding converted at a time for the output projection


@dataclass(frozen=True)
class Semantics:
    """Switches of the forward pass. The defaults are ``model.py``; anything else is a known mistake."""
    rope: str = "half"                 # "half": rotate-half (GPT-NeoX); "interleaved": GPT-J pairs
    gqa: str = "grouped"               # "grouped": q head h -> kv h // (Hq/Hkv); "modulo": kv h % Hkv
    logit_cap: bool = True             # max_attn_value * tanh(x / max_attn_value)
    renormalize_gates: bool = False    # divide the top-k gates by their sum
    gelu: str = "tanh"                 # "tanh" (jax.nn.gelu default) or "erf"
    post_norms: bool = True            # rms_norm_1 / rms_norm_3 on the branch outputs
    embedding_multiplier: bool = True
    attention_multiplier: bool = True
    output_multiplier: bool = True
    # What engines compute differently (README "What the engines compute"; bench/deviations.py):
    gate_dtype: str = "f32"            # "bf16": router weight and matmul in bf16 (vLLM's gate), softmax f32
    router_cap: float | None = None    # c * tanh(logits / c) on the router logits (SGLang: always 30)
    attn_output_scale: bool = False    # the attention output times attn_output_multiplier once more (vLLM)
    scalars: str = "jax"               # "jax": multiplier cast to the activation dtype first; "exact": torch's
                                       # tensor * Python float (one rounding of the exact product)
    output_scale: str = "logits"       # "weight": output_multiplier_scale folded into a bf16 copy of the tied
                                       # table in f32 (SGLang's lm_head loader), logits unscaled

    def __post_init__(self):
        for name, allowed in (("rope", ("half", "interleaved")), ("gqa", ("grouped", "modulo")),
                              ("gelu", ("tanh", "erf")), ("gate_dtype", ("f32", "bf16")),
                              ("scalars", ("jax", "exact")), ("output_scale", ("logits", "weight"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Semantics.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def is_reference(self) -> bool:
        return self == Semantics()

    def changes(self) -> dict:
        """The switches that differ from the reference."""
        ref = Semantics()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(ref, f.name)}


# Known ways to get the forward wrong; tests run each against the reference.
WRONG_VARIANTS: dict[str, Semantics] = {
    "interleaved-rope": Semantics(rope="interleaved"),
    "modulo-gqa": Semantics(gqa="modulo"),
    "no-logit-cap": Semantics(logit_cap=False),
    "renormalized-gates": Semantics(renormalize_gates=True),
    "erf-gelu": Semantics(gelu="erf"),
    "no-post-norms": Semantics(post_norms=False),
    "no-embedding-multiplier": Semantics(embedding_multiplier=False),
    "no-attention-multiplier": Semantics(attention_multiplier=False),
    "no-output-multiplier": Semantics(output_multiplier=False),
}


# What each engine computes differently from model.py whatever the checkpoint says, read from its
# released source (README "What the engines compute"); bench/deviations.py measures each on a model.
ENGINE_DEVIATIONS: dict[str, dict[str, Semantics]] = {
    "vLLM 0.24.0": {
        "exact-erf GELU in the experts": Semantics(gelu="erf"),
        "router (gate) in bf16": Semantics(gate_dtype="bf16"),
        "attention output x attn_output_multiplier": Semantics(attn_output_scale=True),
        "multipliers not rounded to bf16": Semantics(scalars="exact"),
        "all of the above": Semantics(gelu="erf", gate_dtype="bf16", attn_output_scale=True, scalars="exact"),
    },
    "SGLang 0.5.23": {
        "router logits capped at 30": Semantics(router_cap=30.0),
        "exact-erf GELU in the experts": Semantics(gelu="erf"),
        "output multiplier folded into the bf16 lm_head, embedding multiplier not rounded":
            Semantics(scalars="exact", output_scale="weight"),
        "all of the above": Semantics(router_cap=30.0, gelu="erf", scalars="exact", output_scale="weight"),
    },
}


@dataclass
class ForwardResult:
    logits: torch.Tensor                       # [B, T, V] float32, CPU
    hidden: dict[int, torch.Tensor]            # layer -> residual stream after it, [B, T, D] float32, CPU
    layers: list[int]
    profile: dict = field(default_factory=dict)


@contextlib.contextmanager
def exact_matmul():
    """No TF32 and no reduced-precision bf16 reductions on CUDA while the reference runs (restored after)."""
    if not torch.cuda.is_available():
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction)
    try:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = False, False
    except RuntimeError:   # the caller set precision through torch's newer API; leave it as chosen
        yield
        return
    try:
        yield
    finally:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = saved


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 64-byte aligned: the same values in the same layout and alignment run the same
    kernels and so give the same bits, whatever layout a format stores or wherever a mapped file put them."""
    if not t.is_contiguous() or t.data_ptr() % _ALIGN:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _mul_scalar(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x * c`` as JAX computes an array times a Python float: ``c`` is cast to ``x.dtype`` first."""
    return x * torch.tensor(c, dtype=x.dtype, device=x.device)


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (scale.to(torch.float32) * normed).to(x.dtype)


class ReferenceForward:
    """The forward pass in stages (:meth:`embed`, :meth:`layer`, :meth:`head`) so that a caller can run
    two models side by side with at most one layer of weights in memory at a time."""

    def __init__(self, reader: CheckpointReader, *, device="cpu", dtype: str = "bf16",
                 semantics: Semantics = Semantics(), release: bool = True):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.reader, self.cfg, self.semantics = reader, reader.config, semantics
        self.device = resolve_device(device)
        self.act = DTYPES[dtype]
        self.wdtype = "bf16" if dtype == "bf16" else "f32"
        # Readers map files; touched pages count in this process's RSS. A reader with ``release(name,
        # index)`` drops a parameter's pages once its dense copy is made (the page cache keeps them).
        self._release = getattr(reader, "release", None) if release else None

    # -- weights --------------------------------------------------------------------------------
    def _dense(self, name: str, dtype: str, index: int | None = None) -> torch.Tensor:
        t = _aligned(self.reader.dense(name, dtype, index=index, device=self.device))
        if self._release is not None:
            self._release(name, index)
        return t

    def _embedding_source(self):
        """The embedding table: a plain array (a mapped file) stays as it is, to be sliced before it is
        converted so that only the rows in use are read and held; anything else is made dense."""
        value = self.reader.load(EMBEDDINGS)
        return value if isinstance(value, np.ndarray) else self._dense(EMBEDDINGS, self.wdtype)

    def _embedding_rows(self, source, rows) -> torch.Tensor:
        """``dense(embeddings)[rows]`` (rows: an index array or a slice), from :meth:`_embedding_source`."""
        if not isinstance(source, np.ndarray):
            return _aligned(source[rows])
        t = _aligned(as_dense(source[rows], self.wdtype, self.device))
        if self._release is not None:
            self._release(EMBEDDINGS, None)
        return t

    def _param(self, layer: int, slot: str, index: int | None = None, *, f32: bool = False) -> torch.Tensor:
        pname = "scale" if slot.startswith("rms_norm") else "w"
        return self._dense(f"{LAYER_PREFIX}{layer}/{slot}/{pname}", "f32" if f32 else self.wdtype, index)

    def _norm(self, x: torch.Tensor, layer: int | None, slot: str) -> torch.Tensor:
        scale = self._dense(FINAL_NORM, "f32") if layer is None else self._param(layer, slot, f32=True)
        return _rms_norm(x, scale, self.cfg.rms_norm_eps)

    # -- stages ---------------------------------------------------------------------------------
    def check_tokens(self, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim != 2 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty [batch, seq] array, got shape {tuple(tokens.shape)}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in 0..{self.cfg.vocab_size - 1}, got {lo}..{hi}")
        return tokens.to(self.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``bf16(emb[tokens]) * embedding_multiplier_scale`` -> [B, T, D] in the activation dtype."""
        x = self._embedding_rows(self._embedding_source(), tokens.cpu().numpy()).to(self.device, self.act)
        if self.semantics.embedding_multiplier:
            x = self._scale(x, self.cfg.embedding_multiplier_scale)
        return x

    def layer(self, h: torch.Tensor, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """One decoder layer (sandwich norms) on the residual stream ``h``."""
        post = self.semantics.post_norms
        a = self._attention(self._norm(h, layer, "rms_norm"), tokens, layer)
        if self.semantics.attn_output_scale:
            a = self._scale(a, self.cfg.attn_output_multiplier)
        h = h + (self._norm(a, layer, "rms_norm_1") if post else a)
        m = self._moe(self._norm(h, layer, "rms_norm_2"), layer)
        h = h + (self._norm(m, layer, "rms_norm_3") if post else m)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and the tied output projection -> float32 logits [B, T, V]."""
        x = self._norm(h, None, "")
        V = self.cfg.vocab_size
        logits = torch.empty(*x.shape[:-1], V, dtype=self.act, device=x.device)
        table = self._embedding_source()
        in_weight = self.semantics.output_multiplier and self.semantics.output_scale == "weight"
        for r0 in range(0, V, _VOCAB_CHUNK):   # the same chunks on every reader: the same kernels, the same bits
            rows = self._embedding_rows(table, slice(r0, r0 + _VOCAB_CHUNK))
            if in_weight:   # SGLang: lm_head = dtype(f32(emb) * output_multiplier_scale)
                rows = (rows.to(torch.float32) * self.cfg.output_multiplier_scale).to(rows.dtype)
            logits[..., r0:r0 + _VOCAB_CHUNK] = x @ rows.T
        del table
        if self.semantics.output_multiplier and not in_weight:
            logits = self._scale(logits, self.cfg.output_multiplier_scale)
        return logits.to(torch.float32)

    def _scale(self, x: torch.Tensor, c: float) -> torch.Tensor:
        return _mul_scalar(x, c) if self.semantics.scalars == "jax" else x * c

    # -- blocks ---------------------------------------------------------------------------------
    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """RoPE over the whole head, in f32, on [B, T, H, K]; positions 0..T-1."""
        K, T = x.shape[-1], x.shape[1]
        exponents = torch.arange(0, K, 2, dtype=torch.float32, device=x.device)
        inv_freq = 1.0 / (self.cfg.rope_base ** (exponents / K))
        t = torch.arange(T, dtype=torch.float32, device=x.device)
        phase = (t[:, None] * inv_freq[None, :])[None, :, None, :]      # [1, T, 1, K/2]
        if self.semantics.rope == "half":
            phase = torch.cat([phase, phase], dim=-1)
            x1, x2 = x[..., :K // 2], x[..., K // 2:]
            rotated = torch.cat([-x2, x1], dim=-1)
            out = x * torch.cos(phase) + rotated * torch.sin(phase)
        else:  # interleaved pairs (x0, x1), (x2, x3), ...
            phase = phase.repeat_interleave(2, dim=-1)
            pairs = x.unflatten(-1, (K // 2, 2))
            rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
            out = x * torch.cos(phase) + rotated * torch.sin(phase)
        return out.to(x.dtype)

    def _attention(self, x: torch.Tensor, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        cfg, sem = self.cfg, self.semantics
        B, T, _ = x.shape
        Hq, Hkv, K = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
        q = (x @ self._param(layer, "multi_head_attention/query")).view(B, T, Hq, K)
        k = (x @ self._param(layer, "multi_head_attention/key")).view(B, T, Hkv, K)
        v = (x @ self._param(layer, "multi_head_attention/value")).view(B, T, Hkv, K)
        q, k = self._rope(q), self._rope(k)
        group = Hq // Hkv
        if sem.gqa == "grouped":      # head h reads kv head h // group
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        else:                          # head h reads kv head h % Hkv
            k, v = k.repeat(1, 1, group, 1), v.repeat(1, 1, group, 1)
        logits = torch.einsum("bthd,bThd->bhtT", q, k).to(torch.float32)
        if sem.attention_multiplier:
            logits = logits * cfg.attn_output_multiplier
        if sem.logit_cap:
            cap = torch.tensor(cfg.max_attn_value, dtype=torch.float32, device=x.device)
            logits = cap * torch.tanh(logits / cap)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = (tokens > cfg.pad_token)[:, None, None, :] & causal[None, None]
        logits = torch.where(mask, logits, torch.tensor(-1e30, dtype=torch.float32, device=x.device))
        weights = torch.softmax(logits, dim=-1).to(x.dtype)
        attn = torch.einsum("bhtT,bThd->bthd", weights, v).reshape(B, T, Hq * K)
        return attn @ self._param(layer, "multi_head_attention/linear")

    def _moe(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        cfg, sem = self.cfg, self.semantics
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        if sem.gate_dtype == "f32":
            router_logits = flat.to(torch.float32) @ self._param(layer, "router", f32=True)
        else:   # bf16 weight, bf16 matmul, then float32 for the softmax
            router_logits = (flat.to(torch.bfloat16) @ self._param(layer, "router", f32=True).to(torch.bfloat16)).float()
        if sem.router_cap:
            router_logits = sem.router_cap * torch.tanh(router_logits / sem.router_cap)
        probs = torch.softmax(router_logits, dim=-1)
        gate, idx = torch.topk(probs, cfg.num_selected_experts, dim=-1)   # sorted, largest first
        if sem.renormalize_gates:
            gate = gate / gate.sum(-1, keepdim=True)
        gate = gate.to(self.act)
        slots = torch.zeros(B * T, cfg.num_selected_experts, D, dtype=torch.float32, device=x.device)
        approximate = "tanh" if sem.gelu == "tanh" else "none"
        for e in range(cfg.num_experts):
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            if rows.numel() == 0:
                continue   # no token goes to this expert: its weights are never read
            xe = flat[rows]
            up_g = (xe @ self._param(layer, "moe/linear", e)).to(torch.float32)
            up_v = (xe @ self._param(layer, "moe/linear_v", e)).to(torch.float32)
            act = torch.nn.functional.gelu(up_g, approximate=approximate) * up_v
            del up_g, up_v
            slots[rows, slot] = act @ self._param(layer, "moe/linear_1", e).to(torch.float32)
        out = (gate.to(torch.float32)[..., None] * slots).sum(dim=1)
        return out.to(self.act).reshape(B, T, D)


def forward(reader: CheckpointReader, tokens, layers="all", device="cpu", dtype: str = "bf16",
            semantics: Semantics = Semantics(), *, release: bool = True) -> ForwardResult:
    """Run embeddings, ``layers`` (numeric order) and the head on ``tokens`` [B, T].

    ``layers``: a list of layer numbers, a range text such as ``"0-1,5"``, or ``"all"``.
    Returns float32 logits [B, T, V] and the residual stream after each layer, both on the CPU.
    """
    start = time.perf_counter()
    fwd = ReferenceForward(reader, device=device, dtype=dtype, semantics=semantics, release=release)
    layer_list = resolve_layers(layers, reader)
    if fwd.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(fwd.device)
    hidden = {}
    with torch.inference_mode(), exact_matmul():
        tok = fwd.check_tokens(tokens)
        h = fwd.embed(tok)
        for layer in layer_list:
            h = fwd.layer(h, tok, layer)
            hidden[layer] = h.to(torch.float32).cpu()
        logits = fwd.head(h).cpu()
    profile = {"wall_s": time.perf_counter() - start, "device": str(fwd.device), **peak_memory(fwd.device)}
    return ForwardResult(logits, hidden, layer_list, profile)


def resolve_layers(layers, reader: CheckpointReader) -> list[int]:
    """A layer selection as a sorted list, checked against the model's layer count."""
    n = reader.config.num_layers
    if isinstance(layers, str) or layers is None:
        return parse_layers(layers, n)
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if not 0 <= x < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n} layers (0-{n - 1})")
    return out

