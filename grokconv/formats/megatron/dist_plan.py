"""The torch_dist checkpoint of Grok-1 as a plan, from metadata only: every global tensor Megatron-Core's
``dist_checkpointing`` asks for, its chunks, and every ``_extra_state`` object.

Keys and shapes are what Megatron-Core 0.16.1's ``sharded_state_dict()`` of grokconv's Grok-1 spec asks
for (``../shared/reference/megatron-dist-checkpoint.md``; tests/test_megatron_dist.py compares them with
a model's own):

* ``decoder.layers.{L}.X`` -> key ``decoder.layers.X``, global shape ``(L, *shape)``, chunk offset
  ``(l, 0, ...)``; experts ``...mlp.experts.local_experts.{E}.Y`` -> ``...mlp.experts.experts.Y``,
  global ``(L, E, *shape)``; other names stay.
* Global tensors are the TP 1 tensors (QKV interleaved per query group, expert ``linear_fc1`` is
  ``[all gate rows; all up rows]``), the embedding padded for the ``--tp`` the args name.
* Chunks: a TP-split tensor is cut along its TP dimension into ``k`` pieces, ``k`` a multiple of the
  largest TP the config allows (``gcd(kv heads, q heads, ffn)``: 8 for Grok-1), doubled while a piece
  is over ``CHUNK_BYTES``, so every TP layout reads only chunks it keeps (the loader reads whole
  chunks) and one chunk is all the writer holds. ``linear_fc1`` is cut in its gate and up halves alike.
* ``LINEAR._extra_state/shard_{offsets}_{shape}`` objects (``torch.save([None])``) for every linear:
  the loader asks for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...config import GrokConfig
from ...errors import LayoutError
from ...sharding import Parallel, validate_parallel
from .layout import (DEFAULT_IMPL, GatedMLPMapping, QKVMapping, TensorMapping, VocabMapping,
                     load_megatron_layout)

__all__ = ["DistChunk", "DistTensor", "DistPlan", "plan_dist", "dist_key", "check_tiling", "CHUNK_BYTES",
           "max_tp"]

CHUNK_BYTES = 64 << 20


def dist_key(target: str) -> str:
    """Megatron-Core's key of a state-dict name (layer and local expert numbers dropped)."""
    return (target.replace("decoder.layers.{L}.", "decoder.layers.")
            .replace("mlp.experts.local_experts.{E}.", "mlp.experts.experts."))


def max_tp(cfg: GrokConfig) -> int:
    """The largest tensor-parallel size the config allows (validate_parallel's three divisibility rules)."""
    return math.gcd(cfg.num_kv_heads, cfg.num_q_heads, cfg.ffn_size)


@dataclass(frozen=True)
class DistChunk:
    offsets: tuple          # global offsets (layer, [expert,] ...)
    sizes: tuple
    layer: int | None
    expert: int | None
    piece: tuple            # how the mapping builds it: ("whole",) | ("tp", k, i) | ("gated", k, i, part) | ("rows", r0, r1)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass
class DistTensor:
    key: str
    mapping: TensorMapping
    shape: tuple            # global
    dtype: torch.dtype
    chunks: list = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class DistPlan:
    config: GrokConfig
    par: Parallel
    tensors: list
    objects: list           # _extra_state unique keys

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_chunk(self) -> int:
        return max(c.numel * torch.empty((), dtype=t.dtype).element_size() for t in self.tensors for c in t.chunks)

    def build(self, reader, t: DistTensor, c: DistChunk) -> torch.Tensor:
        """One chunk, read from ``reader`` (only the slices it needs), checked against the plan."""
        m, cfg, kind = t.mapping, self.config, c.piece[0]
        if kind == "whole":
            v = m.build(reader, cfg, Parallel(1, 1, 1, None, self.par.untie, self.par.make_vocab_size_divisible_by),
                        c.layer, c.expert, 0)
        elif kind == "tp":
            v = m.build(reader, cfg, Parallel(tp=c.piece[1]), c.layer, c.expert, c.piece[2])
        elif kind == "gated":
            v = m.build_part(reader, cfg, Parallel(tp=c.piece[1]), c.layer, c.expert, c.piece[2], c.piece[3])
        else:
            v = m.build_rows(reader, cfg, c.piece[1], c.piece[2])
        want = c.sizes[len(c.sizes) - v.dim():]
        if tuple(v.shape) != tuple(want) or v.dtype != t.dtype or math.prod(want) != c.numel:
            raise LayoutError(f"{t.key} chunk at {c.offsets}: built {tuple(v.shape)} {v.dtype}, planned "
                              f"{tuple(c.sizes)} {t.dtype}")
        return v.reshape(c.sizes)


