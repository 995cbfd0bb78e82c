"""The Megatron-Core layout of Grok-1: the typed mappings (Megatron-Bridge style) and the layout loader.

Names come from ``mappings/megatron.json`` (data); the two fused tensors are typed transforms
(:class:`QKVMapping`, :class:`GatedMLPMapping`); the TP/EP/PP/VP arithmetic is ``sharding.py``. A
mapping builds one TP rank's tensor from the source (only the slices it needs) and merges the TP
ranks' tensors back into a canonical parameter; the legacy writer, the torch_dist writer (which
builds a TP-``k`` rank's tensor as one chunk of the global tensor) and both readers use these.

Dtypes: linear weights are bf16, exactly the reference dequantization ``bf16(int8 * scale)``.
Embeddings, norms and routers stay float32, as in the original: Megatron copies them into its bf16
(or fp32-master) parameters on load, and keeping them float32 makes original -> Megatron -> original
lossless (the RMSNorm scale and the router are used in float32 by the Grok forward).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ...config import GrokConfig
from ...errors import LayoutError
from ...mapping import MAPPINGS_DIR
from ...quant.rowblocks import dequantize_rowblocks
from ...sharding import (Parallel, SPLIT_DIMS, deinterleave_qkv, fuse_gated, interleave_qkv, pad_vocab,
                         padded_vocab_size, qkv_groups, tp_merge, tp_merge_transposed, unfuse_gated)
from ...tensor import QInt8, to_torch

__all__ = ["MegatronLayout", "load_megatron_layout", "TensorMapping", "DirectMapping", "VocabMapping",
           "QKVMapping", "GatedMLPMapping", "read_block", "IMPLS", "DEFAULT_IMPL", "MAPPING_FILE"]

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

    int8 weights are dequantized by :func:`grokconv.quant.rowblocks.dequantize_rowblocks` (``bf16(int8 *
    scale)``, one rounding), one row block's part of the slice at a time (each piece takes its block's
    scales), in pieces of bounded size. Elementwise, so a block of the dequantization equals the
    dequantization of the block.
    """
    v = reader.load(name, index)
    if isinstance(v, QInt8):
        w, s = v.weight, v.scales
        K, N = w.shape[-2], w.shape[-1]
        r = rows or slice(0, K)
        c = cols or slice(0, N)
        block = K // s.shape[-2]
        out = torch.empty((len(range(K)[r]), len(range(N)[c])), dtype=torch.bfloat16)
        step = max(1, _DEQUANT_CHUNK // max(1, out.shape[1]))     # bounds the float32 temporaries
        r0 = r.start
        while r0 < r.stop:
            r1 = min(r.stop, r0 + step, (r0 // block + 1) * block)   # within one row block
            q = to_torch(np.ascontiguousarray(w[r0:r1, c]))
            sc = to_torch(np.ascontiguousarray(s[r0 // block: r0 // block + 1, c]))
            out[r0 - r.start: r1 - r.start] = dequantize_rowblocks(q, sc)
            r0 = r1
        return out if dtype == torch.bfloat16 else out.to(dtype)
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
        n = self.full_shape(cfg, par)[0] // par.tp
        return self.build_rows(reader, cfg, tp_rank * n, (tp_rank + 1) * n)

    def build_rows(self, reader, cfg, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the padded table (rows past the vocabulary are padding)."""
        name = self.canonical("w", None)
        V = cfg.vocab_size
        real = read_block(reader, name, None, slice(min(r0, V), min(r1, V)), None, self.dtype)
        if r1 <= V:
            return real.contiguous()
        last = read_block(reader, name, None, slice(V - 1, V), None, self.dtype)
        return pad_vocab(real, r1 - r0, self.pad_mode, last=last).contiguous()

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
        gate = self.build_part(reader, cfg, par, layer, expert, tp_rank, "gate")
        up = self.build_part(reader, cfg, par, layer, expert, tp_rank, "up")
        return fuse_gated(gate, up).contiguous()

    def build_part(self, reader, cfg, par, layer, expert, tp_rank, part: str) -> torch.Tensor:
        """This TP rank's rows of one half (``gate`` or ``up``), ``[ffn_size / tp, emb]``."""
        n = cfg.ffn_size // par.tp
        cols = slice(tp_rank * n, (tp_rank + 1) * n)
        return read_block(reader, self.canonical(part, layer), expert, None, cols, self.dtype).T.contiguous()

    def merge(self, parts, cfg, par, part):
        which = ("gate", "up").index(part)
        return tp_merge_transposed([unfuse_gated(p)[which] for p in parts], 0)


@lru_cache(maxsize=8)
def _spec_shapes(cfg: GrokConfig) -> dict:
    from ...schema import param_specs
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
        from ...schema import param_specs
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


