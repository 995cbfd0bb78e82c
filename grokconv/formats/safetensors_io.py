"""safetensors files: a validating header reader with mmap views, and a streaming writer.

The safetensors library has no streaming write (its maintainers: "we cannot do partial/streamed
saves"), and its numpy reader cannot return F8 tensors. Both are small given the format's rules:
8-byte little-endian header length N, N bytes of JSON padded with spaces, then the data buffer,
whose tensors tile it exactly with no holes and no trailing bytes.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import CheckpointFormatError, TruncatedFileError

__all__ = ["DTYPES", "TensorInfo", "read_header", "SafetensorsFile", "ShardPlan", "build_header", "madvise_dontneed"]

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    begin: int      # within the data buffer
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse and validate a header: (tensors, __metadata__, data start). One error per broken rule."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TruncatedFileError("shorter than the 8-byte header length", path=path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise TruncatedFileError(f"header length {n} does not fit the file ({size} bytes)", path=path)
        raw = f.read(n)
        if len(raw) != n:
            raise TruncatedFileError(f"short read of the {n}-byte header", path=path)
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError; absurd nesting
        msg = str(e).splitlines()[0] if isinstance(e, ValueError) else "nested too deeply"
        raise CheckpointFormatError(f"header is not valid JSON: {msg}", path=path) from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError("header is not a JSON object", path=path)
    meta = obj.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointFormatError("__metadata__ must map strings to strings", path=path)
    tensors = {}
    for name, t in obj.items():
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointFormatError(f"tensor {_clip(name)}: a header entry needs exactly dtype, shape and "
                                        "data_offsets", path=path)
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointFormatError(f"tensor {_clip(name)}: unsupported dtype {str(dtype)[:20]!r}", path=path)
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointFormatError(f"tensor {_clip(name)}: shape {str(shape)[:40]} is not a list of sizes", path=path)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointFormatError(f"tensor {_clip(name)}: data_offsets {str(offsets)[:40]} are not [begin, end]",
                                        path=path)
        shape, (b, e) = tuple(shape), offsets
        if e - b != math.prod(shape) * DTYPES[dtype].itemsize:
            raise CheckpointFormatError(f"tensor {_clip(name)}: {e - b} bytes for shape {list(shape)} of {dtype}", path=path)
        tensors[name] = TensorInfo(name, dtype, shape, b, e)
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            raise CheckpointFormatError(f"tensor {_clip(t.name)}: data starts at {t.begin}, expected {pos} "
                                        "(holes or overlaps)", path=path)
        pos = t.end
    if 8 + n + pos != size:
        cls = TruncatedFileError if 8 + n + pos > size else CheckpointFormatError
        raise cls(f"data buffer should end at byte {8 + n + pos}, file has {size} bytes", path=path)
    return tensors, meta, 8 + n


def _clip(name: str) -> str:
    """A tensor name from a file, quoted and cut short for a message."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


_WILLNEED_STEP = 4 << 20   # the kernel reads at most its readahead window (read_ahead_kb) per WILLNEED call


def madvise_willneed(mm, start: int, length: int) -> None:
    """Start reading ``[start, start+length)`` of a mapped file into the page cache (asynchronous readahead).

    One call per few MiB: Linux trims a WILLNEED request to the device's readahead window, so a single
    call over a 200 MB expert reads its first 8 MB only."""
    page = mmap.PAGESIZE
    lo, hi = start // page * page, start + length
    if hi <= lo or not isinstance(mm, mmap.mmap):
        return
    hi = min(hi, len(mm))
    for a in range(lo, hi, _WILLNEED_STEP):
        mm.madvise(mmap.MADV_WILLNEED, a, min(_WILLNEED_STEP, hi - a))


def madvise_dontneed(mm, start: int, length: int) -> None:
    """Drop whole pages of ``[start, start+length)`` from this process's resident set (page cache keeps them)."""
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + length) // page * page
    if hi > lo and isinstance(mm, mmap.mmap):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class SafetensorsFile:
    """Read-only zero-copy views of a safetensors file's tensors (F8 and BF16 included)."""

    def __init__(self, path):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = read_header(self.path)
        self._mm = None

    def array(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(self.path) else b""
        dt = DTYPES[t.dtype]
        return np.frombuffer(self._mm, dtype=dt, count=math.prod(t.shape),
                             offset=self.data_start + t.begin).reshape(t.shape)


    def release(self, name: str) -> None:
        if self._mm is not None:
            t = self.tensors[name]
            madvise_dontneed(self._mm, self.data_start + t.begin, t.nbytes)


def _align(dtype: str) -> int:
    return DTYPES[dtype].itemsize


@dataclass
class ShardPlan:
    """One output file: its tensors in data order, header bytes, and each tensor's absolute offset."""
    filename: str
    tensors: list          # [(name, dtype, shape)]
    metadata: dict

    def __post_init__(self):
        self.header, self.offsets = build_header(self.tensors, self.metadata)

    @property
    def size(self) -> int:
        return len(self.header) + sum(math.prod(s) * DTYPES[d].itemsize for _, d, s in self.tensors)

    @property
    def data_bytes(self) -> int:
        return self.size - len(self.header)


def build_header(tensors, metadata) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included) and absolute file offsets.

    Tensors are ordered by descending alignment, then by their given order, so every tensor starts
    aligned to its dtype; the JSON is padded with spaces to a multiple of 8, as the library does.
    """
    order = sorted(range(len(tensors)), key=lambda i: (-_align(tensors[i][1]), i))
    entries, pos, rel = {}, 0, {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for i in order:
        name, dtype, shape = tensors[i]
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        rel[name] = pos
        pos += nbytes
    js = json.dumps(entries, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    header = struct.pack("<Q", len(js)) + js
    return header, {k: len(header) + v for k, v in rel.items()}
