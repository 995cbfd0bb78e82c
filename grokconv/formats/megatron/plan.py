"""Planning a Megatron checkpoint from metadata only: every legacy rank file with its tensors, shapes,
dtypes and bytes (:func:`plan_megatron`), and the ``args`` Namespace Megatron-LM reads from a checkpoint
(:func:`megatron_args`), shared by both writers and both readers.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch

from ...config import GrokConfig
from ...errors import LayoutError
from ...sharding import (Parallel, checkpoint_dir_name, chunk_layers, expert_range, layers_per_chunk,
                         padded_vocab_size, validate_parallel)
from .layout import DEFAULT_IMPL, MAPPING_FILE, TensorMapping, load_megatron_layout

__all__ = ["RankTensor", "RankPlan", "MegatronPlan", "plan_megatron", "megatron_args", "TRACKER_FILE",
           "RANK_FILE", "RELEASE_DIR", "CHECKPOINT_VERSION"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
RELEASE_DIR = "release"
CHECKPOINT_VERSION = 3.0

# ----------------------------------------------------------------------------------------------------
# Plan (metadata only)
# ----------------------------------------------------------------------------------------------------
@dataclass
class RankTensor:
    chunk: int
    key: str
    mapping: TensorMapping
    layer: int | None       # global layer
    expert: int | None      # global expert
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class RankPlan:
    tp: int
    pp: int
    ep: int
    dirname: str
    tensors: list = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def relpath(self) -> str:
        return f"{RELEASE_DIR}/{self.dirname}/{RANK_FILE}"


@dataclass
class MegatronPlan:
    config: GrokConfig
    par: Parallel
    ranks: list
    memory_limit: int | None = None

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.ranks)

    @property
    def largest(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.nbytes)

    def model_keys(self) -> list[str]:
        return ["model"] if self.par.vp is None else [f"model{c}" for c in range(self.par.vp)]


def _has_output_layer(par: Parallel) -> bool:
    # Untied: Megatron has a real output_layer on the last stage. Tied with pp > 1: the last stage holds
    # its own copy of the word embeddings as output_layer.weight (saver_base.py: "if pp_rank != 0 and
    # not md.output_layer: Copy word embeddings to final pipeline rank"); tied with pp == 1 the output
    # layer reuses embedding.word_embeddings.weight and is not stored.
    return par.untie or par.pp > 1


def plan_megatron(cfg: GrokConfig, par: Parallel, pad_mode: str = "replicate", impl: str = DEFAULT_IMPL
                  ) -> MegatronPlan:
    validate_parallel(cfg, par)
    lay = load_megatron_layout(pad_mode, impl)
    lay.check_coverage(cfg)
    ranks = []
    for t, p, e in par.ranks():
        rp = RankPlan(t, p, e, checkpoint_dir_name(t, p, e, par.pp, par.ep))
        local_experts = expert_range(cfg.num_experts, par.ep, e)
        for c in range(par.chunks):
            first = p == 0 and c == 0
            last = p == par.pp - 1 and c == par.chunks - 1
            layers = chunk_layers(cfg.num_layers, par.pp, p, par.vp, c)
            for m in lay.mappings:
                if m.stage == "first" and first:
                    rp.tensors.append(RankTensor(c, m.key(), m, None, None, m.rank_shape(cfg, par), m.dtype))
            for local, layer in enumerate(layers):
                for m in lay.mappings:
                    if not m.per_layer:
                        continue
                    if m.experts:
                        for le, ge in enumerate(local_experts):
                            rp.tensors.append(RankTensor(c, m.key(local, le), m, layer, ge, m.rank_shape(cfg, par),
                                                         m.dtype))
                    else:
                        rp.tensors.append(RankTensor(c, m.key(local), m, layer, None, m.rank_shape(cfg, par),
                                                     m.dtype))
            if last:
                for m in lay.mappings:
                    if m.stage == "last":
                        rp.tensors.append(RankTensor(c, m.key(), m, None, None, m.rank_shape(cfg, par), m.dtype))
                if lay.output_layer is not None and _has_output_layer(par):
                    o = lay.output_layer
                    rp.tensors.append(RankTensor(c, o.key(), o, None, None, o.rank_shape(cfg, par), o.dtype))
        ranks.append(rp)
    return MegatronPlan(cfg, par, ranks)


def megatron_args(cfg: GrokConfig, par: Parallel, pad_mode: str = "replicate", impl: str = DEFAULT_IMPL,
                  ckpt_format: str = "torch") -> argparse.Namespace:
    """The ``args`` Namespace Megatron reads from a checkpoint, filled from the layout's ``args`` template:
    Megatron-LM argparse names (``norm_epsilon``, ``num_experts``, ``moe_router_topk``, ...) and Megatron-Core
    ``TransformerConfig`` fields only, and what Grok-1 needs beyond them under ``grokconv_*`` keys."""
    lay = load_megatron_layout(pad_mode, impl)
    values = cfg.to_dict()
    values.update(transformer_impl=impl, ckpt_format=ckpt_format,
        tp=par.tp, pp=par.pp, ep=par.ep, vp=par.vp, untie=par.untie,
        make_vocab_size_divisible_by=par.make_vocab_size_divisible_by,
        padded_vocab_size=padded_vocab_size(cfg.vocab_size, par.make_vocab_size_divisible_by, par.tp),
        num_layers_per_virtual_pipeline_stage=(layers_per_chunk(cfg.num_layers, par.pp, par.vp)
                                               if par.vp is not None else None),
        # tools/checkpoint/saver_base.py: "Sequence parallel is required if use both tensor-parallel and Moe."
        sequence_parallel=par.tp > 1 and cfg.num_experts > 1,
    )

    def fill(v):
        if isinstance(v, str) and v.startswith("{") and v.endswith("}"):
            key = v[1:-1]
            if key not in values:
                raise LayoutError(f"args template names unknown field {key!r}", path=MAPPING_FILE)
            return values[key]
        if isinstance(v, str) and v.startswith("torch."):
            return getattr(torch, v[len("torch."):])
        return v
    args = {k: fill(v) for k, v in lay.args_template.items()}
    # provenance for the way back: the exact Grok config and how the vocab was padded
    args["grokconv_config"] = cfg.to_dict()
    args["grokconv_vocab_padding"] = pad_mode
    return argparse.Namespace(**args)


