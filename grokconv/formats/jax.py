"""The original Grok-1 release: ``ckpt-0/tensorNNNNN_000`` pickles, named by position.

Reading walks each file's opcodes (``pickle_walk``) and maps payloads read-only; nothing is
unpickled and nothing is copied. Writing emits the release's exact bytes (``pickle_write``).
"""
from __future__ import annotations

import mmap
import re
import threading
from pathlib import Path

import numpy as np

from ..config import GrokConfig, find_config, find_config_path
from ..errors import CheckpointFormatError, MissingTensorError, ShapeMismatchError
from ..schema import ParamSpec, file_name, param_specs
from ..tensor import BF16, QInt8
from .atomic import atomic_write
from .base import CheckpointReader, StoredTensor, register_format
from .pickle_walk import ArrayRef, QuantRef, walk_file
from .pickle_write import layout_array, layout_quantized
from .safetensors_io import madvise_dontneed, madvise_willneed

__all__ = ["JaxCheckpoint", "write_param_file", "ckpt_dir", "CKPT_DIR"]

CKPT_DIR = "ckpt-0"
_FILE_RE = re.compile(r"^tensor(\d{5})_(\d{3})$")


def ckpt_dir(path: Path) -> Path:
    """``DIR`` or ``DIR/ckpt-0`` -> the folder that holds the tensor files."""
    path = Path(path)
    return path / CKPT_DIR if (path / CKPT_DIR).is_dir() else path


def _detect(path: Path) -> bool:
    d = ckpt_dir(path)
    return d.is_dir() and (d / file_name(0)).exists() or (d.is_dir() and any(
        _FILE_RE.match(p.name) for p in d.iterdir()))


class JaxCheckpoint(CheckpointReader):
    format = "jax"

    def __init__(self, path, *, config: GrokConfig | None = None, layers=None, strict: bool = True):
        root = Path(path)
        self.dir = ckpt_dir(root)
        cfg_path = None if config is not None else find_config_path(self.dir)
        self.config_source = ("the config given" if config is not None else str(cfg_path) if cfg_path
                              else "the grok-1 preset (no grokconv-config.json)")
        config = config or find_config(self.dir)
        present = {m.group(0) for p in self.dir.iterdir() if (m := _FILE_RE.match(p.name))}
        specs = param_specs(config)
        expected = {s.file for s in specs}
        self._problems: list[str] = []
        extra = sorted(present - expected)
        if extra:
            msg = (f"{len(extra)} file(s) the config does not have, first {extra[0]} "
                   f"(config: {config.num_layers} layers, {len(specs)} files)")
            if strict:
                raise MissingTensorError(msg, path=self.dir)
            self._problems.append(msg)
        need = set(range(config.num_layers)) if layers is None else set(layers)
        have_layers = []
        for layer in range(config.num_layers):
            files = [s.file for s in specs if s.layer == layer]
            missing = [f for f in files if f not in present]
            if not missing:
                have_layers.append(layer)
            elif layer in need:
                msg = f"missing {self.dir / missing[0]} (layer {layer}, {len(missing)} of its 12 files absent)"
                if strict:
                    raise MissingTensorError(msg)
                self._problems.append(msg)
        for s in specs:
            if s.layer is None and s.file not in present:
                msg = f"missing {self.dir / s.file} ({s.name})"
                if strict:
                    raise MissingTensorError(msg)
                self._problems.append(msg)
        super().__init__(root, config, have_layers)
        self._refs: dict[str, ArrayRef | QuantRef] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._map_lock = threading.Lock()
        self.bytes_read = 0  # header bytes read by the opcode walker (payloads are never read)
        self.strict = strict
        if strict:
            # every header the work needs, checked now (a few hundred bytes a file): a damaged file
            # is refused before a conversion writes anything
            for spec in self.specs():
                if spec.layer is None or spec.layer in need:
                    self.ref(spec)

    # -- headers -------------------------------------------------------------------------------
    def ref(self, spec: ParamSpec):
        if spec.name not in self._refs:
            stats: dict = {}
            ref = walk_file(self.dir / spec.file, stats=stats)
            self.bytes_read += stats["bytes_read"]
            self._check(spec, ref)
            self._refs[spec.name] = ref
        return self._refs[spec.name]

    def _check(self, spec: ParamSpec, ref) -> None:
        path = self.dir / spec.file
        if spec.kind == "qw8":
            if not isinstance(ref, QuantRef):
                raise ShapeMismatchError(f"expected QuantizedWeight8bit for {spec.name}, found a plain array",
                                         path=path)
            pairs = ((ref.weight, spec.shape, np.int8), (ref.scales, spec.scale_shape, BF16))
        else:
            if not isinstance(ref, ArrayRef):
                raise ShapeMismatchError(f"expected a float32 array for {spec.name}, found QuantizedWeight8bit",
                                         path=path)
            pairs = ((ref, spec.shape, np.float32),)
        for a, shape, dtype in pairs:
            if tuple(a.shape) != tuple(shape) or a.dtype != dtype:
                raise ShapeMismatchError(
                    f"{spec.name}: found {a.dtype}{list(a.shape)}, the config expects {np.dtype(dtype)}{list(shape)} "
                    f"(config: {self.config_source})",
                    path=path, expected=(str(np.dtype(dtype)), tuple(shape)), got=(str(a.dtype), tuple(a.shape)))

    def _view(self, a: ArrayRef) -> np.ndarray:
        mm = self._maps.get(a.path)
        if mm is None:
            with self._map_lock:             # workers and the prefetch thread share one map per file
                mm = self._maps.get(a.path)
                if mm is None:
                    with open(a.path, "rb") as f:
                        mm = self._maps[a.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mm, dtype=a.dtype, count=int(np.prod(a.shape)), offset=a.offset).reshape(a.shape)

    # -- reader interface ----------------------------------------------------------------------
    def load(self, name: str, index: int | None = None):
        spec = self.spec(name)
        ref = self.ref(spec)
        if isinstance(ref, QuantRef):
            value = QInt8(self._view(ref.weight), self._view(ref.scales))
        else:
            value = self._view(ref)
        return value if index is None else value[index]

    def _span(self, name: str, index: int | None, rows: tuple[int, int] | None):
        """``(mmap, start, length)`` of a parameter's weight bytes (one expert, some of its rows), or None."""
        spec = self.spec(name)
        ref = self._refs.get(name)
        mm = self._maps.get(str(self.dir / spec.file))
        if ref is None or mm is None:
            return None
        a = ref.weight if isinstance(ref, QuantRef) else ref
        start, length = a.offset, a.nbytes
        if index is not None and spec.lead > 1:
            length //= spec.lead
            start += index * length
        if rows is not None:
            row_bytes = length // (a.shape[-2] if len(a.shape) > 1 else a.shape[0])
            start, length = start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        return mm, start, length

    def release(self, name: str, index: int | None = None, rows: tuple[int, int] | None = None) -> None:
        """Drop the mapped pages of a parameter (one expert, or some of its rows) from this process.

        File-backed pages of an mmap count in RSS; a streaming conversion releases what it has used,
        so resident memory stays at one slice whatever the model size. The page cache keeps the data.
        """
        span = self._span(name, index, rows)
        if span is not None:
            madvise_dontneed(*span)

    def prefetch(self, name: str, index: int | None = None) -> None:
        """Have the kernel read a parameter's pages (one expert) into the page cache in the background, in
        large requests, before the conversion touches them (they are not mapped in: RSS does not grow)."""
        self.load(name, index)                   # maps the file (headers are already read)
        span = self._span(name, index, None)
        if span is not None:
            madvise_willneed(*span)

    def stored(self) -> list[StoredTensor]:
        """Every readable file's tensor; with ``strict=False`` a damaged one is left to ``problems()``."""
        out = []
        for spec in self.specs():
            try:
                ref = self.ref(spec)
            except CheckpointFormatError:
                if self.strict:
                    raise
                continue
            f = str(self.dir / spec.file)
            if isinstance(ref, QuantRef):
                out.append(StoredTensor(spec.name, ref.weight.shape, "int8", ref.weight.nbytes + ref.scales.nbytes,
                                        f, {"scheme": "int8 (original)", "scale_shape": list(ref.scales.shape),
                                            "scale_dtype": "bfloat16", "blocks": ref.scales.shape[-2]}))
            else:
                out.append(StoredTensor(spec.name, ref.shape, "float32", ref.nbytes, f))
        return out

    def problems(self) -> list[str]:
        probs = list(self._problems)
        for spec in self.specs():
            try:
                self.ref(spec)
            except CheckpointFormatError as e:
                probs.append(str(e))
        return probs

    def close(self) -> None:
        self._maps.clear()  # mmaps close when the last array view on them is gone


