"""What a reader takes from a Megatron checkpoint's ``args``: the parallel layout, the layer spec, and a
Grok config (from ``grokconv-config.json`` beside the tracker, else ``args.grokconv_config``, else the
Megatron-LM arguments themselves), each value checked before it is used."""
from __future__ import annotations

import argparse
from pathlib import Path

from ...config import CONFIG_FILE, GrokConfig, load_preset
from ...errors import CheckpointFormatError, LayoutError, ShapeMismatchError
from ...sharding import Parallel, validate_parallel

__all__ = ["transformer_impl", "size_arg", "config_from_args", "parallel_from_args", "resolve_config",
           "check_args"]


def parallel_from_args(args: argparse.Namespace, where) -> Parallel:
    vp = size_arg(args, "virtual_pipeline_model_parallel_size", None, where)
    return Parallel(size_arg(args, "tensor_model_parallel_size", 1, where),
                    size_arg(args, "pipeline_model_parallel_size", 1, where),
                    size_arg(args, "expert_model_parallel_size", 1, where),
                    vp if vp not in (None, 1) else None,
                    bool(getattr(args, "untie_embeddings_and_output_weights", False)),
                    size_arg(args, "make_vocab_size_divisible_by", 128, where))


def resolve_config(root: Path, args: argparse.Namespace, where) -> tuple[GrokConfig, str]:
    """(config, where it came from)."""
    if (root / CONFIG_FILE).exists():
        return GrokConfig.load(root / CONFIG_FILE), str(root / CONFIG_FILE)
    stored = getattr(args, "grokconv_config", None)
    if stored is not None:
        return GrokConfig.from_dict(stored, path=where), f"the args of {where}"
    return config_from_args(args, where), f"the args of {where}"


def transformer_impl(keys, args: argparse.Namespace) -> str:
    """The layer spec a checkpoint is named for: by its input-norm keys (the only names that differ),
    else ``args.transformer_impl``."""
    if any(k.endswith(".input_layernorm.weight") for k in keys):
        return "local"
    if any(k.endswith(".self_attention.linear_qkv.layer_norm_weight") for k in keys):
        return "transformer_engine"
    impl = getattr(args, "transformer_impl", None)
    return impl if impl in ("local", "transformer_engine") else "local"


def size_arg(args, name: str, default, where) -> int | None:
    """A parallel size from args: a positive integer (or absent)."""
    v = getattr(args, name, None)
    if v is None or v == 0 and default is not None:
        return default
    if type(v) is not int or not 1 <= v <= 1 << 16:
        raise CheckpointFormatError(f"args {name} = {str(v)[:20]} is not a positive integer", path=where)
    return v


def config_from_args(a: argparse.Namespace, where) -> GrokConfig:
    """A GrokConfig from Megatron args alone (a checkpoint written by something other than grokconv)."""
    base = load_preset("grok-1")
    try:
        fields = dict(vocab_size=int(getattr(a, "vocab_size", None) or a.padded_vocab_size),
                      emb_size=int(a.hidden_size), key_size=int(a.kv_channels), num_q_heads=int(a.num_attention_heads),
                      num_kv_heads=int(a.num_query_groups or a.num_attention_heads), num_layers=int(a.num_layers),
                      num_experts=int(a.num_experts), num_selected_experts=int(a.moe_router_topk),
                      sequence_len=int(a.max_position_embeddings))
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"args lack what a Grok-1 config needs ({e}); add {CONFIG_FILE} beside "
                                    "latest_checkpointed_iteration.txt", path=where) from None
    for src, dst in (("softmax_scale", "attn_output_multiplier"), ("grokconv_attn_logit_cap", "max_attn_value"),
                     ("grokconv_embedding_multiplier", "embedding_multiplier_scale"),
                     ("grokconv_output_multiplier", "output_multiplier_scale"), ("rotary_base", "rope_base"),
                     ("layernorm_epsilon", "rms_norm_eps"), ("norm_epsilon", "rms_norm_eps")):
        v = getattr(a, src, None)
        if v is not None:
            fields[dst] = v
    d = {**{k: v for k, v in base.to_dict().items() if k != "ffn_size"}, **fields}
    cfg = GrokConfig.from_dict(d, path=where)
    F = getattr(a, "moe_ffn_hidden_size", None) or getattr(a, "ffn_hidden_size", None)
    if type(F) is not int or not 0 < F <= 1 << 20:
        raise CheckpointFormatError(f"args ffn_hidden_size {str(F)[:20]} is not a size", path=where)
    if F != cfg.ffn_size:
        cfg = GrokConfig.from_dict({**d, "widening_factor": F * 3 / (2 * cfg.emb_size)}, path=where)
        if cfg.ffn_size != F:
            raise CheckpointFormatError(f"ffn_hidden_size {F} cannot be derived as Grok-1 derives it", path=where)
    return cfg


def check_args(a: argparse.Namespace, cfg: GrokConfig, par, config_source: str, where) -> None:
    """The checkpoint's own args agree with the Grok config, and its layout is one the config can have."""
    want = {"num_layers": cfg.num_layers, "hidden_size": cfg.emb_size, "num_attention_heads": cfg.num_q_heads,
            "num_query_groups": cfg.num_kv_heads, "num_experts": cfg.num_experts}
    for k, v in want.items():
        got = getattr(a, k, None)
        if got is not None and got != v:
            raise ShapeMismatchError(f"checkpoint args {k}={str(got)[:20]}, but the Grok config says {v} "
                                     f"(config: {config_source})", path=where, expected=v, got=got)
    try:
        validate_parallel(cfg, par)
    except LayoutError as e:
        raise CheckpointFormatError(f"args hold a parallel layout the config cannot have: {e}", path=where) from None
