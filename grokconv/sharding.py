"""Megatron-Core parallel arithmetic as pure functions: TP split/merge, EP expert ranges, PP/VP layer
ranges, vocab padding, the per-query-group QKV interleave and the gated-MLP ``[gate; up]`` fusion.

Nothing here reads or writes files. Tensors are torch tensors in Megatron's ``[out, in]`` layout.
Every refusal is a :class:`LayoutError` that names the numbers ("cannot split 8 query groups across
tp=16"). Conventions follow Megatron-LM ``tools/checkpoint/saver_base.py`` + ``utils.chunk_weight``
(column = dim 0, row = dim 1, contiguous ``torch.chunk``), Megatron-Bridge ``QKVMapping`` /
``GatedMLPMapping``, and ``megatron/core/transformer/transformer_layer.py:get_transformer_layer_offset``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LayoutError

__all__ = [
    "Parallel", "check_split", "validate_parallel", "tp_split", "tp_shard", "tp_merge", "tp_merge_transposed",
    "SPLIT_DIMS",
    "expert_range", "expert_owner", "layers_per_chunk", "chunk_layers", "layer_location",
    "padded_vocab_size", "pad_vocab", "interleave_qkv", "deinterleave_qkv", "qkv_groups",
    "fuse_gated", "unfuse_gated", "checkpoint_dir_name",
]

# Megatron's split kinds -> the tensor dim that is divided across TP ranks ([out, in] layout).
SPLIT_DIMS = {"column": 0, "vocab": 0, "row": 1, "replicated": None}


@dataclass(frozen=True)
class Parallel:
    """A Megatron parallel layout. ``vp`` None means no virtual pipeline (one ``model`` per file)."""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    vp: int | None = None
    untie: bool = False
    make_vocab_size_divisible_by: int = 128

    @property
    def chunks(self) -> int:
        return self.vp or 1

    def ranks(self):
        """(tp, pp, ep) of every rank file, in the order Megatron's saver writes them (pp, ep, tp)."""
        for p in range(self.pp):
            for e in range(self.ep):
                for t in range(self.tp):
                    yield t, p, e


def check_split(what: str, n: int, parts: int, axis: str) -> None:
    if parts < 1:
        raise LayoutError(f"--{axis} must be at least 1, got {parts}")
    if n % parts:
        raise LayoutError(f"cannot split {n} {what} across {axis}={parts} ({n} is not a multiple of {parts})")


def validate_parallel(cfg, par: Parallel) -> None:
    """Every divisibility rule of the layout, checked before anything is read or written."""
    check_split("query groups (num_kv_heads)", cfg.num_kv_heads, par.tp, "tp")
    check_split("query heads", cfg.num_q_heads, par.tp, "tp")
    check_split("ffn columns (ffn_size)", cfg.ffn_size, par.tp, "tp")
    check_split("experts", cfg.num_experts, par.ep, "ep")
    check_split("layers", cfg.num_layers, par.pp, "pp")
    if par.vp is not None:
        if par.vp < 1:
            raise LayoutError(f"--vp must be at least 1, got {par.vp}")
        if par.pp < 2:
            # megatron/core/parallel_state.py initialize_model_parallel: "pipeline-model-parallel size
            # should be greater than 1 with interleaved schedule"
            raise LayoutError(f"a virtual pipeline (vp={par.vp}) needs pp > 1, got pp={par.pp}")
        check_split("layers", cfg.num_layers, par.pp * par.vp, "pp*vp")


# -- tensor parallel ---------------------------------------------------------------------------------
def tp_split(t: torch.Tensor, tp: int, dim: int | None) -> list[torch.Tensor]:
    """Megatron's ``chunk_weight``: contiguous equal chunks along ``dim`` (None: replicated)."""
    if dim is None:
        return [t] * tp
    if t.shape[dim] % tp:
        raise LayoutError(f"cannot split dim {dim} of size {t.shape[dim]} across tp={tp}")
    return list(torch.chunk(t, tp, dim=dim))


