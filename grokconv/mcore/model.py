"""A Megatron-Core ``GPTModel`` for Grok-1, built from a grokconv Megatron checkpoint's ``args``.

* :func:`transformer_config` maps the checkpoint's ``args`` (Megatron-LM argument names and
  ``TransformerConfig`` fields, as ``grokconv to-megatron`` writes them) to a ``TransformerConfig``:
  RMSNorm, GQA, rotate-half RoPE over all of ``kv_channels``, tanh-GELU gated experts, a float32
  softmax-then-top-k router without renormalisation (``moe_router_pre_softmax=True``,
  ``moe_router_topk_scaling_factor=None``), no biases, no dropout.
* :func:`build_model` builds the ``GPTModel`` with :func:`grokconv.mcore.spec.grok_block_spec` and
  Grok-1's two model-level multipliers: Megatron-Core's own ``use_mup`` / ``mup_embedding_mult`` /
  ``mup_output_mult`` where the installed version has them (0.17 and later), else
  :class:`GrokGPTModel` (0.16.x), which applies the same two products with forward hooks. In bf16 the
  multipliers are first rounded to bf16, as JAX does when the release multiplies a bf16 array by a
  Python float (78.38 becomes 78.5, 0.5774 becomes 0.5781).
* :func:`cpu_stand_ins` is what Megatron-Core 0.16.1 needs to run without a GPU (see there).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile

import torch
from megatron.core.models.gpt import GPTModel

__all__ = ["transformer_config", "build_model", "GrokGPTModel", "cpu_stand_ins", "model_parallel",
           "has_mup", "multipliers"]

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def has_mup() -> bool:
    """Whether the installed Megatron-Core has the MuP multipliers (``TransformerConfig.use_mup``, 0.17+)."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    return "use_mup" in {f.name for f in dataclasses.fields(TransformerConfig)}


def _arg(args, name, default=None):
    v = getattr(args, name, None)
    return default if v is None else v


def multipliers(args, dtype: str) -> tuple[float, float]:
    """(embedding, output) multipliers from ``args``, rounded to the activation dtype as JAX rounds a
    Python float multiplied into a bf16 array."""
    emb = float(_arg(args, "grokconv_embedding_multiplier", 1.0))
    out = float(_arg(args, "grokconv_output_multiplier", 1.0))
    t = _DTYPES[dtype]
    return float(torch.tensor(emb, dtype=t)), float(torch.tensor(out, dtype=t))


