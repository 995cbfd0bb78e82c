"""Megatron-Core torch_dist checkpoints read back as canonical Grok-1 tensors.

``ITER_DIR/common.pt`` gives the args (loaded weights-only, :mod:`.rankfile`); ``ITER_DIR/.metadata``
(a pickle, loaded by an unpickler that only knows the classes of PyTorch DCP's metadata) gives every
global tensor, its chunks and where their bytes are. Each chunk is a ``torch.save`` zip inside a
``*.distcp`` file, loaded weights-only from those bytes alone. A parameter is assembled from the
chunks of its layer (and expert) of the global tensor, which is the TP 1 tensor: the mapping objects
(:mod:`.layout`) run backwards on it as on a one-rank legacy checkpoint. Before anything is read, the
metadata is checked against the plan (:mod:`.dist_plan`): every key, global shape and floating dtype,
each file named and every byte range inside its file, and each tensor's chunks tiling it exactly.
"""
from __future__ import annotations

import argparse
import io
import math
import mmap
import pickle
import threading
from pathlib import Path

import numpy as np
import torch

from ...errors import CheckpointFormatError, MissingTensorError, ShapeMismatchError, UnsafePickleError
from ...sharding import Parallel
from ...tensor import from_torch
from ..base import CheckpointReader, StoredTensor
from .chunk_check import chunk_problem
from .args_read import check_args, parallel_from_args, resolve_config, transformer_impl
from .dist_plan import check_tiling, plan_dist
from .layout import load_megatron_layout
from .rankfile import load_rank_file

__all__ = ["DistCheckpoint", "load_dist_metadata"]

_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_DCP, n) for n in ("Metadata", "MetadataIndex", "TensorStorageMetadata", "ChunkStorageMetadata",
                                 "TensorProperties", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
                                 "StorageMeta")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
_MAX_METADATA = 1 << 30


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch.Size, dtypes and layouts; any other global is refused."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(f"the .metadata pickle names the global {module}.{name}, which is not one of "
                                "PyTorch DCP's metadata types; refusing to load it", global_name=f"{module}.{name}")


def load_dist_metadata(path: Path):
    from torch.distributed.checkpoint.metadata import Metadata
    try:
        if path.stat().st_size > _MAX_METADATA:
            raise CheckpointFormatError(f".metadata is {path.stat().st_size} bytes, more than any checkpoint "
                                        "needs", path=path)
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except UnsafePickleError as e:
        e.path = path
        raise
    except (CheckpointFormatError, MemoryError):
        raise
    except Exception as e:
        raise CheckpointFormatError(f"cannot read the DCP metadata: {type(e).__name__}: {str(e)[:120]}",
                                    path=path) from None
    if not isinstance(meta, Metadata) or not isinstance(getattr(meta, "state_dict_metadata", None), dict) \
            or not isinstance(getattr(meta, "storage_data", None), dict):
        raise CheckpointFormatError("the .metadata pickle is not a DCP Metadata with state_dict_metadata and "
                                    "storage_data", path=path)
    bad = _shape_problem(meta)
    if bad:
        raise CheckpointFormatError(f"the DCP metadata is malformed: {bad}", path=path)
    return meta


def _ints(v, n: int | None = None) -> bool:
    return isinstance(v, tuple) and (n is None or len(v) == n) and all(type(x) is int and x >= 0 for x in v)


