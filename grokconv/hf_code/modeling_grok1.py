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

The module tree is the ``hf`` layout's (hpcai-tech/grok-1's names, which vLLM's Grok-1 loader reads):
``model.embed_tokens``, ``model.layers.N.{pre_attn_norm, attn.{q,k,v,o}_proj, post_attn_norm,
pre_moe_norm, moe_block.gate, moe_block.experts.E.{linear, linear_v, linear_1}, post_moe_norm}``,
``model.norm`` (norm parameters are called ``scale``). The other layouts load through transformers'
own key renaming (``from_pretrained(key_mapping=...)``, set by the class their ``auto_map`` names):
``GrokForCausalLM`` renames the ``keyfan`` names, ``Grok1ForCausalLM`` the ``sglang`` names. Loading
is strict (``output_loading_info`` lists any stored tensor the tree does not have and any parameter no
tensor filled), so a naming mistake in an export fails the load. Linear weights are ``nn.Linear``
modules, so transformers' quantizers (compressed-tensors) can replace them. Positions are absolute
(0.. of the sequence, as Grok-1 has no notion of left padding); padded keys are masked through
``attention_mask`` (``generate`` builds it from ``pad_token_id``) or, without one, where
``input_ids <= pad_token_id`` as the reference does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_grok1 import Grok1Config, GrokConfig

_VOCAB_CHUNK = 16384   # the reference's output projection chunk: the same kernels, the same bits
# transformers 5 calls the cache ``cache``, 4.x ``past_key_values``
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_tanh": "tanh", "gelu": "none"}

# The other layouts' tensor names -> this tree's, as transformers' key renaming applies them: each rule
# in turn, a regex replaced in the stored key (one capturing group, written \1 in the target).
KEYFAN_KEYS = {   # keyfan/grok-1-hf (GrokForCausalLM): the release's own module names
    r"^transformer\.in_out_embed\.weight": "model.embed_tokens.weight",
    r"^transformer\.rms_norm\.weight": "model.norm.scale",
    r"^transformer\.decoder_layer\.": "model.layers.",
    r"\.multi_head_attention\.query\.": ".attn.q_proj.",
    r"\.multi_head_attention\.key\.": ".attn.k_proj.",
    r"\.multi_head_attention\.value\.": ".attn.v_proj.",
    r"\.multi_head_attention\.linear\.": ".attn.o_proj.",
    r"\.rms_norm\.weight": ".pre_attn_norm.scale",
    r"\.rms_norm_1\.weight": ".post_attn_norm.scale",
    r"\.rms_norm_2\.weight": ".pre_moe_norm.scale",
    r"\.rms_norm_3\.weight": ".post_moe_norm.scale",
    r"\.router\.weight": ".moe_block.gate.weight",
    r"\.moe\.(\d+)\.": r".moe_block.experts.\1.",
}
ROUTER_IGNORE = r"re:.*moe_block\.gate$"   # the router, as a compressed-tensors ignore entry
SGLANG_KEYS = {   # SGLang's grok.py (Grok1ForCausalLM): Mixtral-style names and an untied lm_head
    r"\.self_attn\.": ".attn.",
    r"\.block_sparse_moe\.gate\.": ".moe_block.gate.",
    r"\.block_sparse_moe\.experts\.(\d+)\.w1\.": r".moe_block.experts.\1.linear.",
    r"\.block_sparse_moe\.experts\.(\d+)\.w3\.": r".moe_block.experts.\1.linear_v.",
    r"\.block_sparse_moe\.experts\.(\d+)\.w2\.": r".moe_block.experts.\1.linear_1.",
    r"norm\.weight": "norm.scale",
}


