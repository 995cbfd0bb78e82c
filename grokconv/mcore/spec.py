"""A Grok-1 layer spec for Megatron-Core (tested with megatron-core 0.16.1).

What Grok-1 needs beyond a stock GPT MoE layer, and where it lives here:

* **post-attention norm** (Grok's ``rms_norm_1``, on the attention output before the residual add):
  inside the attention's output projection, as Megatron-Bridge places Gemma-2/3's and OLMo-2's
  output norms: ``self_attention.linear_proj.post_layernorm.weight``
  (:class:`PostNormRowParallelLinear`).
* **post-MoE norm** (``rms_norm_3``, on the gate-weighted sum of the experts, before the residual add):
  a norm of the layer, beside the stock ``pre_mlp_layernorm``: ``post_mlp_layernorm.weight``
  (:class:`GrokTransformerLayer`, through ``TransformerLayer._forward_post_mlp``). Megatron-Bridge has no
  norm on a whole MoE block's output (its Gemma-3 MoE normalises each expert's output before the
  weighted sum, which is a different function), so there is no name to share.
* **attention logit cap** ``cap·tanh(x/cap)`` after the ``softmax_scale`` multiplier and before the
  mask and the float32 softmax (:class:`GrokDotProductAttention`); Megatron-Core has no such option
  in its unfused attention, and Transformer Engine's fused attention has none either, so both impls
  use this core attention.
* **RMSNorm as Grok computes it**: float32 arithmetic, ``scale`` used as is (not 1 + scale), the
  scale kept float32 (:class:`GrokRMSNorm`; parameter name ``weight``, as Megatron's norms).
* tanh-GELU gated experts, the fp32 softmax-then-top-k router without renormalisation, rotate-half
  RoPE over all of ``kv_channels`` and GQA are stock Megatron-Core settings (``model.transformer_config``).

The embedding and output multipliers are model-level, not layer-level: see ``model.py``.

``impl="local"`` uses Megatron-Core's own linears (no Transformer Engine); its input norm is
``input_layernorm.weight``. ``impl="transformer_engine"`` fuses the input norm into
``self_attention.linear_qkv`` (``linear_qkv.layer_norm_weight``), as Megatron's TE specs do; the
pre-MoE norm is ``pre_mlp_layernorm.weight`` in both (MoE layers never fuse it).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

__all__ = ["GROK1_LOGIT_CAP", "IMPLS", "gelu_tanh", "GrokRMSNorm", "PostNormRowParallelLinear",
           "SoftCappedScaleMaskSoftmax", "GrokDotProductAttention", "GrokTransformerLayer",
           "grok_layer_spec", "grok_block_spec", "POST_NORM_KEYS"]

GROK1_LOGIT_CAP = 30.0          # model.py: max_attn_val = 30.0
IMPLS = ("local", "transformer_engine")
# the state-dict names this spec adds to a stock GPT MoE layer (relative to decoder.layers.N.)
POST_NORM_KEYS = ("self_attention.linear_proj.post_layernorm.weight", "post_mlp_layernorm.weight")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """jax.nn.gelu's default (approximate=True), Grok-1's expert activation."""
    return F.gelu(x, approximate="tanh")


class GrokRMSNorm(torch.nn.Module):
    """``scale * x * rsqrt(mean(x^2) + eps)`` in float32, cast back to the input dtype; the scale is a
    float32 parameter named ``weight``. Megatron builds norms as ``(config, hidden_size, eps)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = float(eps)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        # replicated across TP; with sequence parallelism its gradient is all-reduced like Megatron's norms
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)


def _post_norm_linear(base: type) -> type:
    """``base`` (a row-parallel linear) followed by a :class:`GrokRMSNorm` named ``post_layernorm``."""

    class _PostNorm(base):
        def __init__(self, input_size, output_size, *args, config, **kwargs):
            super().__init__(input_size, output_size, *args, config=config, **kwargs)
            self.post_layernorm = GrokRMSNorm(config, output_size, config.layernorm_epsilon)

        def forward(self, *args, **kwargs):
            out, bias = super().forward(*args, **kwargs)
            if bias is not None:
                raise ValueError("Grok-1 has no linear biases; a post-norm after a skipped bias would be wrong")
            return self.post_layernorm(out), bias

    _PostNorm.__name__ = _PostNorm.__qualname__ = f"PostNorm{base.__name__}"
    return _PostNorm