def _pieces(m: TensorMapping, full: tuple, cfg: GrokConfig, chunk_bytes: int, itemsize: int) -> list:
    """(offset along the split dim, size, piece) of the chunks of one layer's (and expert's) tensor."""
    d = m.split_dim
    if d is None:
        return [(0, None, ("whole",))]
    n = full[d]
    k = max_tp(cfg)
    if isinstance(m, VocabMapping):
        k = math.gcd(n, k)
    if not isinstance(m, QKVMapping):        # a QKV piece is whole query groups: k stays <= kv heads
        halves = 2 if isinstance(m, GatedMLPMapping) else 1
        row = math.prod(full) // n * itemsize
        while n // halves // k * row > chunk_bytes and (n // halves) % (2 * k) == 0:
            k *= 2
    if isinstance(m, GatedMLPMapping):
        half = n // 2
        s = half // k
        return [(p * half + i * s, s, ("gated", k, i, part)) for p, part in enumerate(("gate", "up"))
                for i in range(k)]
    s = n // k
    if isinstance(m, VocabMapping):
        return [(i * s, s, ("rows", i * s, (i + 1) * s)) for i in range(k)]
    return [(i * s, s, ("tp", k, i)) for i in range(k)]


def plan_dist(cfg: GrokConfig, par: Parallel, pad_mode: str = "replicate", impl: str = DEFAULT_IMPL,
              chunk_bytes: int = CHUNK_BYTES) -> DistPlan:
    validate_parallel(cfg, par)
    lay = load_megatron_layout(pad_mode, impl)
    lay.check_coverage(cfg)
    L, E = cfg.num_layers, cfg.num_experts
    mappings = [*lay.mappings, *([lay.output_layer] if lay.output_layer is not None and par.untie else [])]
    tensors, objects = [], []
    for m in mappings:
        full = tuple(m.full_shape(cfg, par))
        lead = ((L,) if m.per_layer else ()) + ((E,) if m.experts else ())
        t = DistTensor(dist_key(m.target), m, lead + full, m.dtype)
        d = m.split_dim
        pieces = _pieces(m, full, cfg, chunk_bytes, torch.empty((), dtype=m.dtype).element_size())
        for idx in _lead_indices(lead):
            layer = idx[0] if m.per_layer else None
            expert = idx[-1] if m.experts else None
            for off, size, piece in pieces:
                offs, sizes = [0] * len(full), list(full)
                if d is not None:
                    offs[d], sizes[d] = off, size
                t.chunks.append(DistChunk(tuple(idx) + tuple(offs), (1,) * len(idx) + tuple(sizes), layer, expert,
                                          piece))
        tensors.append(t)
        if m.role == "linear" or m is lay.output_layer:
            module = dist_key(m.target).rsplit(".", 1)[0] + "._extra_state"
            shape = lead or (1,)
            for idx in _lead_indices(lead) if lead else [(0,)]:
                objects.append(f"{module}/shard_{'.'.join(map(str, idx))}_{'.'.join(map(str, shape))}")
    plan = DistPlan(cfg, par, tensors, objects)
    for t in tensors:
        check_tiling(t.key, t.shape, [(c.offsets, c.sizes) for c in t.chunks])
    return plan


def _lead_indices(lead: tuple):
    if not lead:
        return [()]
    out = [()]
    for n in lead:
        out = [(*o, i) for o in out for i in range(n)]
    return out


def check_tiling(key: str, shape: tuple, chunks: list) -> None:
    """The chunks ``[(offsets, sizes)]`` tile ``shape`` exactly: each inside it, no two overlapping, none
    missing. (Megatron-Core's loader checks none of this: a missing chunk loads as uninitialised memory.)
    On the grid of every chunk's boundaries, each cell must be covered exactly once."""
    nd = len(shape)
    cuts = [{0, shape[i]} for i in range(nd)]
    for offs, sizes in chunks:
        if len(offs) != nd or len(sizes) != nd:
            raise LayoutError(f"{key}: a chunk of rank {len(offs)} in a tensor of rank {nd}")
        for i in range(nd):
            if offs[i] < 0 or sizes[i] <= 0 or offs[i] + sizes[i] > shape[i]:
                raise LayoutError(f"{key}: chunk at {tuple(offs)} of size {tuple(sizes)} leaves the global shape "
                                  f"{tuple(shape)}")
            cuts[i].update((offs[i], offs[i] + sizes[i]))
    grid = [sorted(c) for c in cuts]
    pos = [{v: j for j, v in enumerate(g)} for g in grid]
    cells = math.prod(len(g) - 1 for g in grid)
    if cells > 1 << 24:
        raise LayoutError(f"{key}: {cells} grid cells, too many to check")
    seen = set()
    for offs, sizes in chunks:
        ranges = [range(pos[i][offs[i]], pos[i][offs[i] + sizes[i]]) for i in range(nd)]
        for cell in _product(ranges):
            if cell in seen:
                raise LayoutError(f"{key}: chunks overlap at grid cell {cell} (chunk at {tuple(offs)})")
            seen.add(cell)
    if len(seen) != cells:
        raise LayoutError(f"{key}: the chunks cover {len(seen)} of {cells} grid cells of {tuple(shape)}: part of "
                          "the tensor would be missing")


def _product(ranges):
    import itertools
    return itertools.product(*ranges)