class Grok1RMSNorm(nn.Module):
    """RMSNorm in float32 with ``scale`` used directly."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.scale.to(torch.float32) * normed).to(x.dtype)


def _mul_scalar(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x * c`` as JAX computes an array times a Python float: ``c`` is cast to ``x.dtype`` first."""
    return x * torch.tensor(c, dtype=x.dtype, device=x.device)


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    K = x.shape[-1]
    exponents = torch.arange(0, K, 2, dtype=torch.float32, device=x.device)
    inv_freq = 1.0 / (base ** (exponents / K))
    phase = (positions.to(torch.float32)[:, None] * inv_freq[None, :])[None, :, None, :]
    phase = torch.cat([phase, phase], dim=-1)
    rotated = torch.cat([-x[..., K // 2:], x[..., :K // 2]], dim=-1)
    return (x * torch.cos(phase) + rotated * torch.sin(phase)).to(x.dtype)


class Grok1Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        D, K = config.hidden_size, config.head_dim
        Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(D, Hq * K, bias=False)
        self.k_proj = nn.Linear(D, Hkv * K, bias=False)
        self.v_proj = nn.Linear(D, Hkv * K, bias=False)
        self.o_proj = nn.Linear(Hq * K, D, bias=False)

    def forward(self, x, positions, key_valid, cache):
        c = self.config
        B, T, _ = x.shape
        Hq, Hkv, K = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = _rope(self.q_proj(x).view(B, T, Hq, K), positions, c.rope_theta)
        k = _rope(self.k_proj(x).view(B, T, Hkv, K), positions, c.rope_theta)
        v = self.v_proj(x).view(B, T, Hkv, K)
        if cache is not None:
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
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
        return self.o_proj(attn)


class Grok1Expert(nn.Module):
    """``(gelu(x W) * (x V)) W1``: ``linear`` (gate), ``linear_v`` (up), ``linear_1`` (down)."""

    def __init__(self, config):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.linear = nn.Linear(D, F_, bias=False)
        self.linear_v = nn.Linear(D, F_, bias=False)
        self.linear_1 = nn.Linear(F_, D, bias=False)


class Grok1MoeBlock(nn.Module):
    def __init__(self, config, approximate: str):
        super().__init__()
        self.config, self.approximate = config, approximate
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)   # the router
        self.experts = nn.ModuleList(Grok1Expert(config) for _ in range(config.num_experts))

    def forward(self, x):
        c = self.config
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        probs = torch.softmax(flat.to(torch.float32) @ _in_out_f32(self.gate.weight), dim=-1)
        gate, idx = torch.topk(probs, c.num_experts_per_tok, dim=-1)
        gate = gate.to(x.dtype)
        slots = torch.zeros(B * T, c.num_experts_per_tok, D, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = flat[rows]
            up_g = expert.linear(xe).to(torch.float32)
            up_v = expert.linear_v(xe).to(torch.float32)
            act = F.gelu(up_g, approximate=self.approximate) * up_v
            slots[rows, slot] = _linear_f32(expert.linear_1, act)
        out = (gate.to(torch.float32)[..., None] * slots).sum(dim=1)
        return out.to(x.dtype).reshape(B, T, D)


class Grok1DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, approximate: str):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.pre_attn_norm, self.post_attn_norm = Grok1RMSNorm(D, eps), Grok1RMSNorm(D, eps)
        self.attn = Grok1Attention(config, layer_idx)
        self.pre_moe_norm, self.post_moe_norm = Grok1RMSNorm(D, eps), Grok1RMSNorm(D, eps)
        self.moe_block = Grok1MoeBlock(config, approximate)

    def forward(self, h, positions, key_valid, cache):
        h = h + self.post_attn_norm(self.attn(self.pre_attn_norm(h), positions, key_valid, cache))
        return h + self.post_moe_norm(self.moe_block(self.pre_moe_norm(h)))


class Grok1PreTrainedModel(PreTrainedModel):
    config_class = Grok1Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Grok1DecoderLayer"]
    _supports_cache_class = True
    # norms and the router are float32 in the reference, whatever the model's dtype
    _keep_in_fp32_modules_strict = [r"norm\.scale$", r"moe_block\.gate\.weight$"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, Grok1RMSNorm):
            nn.init.ones_(module.scale)


class Grok1Model(Grok1PreTrainedModel):
    def __init__(self, config: Grok1Config):
        super().__init__(config)
        approximate = _GELU.get(config.hidden_act)
        if approximate is None:
            raise ValueError(f"hidden_act {config.hidden_act!r} is not a GELU; Grok-1 uses gelu_pytorch_tanh")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Grok1DecoderLayer(config, L, approximate)
                                    for L in range(config.num_hidden_layers))
        self.norm = Grok1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None, use_cache=None,
                cache_position=None):
        c = self.config
        x = _mul_scalar(self.embed_tokens(input_ids), c.embedding_multiplier_scale) if inputs_embeds is None \
            else inputs_embeds
        B, T, _ = x.shape
        use_cache = c.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=c)
        past = cache.get_seq_length() if cache is not None else 0
        # absolute positions: position_ids from generate count from the first non-pad token, not Grok-1
        positions = cache_position if cache_position is not None else torch.arange(past, past + T, device=x.device)
        if attention_mask is not None:
            key_valid = attention_mask.to(torch.bool)[:, -(past + T):]
        elif input_ids is not None:
            key_valid = torch.cat([torch.ones(B, past, dtype=torch.bool, device=x.device),
                                   input_ids > c.pad_token_id], dim=1)
        else:
            key_valid = torch.ones(B, past + T, dtype=torch.bool, device=x.device)
        cache = cache if use_cache else None
        h = x
        for layer in self.layers:
            h = layer(h, positions, key_valid, cache)
        return self.norm(h), cache