PostNormRowParallelLinear = _post_norm_linear(RowParallelLinear)


class SoftCappedScaleMaskSoftmax(FusedScaleMaskSoftmax):
    """Megatron's unfused scale-mask-softmax with Grok-1's cap: scores (already times softmax_scale)
    in float32 -> ``cap * tanh(x / cap)`` -> mask -> float32 softmax -> the input dtype."""

    def __init__(self, *args, logit_cap: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.logit_cap = float(logit_cap)

    def forward(self, input: torch.Tensor, mask, softmax_offset=None):
        x = input.float()
        if self.scale is not None:
            x = x * self.scale
        cap = self.logit_cap
        x = cap * torch.tanh(x / cap)
        scale, self.scale = self.scale, None          # applied above, before the cap
        try:
            probs = self.forward_torch_softmax(x, mask, softmax_offset)
        finally:
            self.scale = scale
        return probs.to(input.dtype)


class GrokDotProductAttention(DotProductAttention):
    """Megatron-Core's DotProductAttention with :class:`SoftCappedScaleMaskSoftmax` (cap from the class
    attribute ``logit_cap``; :func:`grok_layer_spec` makes a subclass for another value)."""

    logit_cap: float = GROK1_LOGIT_CAP

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        old = self.scale_mask_softmax
        self.scale_mask_softmax = SoftCappedScaleMaskSoftmax(
            input_in_fp16=old.input_in_fp16, input_in_bf16=old.input_in_bf16, attn_mask_type=old.attn_mask_type,
            scaled_masked_softmax_fusion=False, mask_func=old.mask_func, softmax_in_fp32=True, scale=old.scale,
            window_size=old.window_size, logit_cap=self.logit_cap)


class GrokTransformerLayer(TransformerLayer):
    """A TransformerLayer whose MLP (MoE) output goes through ``post_mlp_layernorm`` before the residual
    add (Grok-1's ``rms_norm_3``)."""

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.post_mlp_layernorm = GrokRMSNorm(config, config.hidden_size, config.layernorm_epsilon)

    def _forward_post_mlp(self, mlp_output_with_bias, *args, **kwargs):
        out, bias = mlp_output_with_bias
        if bias is not None:
            raise ValueError("Grok-1 has no MLP biases; a post-norm after a skipped bias would be wrong")
        return super()._forward_post_mlp((self.post_mlp_layernorm(out), bias), *args, **kwargs)


def _core_attention(logit_cap: float) -> type:
    if float(logit_cap) == GROK1_LOGIT_CAP:
        return GrokDotProductAttention
    return type(f"GrokDotProductAttentionCap{logit_cap:g}", (GrokDotProductAttention,),
                {"logit_cap": float(logit_cap)})


def grok_layer_spec(impl: str = "local", logit_cap: float = GROK1_LOGIT_CAP) -> ModuleSpec:
    """The Grok-1 decoder layer for ``impl`` ``local`` or ``transformer_engine``."""
    if impl == "local":
        input_norm, qkv, proj, pre_mlp = GrokRMSNorm, ColumnParallelLinear, PostNormRowParallelLinear, GrokRMSNorm
        fc1, fc2 = ColumnParallelLinear, RowParallelLinear
    elif impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear,
                                                                 TELayerNormColumnParallelLinear,
                                                                 TERowParallelLinear)
        input_norm, qkv, proj, pre_mlp = (IdentityOp, TELayerNormColumnParallelLinear,
                                          _post_norm_linear(TERowParallelLinear), GrokRMSNorm)
        fc1, fc2 = TEColumnParallelLinear, TERowParallelLinear
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))
    return ModuleSpec(
        module=GrokTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(linear_qkv=qkv, core_attention=_core_attention(logit_cap),
                                                   linear_proj=proj, q_layernorm=IdentityOp,
                                                   k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp,
            mlp=ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts, shared_experts=None)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def grok_block_spec(config, impl: str = "local", logit_cap: float = GROK1_LOGIT_CAP, vp_stage=None
                    ) -> TransformerBlockSubmodules:
    """This pipeline stage's Grok-1 layers and the final norm (``decoder.final_layernorm``, a
    :class:`GrokRMSNorm`, so that it also runs with sequence parallelism and without Transformer Engine)."""
    layer = grok_layer_spec(impl, logit_cap)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=GrokRMSNorm)
