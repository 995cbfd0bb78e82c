"""Grok-1 for transformers (``trust_remote_code``), shipped by grokconv with every Hugging Face style
export and named in config.json's ``auto_map``.

Written from grokconv's reference forward (``grokconv/forward.py``, itself from the release's
``model.py``), dtype point by dtype point, so that a bf16 or float32 model computes what the
reference computes:

* embeddings ``emb[ids] * embedding_multiplier_scale`` with the scalar cast to the activation dtype
  first (JAX's weak typing: 78.38 becomes 78.5 in bf16);
* every layer ``h += post_attn_norm(attn(pre_attn_norm(h)))``, ``h += post_moe_norm(moe(pre_moe_norm(h)))``
  (sandwich norms), RMSNorm in float32 with the scale used as is, eps ``rms_norm_eps``;
* attention: rotate-half RoPE over the whole head in float32 (base ``rope_theta``), query head ``h``
  reads kv head ``h // (Hq / Hkv)``, logits in float32 times ``attn_output_multiplier`` then
  ``max_attn_value * tanh(x / max_attn_value)``, causal and key-padding mask (-1e30), float32 softmax;
* MoE: float32 router, softmax over experts then top-``num_experts_per_tok``, gates **not**
  renormalised; experts ``(gelu_tanh(x W) * (x V)) W1`` with the activation product and the down
  projection in float32, as ``model.py``'s float32 one-hot einsum makes them;
* head: final RMSNorm, the tied output ``h @ emb.T`` (or ``lm_head`` where the layout stores one)
  times ``output_multiplier_scale``.

Parameter names come from ``config.grokconv_tensor_names`` (canonical Grok-1 name -> the export's
tensor name), so the same file loads the ``hf``, ``keyfan`` and ``sglang`` layouts strictly. Linear
weights are ``nn.Linear`` modules, so transformers' quantizers (compressed-tensors) can replace them.
Positions are absolute (0.. of the sequence, as Grok-1 has no notion of left padding); padded keys are
masked through ``attention_mask`` (``generate`` builds it from ``pad_token_id``) or, without one, where
``input_ids <= pad_token_id`` as the reference does.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_grok1 import Grok1Config, GrokConfig

EMBEDDINGS = "language_model/in_out_embed/embeddings"
FINAL_NORM = "language_model/rms_norm/scale"
LM_HEAD = "lm_head"
_LAYER = "transformer/decoder_layer_{L}/"
_NORMS = ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3")   # pre-attn, post-attn, pre-moe, post-moe
_ATTN = ("query", "key", "value", "linear")
_EXPERT = ("linear", "linear_v", "linear_1")                        # gate, up, down
_VOCAB_CHUNK = 16384   # the reference's output projection chunk: the same kernels, the same bits
# transformers 5 calls the cache ``cache``, 4.x ``past_key_values``
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_tanh": "tanh", "gelu": "none"}


class Grok1RMSNorm(nn.Module):
    """RMSNorm in float32 with ``scale`` used directly; the parameter takes the layout's name."""

    def __init__(self, size: int, eps: float, param_name: str):
        super().__init__()
        self.eps, self.param_name = eps, param_name
        self.register_parameter(param_name, nn.Parameter(torch.ones(size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (getattr(self, self.param_name).to(torch.float32) * normed).to(x.dtype)


def _mul_scalar(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x * c`` as JAX computes an array times a Python float: ``c`` is cast to ``x.dtype`` first."""
    return x * torch.tensor(c, dtype=x.dtype, device=x.device)


def _names(config) -> dict:
    names = getattr(config, "grokconv_tensor_names", None)
    if not names:
        raise ValueError("config.json has no grokconv_tensor_names: export it again with grokconv to-safetensors")
    return names


class Grok1PreTrainedModel(PreTrainedModel):
    config_class = Grok1Config
    base_model_prefix = "grok1"          # no submodule has this name: keys are loaded as they are stored
    supports_gradient_checkpointing = False
    _no_split_modules = []
    _supports_cache_class = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, Grok1RMSNorm):
            nn.init.ones_(getattr(module, module.param_name))


class Grok1ModelForCausalLM(Grok1PreTrainedModel, GenerationMixin):
    """Grok-1 with its head. The module tree is built from the layout's tensor names."""

    _tied_weights_keys = {}

    def __init__(self, config: Grok1Config):
        super().__init__(config)
        self.names = names = _names(config)
        c = config
        D, K, Hq, Hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        self.hidden_act = _GELU.get(c.hidden_act)
        if self.hidden_act is None:
            raise ValueError(f"hidden_act {c.hidden_act!r} is not a GELU; Grok-1 uses gelu_pytorch_tanh")
        self._path = {}   # (canonical slot, layer, expert) -> module path
        self._place(EMBEDDINGS, None, None, nn.Embedding(c.vocab_size, D))
        shapes = {"query": (D, Hq * K), "key": (D, Hkv * K), "value": (D, Hkv * K), "linear": (Hq * K, D)}
        for L in range(c.num_hidden_layers):
            for n in _NORMS:
                self._place(f"{_LAYER}{n}/scale", L, None, None, norm=D)
            for n in _ATTN:
                self._place(f"{_LAYER}multi_head_attention/{n}/w", L, None, nn.Linear(*shapes[n], bias=False))
            self._place(f"{_LAYER}router/w", L, None, nn.Linear(D, c.num_experts, bias=False))
            for e in range(c.num_experts):
                for n in _EXPERT:
                    io = (D, c.intermediate_size) if n != "linear_1" else (c.intermediate_size, D)
                    self._place(f"{_LAYER}moe/{n}/w", L, e, nn.Linear(*io, bias=False))
        self._place(FINAL_NORM, None, None, None, norm=D)
        if LM_HEAD in names:   # a layout that stores the output projection (SGLang's, never tied)
            self._place(LM_HEAD, None, None, nn.Linear(D, c.vocab_size, bias=False))
        # norms and the router are float32 in the reference, whatever the model's dtype
        fp32 = [n for n in names if "rms_norm" in n or "/router/" in n]
        self._keep_in_fp32_modules_strict = {_pattern(names[n]) for n in fp32}
        self.post_init()

    # -- the module tree -----------------------------------------------------------------------
    def _place(self, slot: str, layer, expert, module, norm: int | None = None):
        template = self.names.get(slot)
        if template is None:
            raise ValueError(f"grokconv_tensor_names has no entry for {slot}")
        path = template.replace("{L}", str(layer)).replace("{E}", str(expert))
        mod_path, _, param = path.rpartition(".")
        if norm is not None:
            module = Grok1RMSNorm(norm, self.config.rms_norm_eps, param)
        elif param != "weight":
            raise ValueError(f"{template}: a linear or embedding tensor must be named .weight")
        parent = self
        parts = mod_path.split(".")
        for part in parts[:-1]:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(parts[-1], module)
        self._path[(slot, layer, expert)] = mod_path

    def _mod(self, slot: str, layer=None, expert=None) -> nn.Module:
        # looked up by path at every call: a quantizer may have replaced the module since __init__
        return self.get_submodule(self._path[(slot, layer, expert)])

    def get_input_embeddings(self):
        return self._mod(EMBEDDINGS)

    def get_output_embeddings(self):
        return None   # tied by computation (h @ emb.T), or a separate lm_head that is never tied

    # -- blocks --------------------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        exponents = torch.arange(0, K, 2, dtype=torch.float32, device=x.device)
        inv_freq = 1.0 / (self.config.rope_theta ** (exponents / K))
        phase = (positions.to(torch.float32)[:, None] * inv_freq[None, :])[None, :, None, :]
        phase = torch.cat([phase, phase], dim=-1)
        rotated = torch.cat([-x[..., K // 2:], x[..., :K // 2]], dim=-1)
        return (x * torch.cos(phase) + rotated * torch.sin(phase)).to(x.dtype)

    def _attention(self, x, L, positions, key_valid, cache):
        c = self.config
        B, T, _ = x.shape
        Hq, Hkv, K = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        slot = _LAYER + "multi_head_attention/%s/w"
        q = self._mod(slot % "query", L)(x).view(B, T, Hq, K)
        k = self._mod(slot % "key", L)(x).view(B, T, Hkv, K)
        v = self._mod(slot % "value", L)(x).view(B, T, Hkv, K)
        q, k = self._rope(q, positions), self._rope(k, positions)
        if cache is not None:
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), L)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        S = k.shape[1]
        group = Hq // Hkv
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        logits = torch.einsum("bthd,bThd->bhtT", q, k).to(torch.float32)
        logits = logits * c.attn_output_multiplier
        cap = torch.tensor(c.max_attn_value, dtype=torch.float32, device=x.device)
        logits = cap * torch.tanh(logits / cap)
        key_pos = torch.arange(S, device=x.device)
        causal = key_pos[None, :] <= positions[:, None]                     # [T, S]
        mask = key_valid[:, None, None, :] & causal[None, None]
        logits = torch.where(mask, logits, torch.tensor(-1e30, dtype=torch.float32, device=x.device))
        weights = torch.softmax(logits, dim=-1).to(x.dtype)
        attn = torch.einsum("bhtT,bThd->bthd", weights, v).reshape(B, T, Hq * K)
        return self._mod(slot % "linear", L)(attn)

    def _moe(self, x, L):
        c = self.config
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        router = self._mod(_LAYER + "router/w", L)
        probs = torch.softmax(flat.to(torch.float32) @ router.weight.to(torch.float32).T, dim=-1)
        gate, idx = torch.topk(probs, c.num_experts_per_tok, dim=-1)
        gate = gate.to(x.dtype)
        slots = torch.zeros(B * T, c.num_experts_per_tok, D, dtype=torch.float32, device=x.device)
        for e in range(c.num_experts):
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = flat[rows]
            up_g = self._mod(_LAYER + "moe/linear/w", L, e)(xe).to(torch.float32)
            up_v = self._mod(_LAYER + "moe/linear_v/w", L, e)(xe).to(torch.float32)
            act = F.gelu(up_g, approximate=self.hidden_act) * up_v
            slots[rows, slot] = _linear_f32(self._mod(_LAYER + "moe/linear_1/w", L, e), act)
        out = (gate.to(torch.float32)[..., None] * slots).sum(dim=1)
        return out.to(x.dtype).reshape(B, T, D)

    def _norm(self, x, L, n):
        return self._mod(f"{_LAYER}{n}/scale" if L is not None else FINAL_NORM, L)(x)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, return_dict=True, **kwargs):
        c = self.config
        cache = kwargs.pop("past_key_values", cache)   # transformers 4.x's name for it
        emb = self._mod(EMBEDDINGS)
        if inputs_embeds is None:
            x = _mul_scalar(emb(input_ids), c.embedding_multiplier_scale)
        else:
            x = inputs_embeds
        B, T, _ = x.shape
        use_cache = c.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=c)
        past = cache.get_seq_length() if cache is not None else 0
        # absolute positions: position_ids from generate count from the first non-pad token, not Grok-1
        positions = kwargs.get("cache_position")
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device)
        if attention_mask is not None:
            key_valid = attention_mask.to(torch.bool)[:, -(past + T):]
        elif input_ids is not None:
            key_valid = torch.cat([torch.ones(B, past, dtype=torch.bool, device=x.device),
                                   input_ids > c.pad_token_id], dim=1)
        else:
            key_valid = torch.ones(B, past + T, dtype=torch.bool, device=x.device)
        cache = cache if use_cache else None
        h = x
        for L in range(c.num_hidden_layers):
            a = self._attention(self._norm(h, L, "rms_norm"), L, positions, key_valid, cache)
            h = h + self._norm(a, L, "rms_norm_1")
            m = self._moe(self._norm(h, L, "rms_norm_2"), L)
            h = h + self._norm(m, L, "rms_norm_3")
        h = self._norm(h, None, None)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self._head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _head(self, h):
        c = self.config
        if LM_HEAD in self.names:
            table = self._mod(LM_HEAD).weight
        else:
            table = self._mod(EMBEDDINGS).weight
        logits = torch.empty(*h.shape[:-1], c.vocab_size, dtype=h.dtype, device=h.device)
        for r0 in range(0, c.vocab_size, _VOCAB_CHUNK):
            logits[..., r0:r0 + _VOCAB_CHUNK] = h @ table[r0:r0 + _VOCAB_CHUNK].to(h.dtype).T
        return _mul_scalar(logits, c.output_multiplier_scale).to(torch.float32)


class GrokForCausalLM(Grok1ModelForCausalLM):
    """The same model for the ``keyfan`` layout, whose config.json says model type ``grok``."""
    config_class = GrokConfig


def _linear_f32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The down projection in float32 (``model.py``'s float32 one-hot einsum), on the bf16 weight."""
    if type(module) is nn.Linear:
        return x @ module.weight.to(torch.float32).T
    w = next(module.parameters(), None)
    return module(x.to(w.dtype if w is not None and w.is_floating_point() else x.dtype)).to(torch.float32)


def _pattern(template: str) -> str:
    """A tensor name template as the regex transformers matches parameter names with."""
    return "^" + re.escape(template).replace(r"\{L\}", r"\d+").replace(r"\{E\}", r"\d+") + "$"