class Grok1ModelForCausalLM(Grok1PreTrainedModel, GenerationMixin):
    """Grok-1 with its head, the ``hf`` layout's names (the output projection is the tied embedding)."""

    _tied_weights_keys = {}
    layout_key_mapping: dict = {}   # stored name -> this tree's name, for layouts that name tensors otherwise

    def __init__(self, config: Grok1Config):
        super().__init__(config)
        self.model = Grok1Model(config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, with this layout's key renaming unless the caller passes its own. A
        compressed-tensors config names the modules it leaves unquantized in the layout's own names;
        the router (float32 in every grokconv export) is added under this tree's name."""
        if cls.layout_key_mapping and kwargs.get("key_mapping") is None:
            kwargs["key_mapping"] = dict(cls.layout_key_mapping)
        config = kwargs.get("config")
        if not isinstance(config, Grok1Config):
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path)
        quant = getattr(config, "quantization_config", None)
        if isinstance(quant, dict) and isinstance(quant.get("ignore"), list) and ROUTER_IGNORE not in quant["ignore"]:
            quant["ignore"] = [*quant["ignore"], ROUTER_IGNORE]
        kwargs["config"] = config
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return None   # tied by computation (h @ emb.T), or a separate lm_head that is never tied

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, return_dict=True, **kwargs):
        cache = kwargs.pop("past_key_values", cache)   # transformers 4.x's name for it
        h, cache = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                              inputs_embeds=inputs_embeds, use_cache=use_cache,
                              cache_position=kwargs.get("cache_position"))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self._head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _output_table(self) -> torch.Tensor:
        return self.model.embed_tokens.weight

    def _head(self, h):
        c = self.config
        table = self._output_table()
        logits = torch.empty(*h.shape[:-1], c.vocab_size, dtype=h.dtype, device=h.device)
        for r0 in range(0, c.vocab_size, _VOCAB_CHUNK):
            logits[..., r0:r0 + _VOCAB_CHUNK] = h @ table[r0:r0 + _VOCAB_CHUNK].to(h.dtype).T
        return _mul_scalar(logits, c.output_multiplier_scale).to(torch.float32)


class GrokForCausalLM(Grok1ModelForCausalLM):
    """The same model for the ``keyfan`` layout (config.json model type ``grok``), its names renamed."""
    config_class = GrokConfig
    layout_key_mapping = KEYFAN_KEYS


class Grok1ForCausalLM(Grok1ModelForCausalLM):
    """The same model for the ``sglang`` layout: its names renamed, and the output projection stored as
    ``lm_head.weight`` (a copy of the embedding, loaded as its own parameter and never tied)."""
    layout_key_mapping = SGLANG_KEYS

    def __init__(self, config: Grok1Config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _output_table(self) -> torch.Tensor:
        return self.lm_head.weight


def _in_out_f32(weight: torch.Tensor) -> torch.Tensor:
    """A stored ``[out, in]`` weight as the reference holds it for a float32 matmul: ``[in, out]``,
    contiguous (a float32 GEMM on a transposed view sums in another order: last bits differ)."""
    return weight.T.contiguous().to(torch.float32)


def _linear_f32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The down projection in float32 (``model.py``'s float32 one-hot einsum), on the bf16 weight."""
    if type(module) is nn.Linear:
        return x @ _in_out_f32(module.weight)
    w = next(module.parameters(), None)
    return module(x.to(w.dtype if w is not None and w.is_floating_point() else x.dtype)).to(torch.float32)