def _shape_problem(meta) -> str | None:
    """Every entry has the fields and types DCP's classes have (a pickle can build them without)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    for k, m in meta.state_dict_metadata.items():
        if not isinstance(k, str):
            return f"a key of type {type(k).__name__}"
        if isinstance(m, BytesStorageMetadata):
            continue
        if not isinstance(m, TensorStorageMetadata):
            return f"{k[:80]}: a {type(m).__name__}"
        size, props, chunks = (getattr(m, a, None) for a in ("size", "properties", "chunks"))
        if not _ints(size) or not isinstance(props, TensorProperties) or \
                not isinstance(getattr(props, "dtype", None), torch.dtype) or not isinstance(chunks, list):
            return f"{k[:80]}: size, properties or chunks missing or of the wrong type"
        for c in chunks:
            if not isinstance(c, ChunkStorageMetadata) or not _ints(getattr(c, "offsets", None), len(size)) or \
                    not _ints(getattr(c, "sizes", None), len(size)):
                return f"{k[:80]}: a chunk without offsets and sizes of rank {len(size)}"
    for i, info in meta.storage_data.items():
        if not isinstance(i, MetadataIndex) or not isinstance(getattr(i, "fqn", None), str) or \
                not (getattr(i, "offset", None) is None or _ints(i.offset)):
            return "a storage entry without a key and offsets"
        if not isinstance(info, _StorageInfo) or not all(hasattr(info, a) for a in ("relative_path", "offset",
                                                                                     "length")):
            return f"{i.fqn[:80]}: a storage entry without a file, offset and length"
    return None


class DistCheckpoint(CheckpointReader):
    format = "megatron"
    kind = "torch_dist"

    def __init__(self, root: Path, iter_dir: Path, *, layers=None, strict: bool = True):
        self.iter_dir = iter_dir
        for name in ("common.pt", ".metadata"):
            if not (iter_dir / name).is_file():
                raise MissingTensorError(f"a torch_dist checkpoint without {name}", path=iter_dir)
        head = load_rank_file(iter_dir / "common.pt")
        args = head.get("args")
        where = iter_dir / "common.pt"
        if not isinstance(args, argparse.Namespace):
            raise CheckpointFormatError("common.pt has no args Namespace", path=where)
        self.args, self._first = args, where
        self.par = parallel_from_args(args, where)
        cfg, self.config_source = resolve_config(root, args, where)
        pad = getattr(args, "grokconv_vocab_padding", "replicate")
        if pad not in ("replicate", "zero"):
            raise CheckpointFormatError(f"args grokconv_vocab_padding {str(pad)[:20]!r} is neither replicate nor "
                                        "zero", path=where)
        check_args(args, cfg, self.par, self.config_source, where)
        self.meta = load_dist_metadata(iter_dir / ".metadata")
        self.impl = transformer_impl([k.replace("decoder.layers.", "decoder.layers.0.")
                                      for k in self.meta.state_dict_metadata], args)
        self.layout = load_megatron_layout(pad, self.impl)
        self.plan = plan_dist(cfg, self.par, pad, self.impl)
        self._by_key = {t.key: t for t in self.plan.tensors}
        self._files: dict = {}
        self._lock = threading.Lock()
        self._index = None
        self._found = None
        super().__init__(root, cfg, list(range(cfg.num_layers)))
        if strict:
            self.require_layers(layers, root)
            for problem, where in self._problems():
                raise CheckpointFormatError(problem, path=where)
            self._found = []                 # every check passed: problems() need not run them again

    # -- metadata ------------------------------------------------------------------------------
    def _problems(self):
        """(problem, the file it is in): metadata against the plan, then every storage entry's file and
        byte range, then every chunk's zip structure (:mod:`.chunk_check`; payloads are not read)."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
        md, sd = self.meta.state_dict_metadata, self.meta.storage_data
        mdf = self.iter_dir / ".metadata"
        for t in self.plan.tensors:
            m = md.get(t.key)
            if m is None:
                yield f"no tensor {t.key} (config: {self.config_source})", mdf
            elif not isinstance(m, TensorStorageMetadata):
                yield f"{t.key} is stored as a {type(m).__name__}, not a tensor", mdf
            elif tuple(m.size) != tuple(t.shape):
                yield (f"{t.key} has global shape {tuple(m.size)}, expected {tuple(t.shape)} "
                       f"(config: {self.config_source})"), mdf
            elif not isinstance(m.properties.dtype, torch.dtype) or not m.properties.dtype.is_floating_point:
                yield f"{t.key} is {m.properties.dtype}, not a floating-point tensor", mdf
            else:
                try:
                    check_tiling(t.key, t.shape, [(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks])
                except Exception as e:
                    yield str(e), mdf
        for k in sorted(set(md) - set(self._by_key) - set(self.plan.objects))[:3]:
            if not isinstance(md[k], BytesStorageMetadata):
                yield f"unexpected tensor {k[:80]} (config: {self.config_source})", mdf
        chunks = {(k, tuple(c.offsets)): (tuple(c.sizes), md[k].properties.dtype) for k in self._by_key
                  if isinstance(md.get(k), TensorStorageMetadata) for c in md[k].chunks}
        stored = {(getattr(i, "fqn", None), tuple(i.offset) if getattr(i, "offset", None) is not None else None)
                  for i in sd}
        for k, offs in sorted(set(chunks) - stored)[:1]:
            yield f"{k}: the chunk at {offs} has no storage entry", mdf
        for idx, info in sd.items():
            fqn = getattr(idx, "fqn", None)
            rel = getattr(info, "relative_path", None)
            off, n = getattr(info, "offset", None), getattr(info, "length", None)
            if fqn not in md:
                yield f"storage entry for unknown key {str(fqn)[:80]}", mdf
                return
            if not isinstance(rel, str) or "/" in rel or "\\" in rel or rel.startswith(".") or \
                    not rel.endswith(".distcp"):
                yield f"{fqn}: data file name {str(rel)[:40]!r} is not a .distcp file in this directory", mdf
                return
            if type(off) is not int or type(n) is not int or off < 0 or n <= 0:
                yield f"{fqn}: byte range {off!r}+{n!r} is not a range", mdf
                return
            p = self.iter_dir / rel
            if not p.is_file():
                yield f"{fqn}: data file {rel} is missing", mdf
                return
            if off + n > p.stat().st_size:
                yield f"{fqn}: bytes {off}..{off + n} lie past the end of {rel} ({p.stat().st_size} bytes)", p
                return
            want = chunks.get((fqn, tuple(idx.offset))) if idx.offset is not None else None
            if want is not None:
                bad = chunk_problem(self._map(rel), off, n, *want)
                if bad:
                    yield f"{fqn}: the chunk at {tuple(idx.offset)} (bytes {off}..{off + n}): {bad}", p
                    return

    def _map(self, rel: str):
        with self._lock:
            mm = self._files.get(rel)
            if mm is None:
                with open(self.iter_dir / rel, "rb") as f:
                    mm = self._files[rel] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return mm

    def problems(self) -> list[str]:
        if self._found is None:
            self._found = [f"{where.name}: {p}" for _, (p, where) in zip(range(10), self._problems())]
        return self._found

    # -- chunks --------------------------------------------------------------------------------
    def _chunks_of(self, key: str, lead: tuple) -> list:
        """[(offsets, sizes, storage info)] of the chunks of ``key`` at layer/expert ``lead``."""
        if self._index is None:
            sizes = {(k, tuple(c.offsets)): tuple(c.sizes) for k in self._by_key
                     for c in getattr(self.meta.state_dict_metadata.get(k), "chunks", ())}
            idx: dict = {}
            for i, info in self.meta.storage_data.items():
                t = self._by_key.get(i.fqn)
                if t is None or i.offset is None:
                    continue
                offs = tuple(i.offset)
                nlead = int(t.mapping.per_layer) + int(t.mapping.experts)
                if (i.fqn, offs) in sizes:
                    idx.setdefault((i.fqn, offs[:nlead]), []).append((offs, sizes[(i.fqn, offs)], info))
            self._index = idx
        return self._index.get((key, lead), [])

    def _read_chunk(self, info) -> torch.Tensor:
        buf = io.BytesIO(self._map(info.relative_path)[info.offset: info.offset + info.length])
        try:
            t = torch.load(buf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointFormatError(f"cannot load a chunk at byte {info.offset} of {info.relative_path}: "
                                        f"{str(e).splitlines()[-1][:120] if str(e) else type(e).__name__}",
                                        path=self.iter_dir) from None
        if not isinstance(t, torch.Tensor):
            raise CheckpointFormatError(f"the chunk at byte {info.offset} of {info.relative_path} holds a "
                                        f"{type(t).__name__}, not a tensor", path=self.iter_dir)
        return t

    def _global_part(self, mapping, layer: int | None, expert: int | None) -> torch.Tensor:
        """The TP 1 tensor of one layer (and expert), from the chunks that hold it."""
        from .dist_plan import dist_key
        key = dist_key(mapping.target)
        t = self._by_key[key]
        lead = tuple(x for x, on in ((layer, mapping.per_layer), (expert, mapping.experts)) if on)
        shape = t.shape[len(lead):]
        out = torch.empty(shape, dtype=t.dtype)
        covered = 0
        for offs, sizes, info in self._chunks_of(key, lead):
            c = self._read_chunk(info)
            if tuple(c.shape) != sizes or not c.is_floating_point():
                raise ShapeMismatchError(f"{key}: the chunk at {offs} holds {c.dtype} {tuple(c.shape)}, the metadata "
                                         f"says {sizes}", path=self.iter_dir, expected=sizes, got=tuple(c.shape))
            c = c.reshape(sizes[len(lead):])
            region = out
            for d, (o, n) in enumerate(zip(offs[len(lead):], c.shape)):
                region = region.narrow(d, o, n)
            region.copy_(c)
            covered += c.numel()
        if covered != math.prod(shape):
            raise MissingTensorError(f"{key}{list(lead)}: the chunks hold {covered} of {math.prod(shape)} values",
                                     path=self.iter_dir / ".metadata")
        return out

    # -- canonical -----------------------------------------------------------------------------
    def load(self, name: str, index: int | None = None):
        spec = self.spec(name)
        mapping, part, layer = self.layout.find(name)
        par1 = Parallel(1, 1, 1, None, self.par.untie, self.par.make_vocab_size_divisible_by)
        if mapping.experts:
            if index is None:
                return np.stack([self.load(name, e) for e in range(spec.shape[0])])
            if not 0 <= index < spec.shape[0]:
                raise MissingTensorError(f"{name}: expert {index} out of range 0..{spec.shape[0] - 1}")
            value = mapping.merge([self._global_part(mapping, layer, index)], self.config, par1, part)
        else:
            value = mapping.merge([self._global_part(mapping, layer, None)], self.config, par1, part)
            if index is not None:
                value = value[index]
        return from_torch(value.contiguous())

    def stored(self) -> list[StoredTensor]:
        out = []
        for k, m in self.meta.state_dict_metadata.items():
            size = getattr(m, "size", None)
            if size is None:
                continue
            dt = m.properties.dtype
            n = math.prod(size) * torch.empty((), dtype=dt).element_size()
            out.append(StoredTensor(k, tuple(size), str(dt).replace("torch.", ""), n, str(self.iter_dir)))
        return out

    def close(self) -> None:
        with self._lock:
            for mm in self._files.values():
                mm.close()
            self._files.clear()
