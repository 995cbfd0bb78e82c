"""Grok-1 as a Megatron-Core legacy torch checkpoint (``grokconv to-megatron``), and the mapping objects
the Megatron reader (``formats/megatron.py``) runs backwards.

Layout (what Megatron-LM's own converter, ``tools/checkpoint/saver_base.py`` + ``save_checkpoint``, writes)::

    DST/latest_checkpointed_iteration.txt          "release" (written last)
    DST/release/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt
        {"args": Namespace, "checkpoint_version": 3.0, "iteration": 0, "model" | "model0".."model{V-1}": {...}}
    DST/grokconv-config.json                       the Grok config (so the way back is exact)

Names come from ``mappings/megatron.json`` (data); the two fused tensors are typed transforms
(:class:`QKVMapping`, :class:`GatedMLPMapping`); the TP/EP/PP/VP arithmetic is ``sharding.py``.

Plan first, from metadata only: every rank file, its tensors, shapes, dtypes and bytes. The largest
rank file must fit ``--memory-limit`` (default 80% of available RAM) or nothing is written. Then one
rank file at a time: read only that rank's slices from the source (its stage's layers, its experts,
its rows/columns), build the state dict, save it under a temporary name, rename, drop it.

Dtypes: linear weights are bf16, exactly the reference dequantization ``bf16(int8 * scale)``.
Embeddings, norms and routers stay float32, as in the original: Megatron copies them into its bf16
(or fp32-master) parameters on load, and keeping them float32 makes original -> Megatron -> original
lossless (the RMSNorm scale and the router are used in float32 by the Grok forward).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .config import CONFIG_FILE, GrokConfig
from .errors import LayoutError
from .formats.atomic import TMP_SUFFIX, atomic_write, atomic_write_text
from .mapping import MAPPINGS_DIR
from .sharding import (Parallel, SPLIT_DIMS, checkpoint_dir_name, chunk_layers, deinterleave_qkv, expert_range,
                       fuse_gated, interleave_qkv, layers_per_chunk, pad_vocab, padded_vocab_size, qkv_groups,
                       tp_merge, tp_merge_transposed, unfuse_gated, validate_parallel)
from .tensor import QInt8, to_torch
from .units import format_bytes

__all__ = ["MegatronLayout", "load_megatron_layout", "TensorMapping", "DirectMapping", "VocabMapping",
           "QKVMapping", "GatedMLPMapping", "RankPlan", "MegatronPlan", "plan_megatron", "megatron_args",
           "to_megatron", "read_block", "IMPLS", "DEFAULT_IMPL", "TRACKER_FILE", "RANK_FILE", "RELEASE_DIR",
           "CHECKPOINT_VERSION"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
RELEASE_DIR = "release"
CHECKPOINT_VERSION = 3.0
MAPPING_FILE = MAPPINGS_DIR / "megatron.json"
# the layer spec a checkpoint is named for (grokconv/mcore/spec.py): Megatron-Core's own modules
# ("local", input norm ``input_layernorm``) or Transformer Engine's (input norm fused into linear_qkv)
IMPLS = ("local", "transformer_engine")
DEFAULT_IMPL = "local"
_DEQUANT_CHUNK = 1 << 24          # elements per float32 temporary when dequantizing a block (64 MiB)
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------
# Reading source slices
# ----------------------------------------------------------------------------------------------------
def read_block(reader, name: str, index: int | None = None, rows: slice | None = None, cols: slice | None = None,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``value[rows, cols]`` of a canonical parameter (Haiku ``[in, out]``), as ``dtype``.

    int8 weights are dequantized exactly as :func:`grokconv.tensor.dequantize` does (``f32(int8) *
    f32(scale)``, one rounding), but only for the block asked for: each row takes the scale of its row
    block. Elementwise, so a block of the dequantization equals the dequantization of the block.
    """
    v = reader.load(name, index)
    if isinstance(v, QInt8):
        w, s = v.weight, v.scales
        K, N = w.shape[-2], w.shape[-1]
        r = rows or slice(0, K)
        c = cols or slice(0, N)
        block = K // s.shape[-2]
        ncols = len(range(N)[c])
        out = torch.empty((len(range(K)[r]), ncols), dtype=dtype)
        step = max(1, _DEQUANT_CHUNK // max(1, ncols))     # bounds the float32 temporaries
        for r0 in range(r.start, r.stop, step):
            r1 = min(r.stop, r0 + step)
            wb = to_torch(np.ascontiguousarray(w[r0:r1, c])).to(torch.float32)
            sb = to_torch(np.ascontiguousarray(s[:, c][np.arange(r0, r1) // block])).to(torch.float32)
            out[r0 - r.start: r1 - r.start] = wb.mul_(sb)
        return out
    a = np.asarray(v)
    if a.ndim == 1:
        a = a[rows] if rows is not None else a
    else:
        a = a[rows or slice(None), cols or slice(None)]
    return to_torch(np.ascontiguousarray(a)).to(dtype)


# ----------------------------------------------------------------------------------------------------
# Mapping objects (Megatron-Bridge style): one per Megatron tensor kind
# ----------------------------------------------------------------------------------------------------
@dataclass
class TensorMapping:
    """One Megatron tensor (per rank) made from one or more canonical parameters.

    ``sources`` maps a part name ("w", or "q"/"k"/"v", or "gate"/"up") to a canonical template with
    ``{L}``; ``target`` has ``{L}`` (local layer) and ``{E}`` (local expert).
    """
    target: str
    sources: dict
    role: str
    split: str                   # column | row | vocab | replicated
    transpose: bool = False
    experts: bool = False
    stage: str | None = None     # None: per layer; "first" / "last": a global tensor of that stage
    dtype: torch.dtype = torch.bfloat16

    @property
    def split_dim(self) -> int | None:
        return SPLIT_DIMS[self.split]

    @property
    def per_layer(self) -> bool:
        return "{L}" in self.target

    def key(self, layer: int | None = None, expert: int | None = None) -> str:
        kw = {}
        if layer is not None:
            kw["L"] = layer
        if expert is not None:
            kw["E"] = expert
        return self.target.format(**kw)

    def canonical(self, part: str, layer: int | None) -> str:
        t = self.sources[part]
        return t.format(L=layer) if "{L}" in t else t

    # -- what subclasses implement -------------------------------------------------------------
    def full_shape(self, cfg: GrokConfig, par: Parallel) -> tuple:
        """Megatron's unsplit shape (``[out, in]``)."""
        raise NotImplementedError

    def rank_shape(self, cfg: GrokConfig, par: Parallel) -> tuple:
        shape = list(self.full_shape(cfg, par))
        if self.split_dim is not None:
            shape[self.split_dim] //= par.tp
        return tuple(shape)

    def build(self, reader, cfg: GrokConfig, par: Parallel, layer: int | None, expert: int | None,
              tp_rank: int) -> torch.Tensor:
        """This TP rank's tensor, read from ``reader`` (only the slices it needs)."""
        raise NotImplementedError

    def merge(self, parts: list, cfg: GrokConfig, par: Parallel, part: str) -> torch.Tensor:
        """All TP ranks' tensors -> canonical ``part`` in Haiku orientation (one copy at most)."""
        raise NotImplementedError


class DirectMapping(TensorMapping):
    """A rename, optionally transposed, split along ``split`` (AutoMapping / Column / Row / Replicated)."""

    def _canon_shape(self, cfg: GrokConfig) -> tuple:
        shape = _spec_shapes(cfg)[self.canonical("w", 0 if self.per_layer else None)]
        return shape[-2:] if len(shape) >= 2 else shape

    def full_shape(self, cfg, par):
        s = self._canon_shape(cfg)
        return tuple(reversed(s)) if self.transpose else tuple(s)

    def build(self, reader, cfg, par, layer, expert, tp_rank):
        name = self.canonical("w", layer)
        full = self.full_shape(cfg, par)
        dim = self.split_dim
        rows = cols = None
        if dim is not None:
            n = full[dim] // par.tp
            sl = slice(tp_rank * n, (tp_rank + 1) * n)
            # Megatron dim `dim` of [out, in] is canonical dim 1-dim when transposed
            canon_dim = (1 - dim) if self.transpose else dim
            rows, cols = (sl, None) if canon_dim == 0 else (None, sl)
        t = read_block(reader, name, expert, rows, cols, self.dtype)
        return t.T.contiguous() if self.transpose else t.contiguous()

    def merge(self, parts, cfg, par, part="w"):
        if self.transpose:
            return tp_merge_transposed(parts, self.split_dim)
        return tp_merge(parts, self.split_dim)


class VocabMapping(DirectMapping):
    """The vocab-parallel embedding table (and an output layer): padded to ``padded_vocab_size`` rows,
    split in contiguous row chunks across TP."""
    pad_mode: str = "replicate"

    def full_shape(self, cfg, par):
        return (padded_vocab_size(cfg.vocab_size, par.make_vocab_size_divisible_by, par.tp), cfg.emb_size)

    def build(self, reader, cfg, par, layer, expert, tp_rank):
        name = self.canonical("w", None)
        V = cfg.vocab_size
        n = self.full_shape(cfg, par)[0] // par.tp
        r0, r1 = tp_rank * n, (tp_rank + 1) * n
        real = read_block(reader, name, None, slice(min(r0, V), min(r1, V)), None, self.dtype)
        if r1 <= V:
            return real.contiguous()
        last = read_block(reader, name, None, slice(V - 1, V), None, self.dtype)
        return pad_vocab(real, n, self.pad_mode, last=last).contiguous()

    def merge(self, parts, cfg, par, part="w"):
        return (parts[0] if len(parts) == 1 else torch.cat(parts, 0))[: cfg.vocab_size]


class QKVMapping(TensorMapping):
    """``linear_qkv.weight``: per query group ``[q heads of g; k_g; v_g]`` (Megatron-Bridge QKVMapping),
    a contiguous chunk of whole groups per TP rank."""

    def full_shape(self, cfg, par):
        return ((cfg.num_q_heads + 2 * cfg.num_kv_heads) * cfg.key_size, cfg.emb_size)

    def build(self, reader, cfg, par, layer, expert, tp_rank):
        hd, hpg = cfg.key_size, cfg.num_q_heads // cfg.num_kv_heads
        g = qkv_groups(cfg.num_kv_heads, par.tp, tp_rank)
        q = read_block(reader, self.canonical("q", layer), None, None,
                       slice(g.start * hpg * hd, g.stop * hpg * hd), self.dtype).T
        k = read_block(reader, self.canonical("k", layer), None, None, slice(g.start * hd, g.stop * hd), self.dtype).T
        v = read_block(reader, self.canonical("v", layer), None, None, slice(g.start * hd, g.stop * hd), self.dtype).T
        return interleave_qkv(q, k, v, len(g) * hpg, len(g), hd).contiguous()

    def merge(self, parts, cfg, par, part):
        n_kv = cfg.num_kv_heads // par.tp
        n_q = cfg.num_q_heads // par.tp
        which = "qkv".index(part)
        return tp_merge_transposed([deinterleave_qkv(p, n_q, n_kv, cfg.key_size)[which] for p in parts], 0)


class GatedMLPMapping(TensorMapping):
    """Expert ``linear_fc1.weight``: ``[gate shard; up shard]`` per TP rank (Megatron-Bridge GatedMLPMapping,
    saver_base ``torch.cat((W, V), dim=-2)``); gate = ``moe/linear`` (the gelu branch), up = ``moe/linear_v``."""

    def full_shape(self, cfg, par):
        return (2 * cfg.ffn_size, cfg.emb_size)

    def rank_shape(self, cfg, par):
        return (2 * cfg.ffn_size // par.tp, cfg.emb_size)

    def build(self, reader, cfg, par, layer, expert, tp_rank):
        n = cfg.ffn_size // par.tp
        cols = slice(tp_rank * n, (tp_rank + 1) * n)
        gate = read_block(reader, self.canonical("gate", layer), expert, None, cols, self.dtype).T
        up = read_block(reader, self.canonical("up", layer), expert, None, cols, self.dtype).T
        return fuse_gated(gate, up).contiguous()

    def merge(self, parts, cfg, par, part):
        which = ("gate", "up").index(part)
        return tp_merge_transposed([unfuse_gated(p)[which] for p in parts], 0)


@lru_cache(maxsize=8)
def _spec_shapes(cfg: GrokConfig) -> dict:
    from .schema import param_specs
    return {s.name: s.shape for s in param_specs(cfg)}


# ----------------------------------------------------------------------------------------------------
# The layout, from mappings/megatron.json
# ----------------------------------------------------------------------------------------------------
_FUSED = {"qkv": (QKVMapping, ("q", "k", "v")), "gated": (GatedMLPMapping, ("gate", "up"))}


class MegatronLayout:
    """The layout for one ``transformer_impl`` (``local`` or ``transformer_engine``): an entry whose
    ``to`` is a table keyed by impl (the input norm: fused into ``linear_qkv`` with Transformer Engine,
    a module of its own otherwise) takes that impl's name."""

    def __init__(self, data: dict, path: Path | None = None, pad_mode: str = "replicate",
                 impl: str = DEFAULT_IMPL):
        self.name = data["layout"]
        self.impl = impl
        self.impls = tuple(data.get("impls", (DEFAULT_IMPL,)))
        if impl not in self.impls:
            raise LayoutError(f"unknown transformer impl {impl!r}; choose {' or '.join(self.impls)}", path=path)
        self.args_template = data.get("args", {})
        dtypes = {role: _DTYPES[d] for role, d in data.get("dtypes", {}).items()}
        self.mappings: list[TensorMapping] = []
        fused: dict[tuple, dict] = {}
        for e in data["tensors"]:
            if isinstance(e["to"], dict):
                if set(e["to"]) != set(self.impls):
                    raise LayoutError(f"entry {e['from']!r}: names for {sorted(e['to'])}, the layout's impls are "
                                      f"{list(self.impls)}", path=path)
                e = {**e, "to": e["to"][impl]}
            common = dict(role=e["role"], split=e.get("tp", "replicated"), transpose=bool(e.get("transpose")),
                          experts=e.get("experts") == "split", stage=e.get("stage"),
                          dtype=dtypes.get(e["role"], torch.bfloat16))
            if common["split"] not in SPLIT_DIMS:
                raise LayoutError(f"entry {e['from']!r}: unknown tp split {e['tp']!r}", path=path)
            if "fuse" in e:
                if e["fuse"] not in _FUSED:
                    raise LayoutError(f"entry {e['from']!r}: unknown fuse {e['fuse']!r}; known: {list(_FUSED)}",
                                      path=path)
                g = fused.setdefault((e["fuse"], e["to"]), {"common": common, "parts": {}, "at": len(self.mappings)})
                g["parts"][e["part"]] = e["from"]
                if len(g["parts"]) == 1:
                    self.mappings.append(None)          # placeholder keeps the file's order
                continue
            cls = VocabMapping if common["split"] == "vocab" else DirectMapping
            self.mappings.append(cls(e["to"], {"w": e["from"]}, **common))
        for (kind, to), g in fused.items():
            cls, parts = _FUSED[kind]
            if set(g["parts"]) != set(parts):
                raise LayoutError(f"fused {kind} tensor {to!r} needs parts {parts}, has {sorted(g['parts'])}",
                                  path=path)
            self.mappings[g["at"]] = cls(to, {p: g["parts"][p] for p in parts}, **g["common"])
        o = data.get("output_layer")
        self.output_layer = VocabMapping(o["to"], {"w": o["from"]}, role=o["role"], split=o.get("tp", "vocab"),
                                         stage=o.get("stage", "last"),
                                         dtype=dtypes.get(o["role"], torch.bfloat16)) if o else None
        for m in self.all_mappings():
            if isinstance(m, VocabMapping):
                m.pad_mode = pad_mode
        self._by_source = {}
        for m in self.mappings:
            for part, tmpl in m.sources.items():
                self._by_source[_compile(tmpl)] = (m, part)

    def all_mappings(self):
        return [*self.mappings, *([self.output_layer] if self.output_layer else [])]

    def find(self, canonical: str) -> tuple[TensorMapping, str, int | None]:
        """canonical name -> (mapping, part, global layer or None)."""
        for rx, (m, part) in self._by_source.items():
            hit = rx.match(canonical)
            if hit:
                g = hit.groupdict()
                return m, part, int(g["L"]) if "L" in g else None
        raise LayoutError(f"layout {self.name!r} has no entry for {canonical!r}")

    def check_coverage(self, cfg: GrokConfig) -> None:
        """Every canonical parameter maps exactly once (STYLE: coverage errors are fatal)."""
        from .schema import param_specs
        for s in param_specs(cfg):
            hits = sum(1 for rx in self._by_source if rx.match(s.name))
            if hits != 1:
                raise LayoutError(f"layout {self.name!r}: {s.name} matches {hits} entries, expected 1")


@lru_cache(maxsize=8)
def load_megatron_layout(pad_mode: str = "replicate", impl: str = DEFAULT_IMPL) -> MegatronLayout:
    try:
        return MegatronLayout(json.loads(MAPPING_FILE.read_text()), MAPPING_FILE, pad_mode, impl)
    except (KeyError, json.JSONDecodeError) as e:
        raise LayoutError(f"malformed mapping file: {e!r}", path=MAPPING_FILE) from None


def _compile(template: str):
    import re
    pat = re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile(f"^{pat}$")


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


def megatron_args(cfg: GrokConfig, par: Parallel, pad_mode: str = "replicate", impl: str = DEFAULT_IMPL
                  ) -> argparse.Namespace:
    """The ``args`` Namespace Megatron reads from a checkpoint, filled from the layout's ``args`` template:
    Megatron-LM argument names and Megatron-Core ``TransformerConfig`` fields only, and what Grok-1 needs
    beyond them under ``grokconv_*`` keys."""
    lay = load_megatron_layout(pad_mode, impl)
    values = cfg.to_dict()
    values.update(transformer_impl=impl,
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


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def default_memory_limit() -> int:
    import psutil
    return int(0.8 * psutil.virtual_memory().available)


def check_memory(plan: MegatronPlan, limit: int) -> None:
    big = plan.largest
    if big.nbytes > limit:
        raise LayoutError(
            f"the largest rank file ({big.relpath}) would hold {format_bytes(big.nbytes)} "
            f"({big.nbytes} bytes), over the memory limit of {format_bytes(limit)} ({limit} bytes): "
            f"a rank file is built in memory before it is saved",
            hint="raise --pp / --ep / --tp to make rank files smaller, or pass a larger --memory-limit")


def build_rank(reader, plan: MegatronPlan, rp: RankPlan, args: argparse.Namespace) -> dict:
    cfg, par = plan.config, plan.par
    models = [OrderedDict() for _ in range(par.chunks)]
    for t in rp.tensors:
        value = t.mapping.build(reader, cfg, par, t.layer, t.expert, rp.tp)
        if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
            raise LayoutError(f"{rp.relpath}: {t.key} built as {tuple(value.shape)} {value.dtype}, "
                              f"planned {tuple(t.shape)} {t.dtype}")
        models[t.chunk][t.key] = value
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    for key, sd in zip(plan.model_keys(), models):
        state[key] = sd
    return state


def _rank_complete(path: Path, args: argparse.Namespace) -> bool:
    """A rank file on disk (renamed into place, so whole) written for the same args is done."""
    if not path.exists():
        return False
    try:
        from .formats.megatron import load_rank_file
        old = load_rank_file(path)
    except Exception:
        return False
    return isinstance(old, dict) and vars(old.get("args", argparse.Namespace())) == vars(args)


def to_megatron(src, dst, *, tp: int = 1, pp: int = 1, ep: int = 1, vp: int | None = None, untie: bool = False,
                memory_limit=None, vocab_pad: str = "replicate", make_vocab_size_divisible_by: int = 128,
                transformer_impl: str = DEFAULT_IMPL, dry_run: bool = False, progress: bool = True, echo=print):
    """Write ``src`` (any readable checkpoint, or an open reader) as a Megatron-Core release checkpoint.

    Returns the :class:`MegatronPlan` when ``dry_run``, else a :class:`grokconv.convert.Summary`.
    """
    from .convert import Summary
    from .runtime import peak_rss_bytes
    from .units import parse_size
    from .formats.base import CheckpointReader, open_checkpoint
    if vocab_pad not in ("replicate", "zero"):
        raise LayoutError(f"unknown vocab padding {vocab_pad!r}; choose replicate or zero")
    reader = src if isinstance(src, CheckpointReader) else open_checkpoint(src)
    cfg = reader.config
    missing = sorted(set(range(cfg.num_layers)) - set(reader.layers))
    if missing:
        raise LayoutError(f"a Megatron checkpoint holds every layer; the source lacks layers {missing[:8]}",
                          path=reader.path)
    # vp=1 is no virtual pipeline: Megatron saves a one-chunk model list as "model"
    par = Parallel(tp, pp, ep, None if vp in (None, 0, 1) else vp, untie, make_vocab_size_divisible_by)
    plan = plan_megatron(cfg, par, vocab_pad, transformer_impl)
    plan.memory_limit = default_memory_limit() if memory_limit is None else parse_size(memory_limit)
    if dry_run:
        return plan                        # the caller shows the plan, and whether it fits
    check_memory(plan, plan.memory_limit)
    args = megatron_args(cfg, par, vocab_pad, transformer_impl)
    dst = Path(dst)
    release = dst / RELEASE_DIR
    planned = {r.dirname for r in plan.ranks}
    if release.is_dir():
        stray = sorted(d.name for d in release.iterdir() if d.name.startswith("mp_rank_") and d.name not in planned)
        if stray:
            raise LayoutError(f"{release} already holds rank directories of another layout ({', '.join(stray[:4])}); "
                              "write to an empty directory", path=dst)
    release.mkdir(parents=True, exist_ok=True)
    (dst / TRACKER_FILE).unlink(missing_ok=True)   # the tracker marks a complete checkpoint: it goes last
    summary = Summary()
    t0 = time.perf_counter()
    from tqdm import tqdm
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="to-megatron",
               disable=not progress, dynamic_ncols=True)
    try:
        for rp in plan.ranks:
            d = release / rp.dirname
            d.mkdir(exist_ok=True)
            for stale in d.glob(f"*{TMP_SUFFIX}"):
                stale.unlink()
            path = d / RANK_FILE
            if _rank_complete(path, args):
                summary.shards_skipped += 1
                bar.update(rp.nbytes)
                continue
            state = build_rank(reader, plan, rp, args)
            with atomic_write(path) as f:
                torch.save(state, f)
            del state
            summary.shards_written += 1
            summary.tensors += len(rp.tensors)
            summary.bytes_written += path.stat().st_size
            bar.update(rp.nbytes)
    finally:
        bar.close()
    cfg.save(dst / CONFIG_FILE)
    for cand in (reader.path / "tokenizer.model", reader.path.parent / "tokenizer.model"):
        if cand.exists() and not (dst / "tokenizer.model").exists():
            shutil.copyfile(cand, dst / "tokenizer.model")
            break
    atomic_write_text(dst / TRACKER_FILE, "release")
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss = peak_rss_bytes()
    return summary