def write_param_file(path: Path, spec: ParamSpec, value, durable=None) -> int:
    """Write one parameter in the release's exact byte format; returns bytes written. ``durable``: see
    :func:`~grokconv.formats.atomic.atomic_write`.

    ``value``: float32 array for f32 params; :class:`QInt8` (or a pair of chunk iterables) for qw8.
    Chunks of the int8 weight may be given as an iterable of C-ordered arrays along the first axis, and
    the scales as a callable evaluated after the weight is written (so they can be computed meanwhile).
    """
    if spec.kind == "qw8":
        weight, scales = (value.weight, value.scales) if isinstance(value, QInt8) else value
        layout = layout_quantized(spec.shape, spec.scale_shape)
        payloads = [(weight, np.int8), (scales, BF16)]
    else:
        layout = layout_array(np.float32, spec.shape)
        payloads = [(value, np.float32)]
    with atomic_write(path, durable=durable) as f:
        for seg in layout.segments:
            if not isinstance(seg, int):
                f.write(seg)
                continue
            data, dtype = payloads[seg]
            data = data() if callable(data) else data   # filled while earlier payloads streamed
            chunks = [data] if isinstance(data, np.ndarray) else data
            n = 0
            for c in chunks:
                c = np.ascontiguousarray(c)
                if c.dtype != dtype:
                    raise CheckpointFormatError(f"{spec.name}: payload dtype {c.dtype}, format needs {np.dtype(dtype)}",
                                                path=path)
                f.write(c.reshape(-1).view(np.uint8).data)
                n += c.nbytes
            if n != layout.lengths[seg]:
                raise CheckpointFormatError(f"{spec.name}: wrote {n} payload bytes, layout needs {layout.lengths[seg]}",
                                            path=path)
    return layout.size


register_format("jax", _detect, lambda p, layers=None, strict=True: JaxCheckpoint(p, layers=layers, strict=strict))