def transformer_config(args, *, dtype: str = "bf16", tp: int | None = None, ep: int | None = None,
                       pp: int = 1, sequence_parallel: bool | None = None):
    """A ``TransformerConfig`` for Grok-1 from a checkpoint's ``args`` (parallel sizes from ``args``
    unless given)."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    from .spec import gelu_tanh
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if _arg(args, "grokconv_activation", "gelu_tanh") != "gelu_tanh":
        raise ValueError(f"unknown expert activation {args.grokconv_activation!r}")
    params_dtype = _DTYPES[dtype]
    tp = int(tp or _arg(args, "tensor_model_parallel_size", 1))
    ep = int(ep or _arg(args, "expert_model_parallel_size", 1))
    if sequence_parallel is None:
        sequence_parallel = bool(_arg(args, "sequence_parallel", False)) and tp > 1
    kw = dict(
        num_layers=int(args.num_layers), hidden_size=int(args.hidden_size),
        ffn_hidden_size=int(args.ffn_hidden_size), num_attention_heads=int(args.num_attention_heads),
        num_query_groups=int(args.num_query_groups), kv_channels=int(args.kv_channels),
        num_moe_experts=int(args.num_experts), moe_ffn_hidden_size=int(_arg(args, "moe_ffn_hidden_size",
                                                                             args.ffn_hidden_size)),
        moe_router_topk=int(args.moe_router_topk), moe_router_pre_softmax=True,
        moe_router_score_function="softmax", moe_router_topk_scaling_factor=None, moe_router_dtype="fp32",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
        moe_token_dispatcher_type="allgather",
        normalization="RMSNorm", layernorm_epsilon=float(_arg(args, "layernorm_epsilon", 1e-5)),
        gated_linear_unit=True, activation_func=gelu_tanh, bias_activation_fusion=False,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        softmax_scale=float(args.softmax_scale), apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True, masked_softmax_fusion=False, rotary_interleaved=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
        bf16=dtype == "bf16", fp16=False, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp, sequence_parallel=sequence_parallel,
        use_cpu_initialization=True, perform_initialization=False,
    )
    if has_mup():
        emb, out = multipliers(args, dtype)
        kw.update(use_mup=True, mup_base_hidden_size=int(args.hidden_size), mup_embedding_mult=emb,
                  mup_output_mult=out)
    return TransformerConfig(**kw)


class GrokGPTModel(GPTModel):
    """GPTModel with Grok-1's embedding and output multipliers (for Megatron-Core without ``use_mup``):
    ``embedding(...) * emb`` and ``output_layer(...) * out``, as forward hooks, so the parameters and
    their names are GPTModel's."""

    def __init__(self, *args, embedding_multiplier: float = 1.0, output_multiplier: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedding_multiplier, self.output_multiplier = float(embedding_multiplier), float(output_multiplier)
        if self.pre_process:
            self.embedding.register_forward_hook(self._scale_embeddings)
        if self.post_process:
            self.output_layer.register_forward_hook(self._scale_output)

    def _scale_embeddings(self, module, inputs, output):
        return output * self.embedding_multiplier

    def _scale_output(self, module, inputs, output):
        logits, bias = output
        return logits * self.output_multiplier, bias


def build_model(args, *, dtype: str = "bf16", impl: str | None = None, parallel_output: bool = False, **config_kw):
    """A Grok-1 ``GPTModel`` for the checkpoint ``args``: this rank's pipeline stage (every layer with
    ``pp`` 1); Megatron's parallel state must be initialised (:func:`model_parallel`)."""
    from megatron.core import parallel_state
    from .spec import grok_block_spec
    config = transformer_config(args, dtype=dtype, **config_kw)
    pp = config.pipeline_model_parallel_size
    impl = impl or _arg(args, "transformer_impl", "local")
    spec = grok_block_spec(config, impl, float(_arg(args, "grokconv_attn_logit_cap", 30.0)))
    common = dict(config=config, transformer_layer_spec=spec, vocab_size=int(args.padded_vocab_size),
                  max_sequence_length=int(_arg(args, "max_position_embeddings", args.seq_length)),
                  pre_process=pp == 1 or parallel_state.is_pipeline_first_stage(),
                  post_process=pp == 1 or parallel_state.is_pipeline_last_stage(), parallel_output=parallel_output,
                  share_embeddings_and_output_weights=not _arg(args, "untie_embeddings_and_output_weights", False),
                  position_embedding_type="rope", rotary_percent=float(_arg(args, "rotary_percent", 1.0)),
                  rotary_base=int(_arg(args, "rotary_base", 10000)))
    if has_mup():
        model = GPTModel(**common)
    else:
        emb, out = multipliers(args, dtype)
        model = GrokGPTModel(**common, embedding_multiplier=emb, output_multiplier=out)
    # parameters are params_dtype as Megatron builds them, except the float32 ones Grok-1 keeps float32:
    # the router (Megatron-Core allocates it so) and the GrokRMSNorm scales
    return model


@contextlib.contextmanager
def cpu_stand_ins():
    """What Megatron-Core 0.16.1 needs to run on a CPU, undone on exit:

    * ``torch.cuda.current_device()`` is called unconditionally (RoPE's ``inv_freq`` on first use, the
      global memory buffer of the attention scores, the router moving its weight, the sequence-parallel
      gather buffers): it answers ``cpu`` while inside, when no GPU is present, and ``Tensor.cuda()``
      (the tied embedding's all-reduce between the first and last pipeline stage) returns the tensor;
    * ``moe_utils.te_general_gemm`` is only defined when Transformer Engine imports, but the router
      tests it for ``None``: it is set to ``None`` when missing.
    """
    from megatron.core.transformer.moe import moe_utils
    patched_gemm = not hasattr(moe_utils, "te_general_gemm")
    if patched_gemm:
        moe_utils.te_general_gemm = None
    saved, saved_cuda = torch.cuda.current_device, torch.Tensor.cuda
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.cuda.current_device = saved
        torch.Tensor.cuda = saved_cuda
        if patched_gemm:
            del moe_utils.te_general_gemm


@contextlib.contextmanager
def model_parallel(tp: int = 1, ep: int = 1, *, pp: int = 1, rank: int = 0, world_size: int | None = None,
                   init_file: str | None = None):
    """A gloo process group (unless one exists) and Megatron's model-parallel state for TP ``tp`` x
    EP ``ep`` x PP ``pp``, with the inference RNG tracker (its ``fork`` does nothing, so no CUDA RNG is
    needed); torn down on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom
    world_size = world_size or tp * ep * pp
    own_group = not dist.is_initialized()
    tmp = None
    if own_group:
        if init_file is None:
            fd, tmp = tempfile.mkstemp(prefix="grokconv-gloo-")
            os.close(fd)
            os.unlink(tmp)
            init_file = tmp
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep)
        mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        mrandom.initialize_rng_tracker(force_reset=True)
        if own_group:
            dist.destroy_process_group()
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