def tp_shard(t: torch.Tensor, tp: int, rank: int, dim: int | None) -> torch.Tensor:
    return tp_split(t, tp, dim)[rank]


def tp_merge(parts: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    """Inverse of :func:`tp_split`; replicated parts must agree (the first is returned)."""
    if dim is None:
        return parts[0]
    return torch.cat(list(parts), dim=dim)


def tp_merge_transposed(parts: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    """``tp_merge(parts, dim).T``, contiguous, built with one allocation (each part copied once)."""
    if dim is None:
        return parts[0].T.contiguous()
    first = parts[0]
    total = sum(p.shape[dim] for p in parts)
    shape = [first.shape[1], first.shape[0]]
    shape[1 - dim] = total
    out = torch.empty(shape, dtype=first.dtype)
    off = 0
    for p in parts:
        n = p.shape[dim]
        out.narrow(1 - dim, off, n).copy_(p.T)
        off += n
    return out


# -- expert parallel ---------------------------------------------------------------------------------
def expert_range(num_experts: int, ep: int, rank: int) -> range:
    """Global experts held by EP rank ``rank``: ``[rank*E/EP, (rank+1)*E/EP)``; local index = e - start."""
    check_split("experts", num_experts, ep, "ep")
    n = num_experts // ep
    return range(rank * n, (rank + 1) * n)


def expert_owner(e: int, num_experts: int, ep: int) -> tuple[int, int]:
    """(EP rank, local expert index) of global expert ``e``."""
    n = num_experts // ep
    return e // n, e % n


# -- pipeline / virtual pipeline ---------------------------------------------------------------------
def layers_per_chunk(num_layers: int, pp: int, vp: int | None) -> int:
    parts = pp * (vp or 1)
    check_split("layers", num_layers, parts, "pp*vp" if vp else "pp")
    return num_layers // parts


def chunk_layers(num_layers: int, pp: int, rank: int, vp: int | None = None, chunk: int = 0) -> range:
    """Global layers of pipeline stage ``rank``, virtual chunk ``chunk``.

    ``get_transformer_layer_offset`` (uniform split): ``offset = vp_stage * (L / vp) + pp_rank * (L / pp / vp)``,
    i.e. chunk v of stage p starts at ``(v * pp + p) * layers_per_chunk``: chunks go round-robin over the
    stages, as the interleaved 1F1B schedule runs them. Without a virtual pipeline: ``p * L / pp``.
    """
    n = layers_per_chunk(num_layers, pp, vp)
    start = (chunk * pp + rank) * n
    return range(start, start + n)


def layer_location(layer: int, num_layers: int, pp: int, vp: int | None = None) -> tuple[int, int, int]:
    """(pipeline rank, virtual chunk, local index) of a global layer; inverse of :func:`chunk_layers`."""
    n = layers_per_chunk(num_layers, pp, vp)
    block, local = divmod(layer, n)
    chunk, rank = divmod(block, pp)
    return rank, chunk, local


# -- vocabulary --------------------------------------------------------------------------------------
def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """``vocab_size_with_padding``: round up to a multiple of ``make_vocab_size_divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def pad_vocab(t: torch.Tensor, rows: int, mode: str = "replicate", last: torch.Tensor | None = None) -> torch.Tensor:
    """Pad ``t`` (the real rows of a table, or of one TP rank's slice of it) with rows up to ``rows``.

    ``replicate`` repeats the table's last real row ``last`` (default ``t[-1:]``), as Megatron-LM's
    checkpoint saver does (``saver_base.pad_weight``: "Expanding embedding to larger size by replicating
    final entry"), so a padded id that wins an argmax and is clamped to ``vocab-1`` by Megatron's sampler
    still names the same token; ``zero`` writes zero rows.
    """
    extra = rows - t.shape[0]
    if extra < 0:
        raise LayoutError(f"{t.shape[0]} rows do not fit a padded size of {rows}")
    if extra == 0:
        return t
    if mode == "replicate":
        src = t[-1:] if last is None else last.reshape(1, *t.shape[1:])
        if src.shape[0] == 0:
            raise LayoutError("cannot replicate the last row of an empty table")
        fill = src.expand(extra, *t.shape[1:])
    elif mode == "zero":
        fill = t.new_zeros(extra, *t.shape[1:])
    else:
        raise LayoutError(f"unknown vocab padding {mode!r}; choose replicate or zero")
    return torch.cat([t, fill], dim=0)


# -- fused QKV ---------------------------------------------------------------------------------------
def qkv_groups(num_kv_heads: int, tp: int, rank: int) -> range:
    """Query groups held by TP rank ``rank``: a contiguous chunk of the interleaved tensor is whole groups."""
    check_split("query groups", num_kv_heads, tp, "tp")
    n = num_kv_heads // tp
    return range(rank * n, (rank + 1) * n)


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                   head_dim: int) -> torch.Tensor:
    """``[q heads of group g; k_g; v_g]`` for each group g -> ``[(nq + 2 nkv) * hd, H]``.

    ``q`` is ``[nq*hd, H]``, ``k`` and ``v`` ``[nkv*hd, H]`` (``[out, in]``); query head h belongs to
    group ``h // (nq / nkv)`` (Grok-1: ``h // 6``), as Megatron-Core's GQA and Grok's reshape agree.
    """
    check_split("query heads", num_q_heads, num_kv_heads, "query groups")
    hpg = num_q_heads // num_kv_heads
    H = q.shape[-1]
    _expect(q, (num_q_heads * head_dim, H), "q")
    _expect(k, (num_kv_heads * head_dim, H), "k")
    _expect(v, (num_kv_heads * head_dim, H), "v")
    qg = q.reshape(num_kv_heads, hpg * head_dim, H)
    kg = k.reshape(num_kv_heads, head_dim, H)
    vg = v.reshape(num_kv_heads, head_dim, H)
    return torch.cat([qg, kg, vg], dim=1).reshape((num_q_heads + 2 * num_kv_heads) * head_dim, H)


def deinterleave_qkv(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of :func:`interleave_qkv` -> (q, k, v), each ``[out, H]``."""
    hpg = num_q_heads // num_kv_heads
    H = qkv.shape[-1]
    _expect(qkv, ((num_q_heads + 2 * num_kv_heads) * head_dim, H), "qkv")
    g = qkv.reshape(num_kv_heads, (hpg + 2) * head_dim, H)
    q = g[:, : hpg * head_dim].reshape(num_q_heads * head_dim, H)
    k = g[:, hpg * head_dim: (hpg + 1) * head_dim].reshape(num_kv_heads * head_dim, H)
    v = g[:, (hpg + 1) * head_dim:].reshape(num_kv_heads * head_dim, H)
    return q, k, v


# -- gated MLP ---------------------------------------------------------------------------------------
def fuse_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One TP rank's ``linear_fc1``: ``[gate shard; up shard]`` (each ``[F/TP, H]``) along dim 0."""
    if gate.shape != up.shape:
        raise LayoutError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} shards differ in shape")
    return torch.cat([gate, up], dim=0)


def unfuse_gated(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One TP rank's ``linear_fc1`` -> (gate shard, up shard)."""
    if fc1.shape[0] % 2:
        raise LayoutError(f"linear_fc1 has {fc1.shape[0]} rows, not [gate; up] halves")
    n = fc1.shape[0] // 2
    return fc1[:n], fc1[n:]


# -- file names --------------------------------------------------------------------------------------
def checkpoint_dir_name(tp_rank: int, pp_rank: int, ep_rank: int, pp: int, ep: int) -> str:
    """``megatron/training/checkpointing.py:get_checkpoint_name``: ``mp_rank_{tp:02d}``, plus
    ``_{pp:03d}`` when pipeline parallel (PP > 1), plus ``_{ep:03d}`` when expert parallel (EP > 1)."""
    name = f"mp_rank_{tp_rank:02d}" if pp <= 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name + (f"_{ep_rank:03d}" if ep > 1 else "")


def _expect(t: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise LayoutError(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
