"""Byte-exact writer of the original Grok-1 file format.

CPython's pickler (protocol 4) under numpy 1.x and ml_dtypes wrote the release. We emit the same
opcode stream ourselves: the module path ``numpy.core.multiarray`` whatever numpy is installed,
the same memo and the same framing (a payload of 64 KiB or more is written outside any frame).
``layout_*`` returns the bytes around the payloads and the payload offsets without touching any
data, so sizes and offsets of real 1.6 GB files are checked in microseconds.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PickleLayout", "layout_array", "layout_quantized", "BF16_FLAGS"]

FRAME_SIZE_TARGET = 64 * 1024
FRAME_SIZE_MIN = 4
# dtype-state flags byte of ml_dtypes.bfloat16: 80 with ml_dtypes <= 0.4 (the release's era), 64 after.
BF16_FLAGS = 80


@dataclass
class PickleLayout:
    """Segments of a file: ``bytes`` or an ``int`` (index of a payload, of ``lengths[i]`` bytes)."""
    segments: list = field(default_factory=list)
    lengths: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(s) if isinstance(s, (bytes, bytearray)) else self.lengths[s] for s in self.segments)

    @property
    def offsets(self) -> list[int]:
        pos, out = 0, [0] * len(self.lengths)
        for s in self.segments:
            if isinstance(s, int):
                out[s] = pos
                pos += self.lengths[s]
            else:
                pos += len(s)
        return out


class _Encoder:
    def __init__(self):
        self.layout = PickleLayout()
        self.frame: list | None = None
        self.frame_len = 0
        self.memo: dict = {}
        self.layout.segments.append(b"\x80\x04")  # PROTO 4, outside any frame

    # -- framing -------------------------------------------------------------------------------
    def write(self, b: bytes):
        if self.frame is None:
            self.frame, self.frame_len = [], 0
        self.frame.append(b)
        self.frame_len += len(b)

    def commit(self):
        if self.frame is None:
            return
        body = self.frame
        if self.frame_len >= FRAME_SIZE_MIN:
            body = [b"\x95" + struct.pack("<Q", self.frame_len)] + body
        for s in body:  # merge adjacent bytes for a compact segment list
            if isinstance(s, int) or not self.layout.segments or isinstance(self.layout.segments[-1], int):
                self.layout.segments.append(s if isinstance(s, int) else bytes(s))
            else:
                self.layout.segments[-1] = self.layout.segments[-1] + s
        self.frame, self.frame_len = None, 0

    def boundary(self):  # CPython commits a frame at the start of a save() once it has grown past target
        if self.frame is not None and self.frame_len >= FRAME_SIZE_TARGET:
            self.commit()

    # -- memo ----------------------------------------------------------------------------------
    def memoize(self, key):
        if key is not None:
            self.memo[key] = len(self.memo)
        else:  # an object never seen again still takes a memo slot
            self.memo[object()] = len(self.memo)
        self.write(b"\x94")

    def get(self, key) -> bool:
        if key in self.memo:
            idx = self.memo[key]
            self.write(b"h" + bytes([idx]) if idx < 256 else b"j" + struct.pack("<I", idx))
            return True
        return False

    # -- values --------------------------------------------------------------------------------
    def str(self, s: str):
        self.boundary()
        if self.get(("str", s)):
            return
        b = s.encode()
        self.write(b"\x8c" + bytes([len(b)]) + b)
        self.memoize(("str", s))

    def int(self, v: int):
        self.boundary()
        if 0 <= v < 256:
            self.write(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.write(b"M" + struct.pack("<H", v))
        elif -(2 ** 31) <= v < 2 ** 31:
            self.write(b"J" + struct.pack("<i", v))
        else:
            n = (v.bit_length() + 8) // 8
            self.write(b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True))

    def const(self, op: bytes):
        self.boundary()
        self.write(op)

    def global_(self, module: str, name: str):
        self.boundary()
        if self.get(("global", module, name)):
            return
        self.str(module)
        self.str(name)
        self.write(b"\x93")
        self.memoize(("global", module, name))

    def small_bytes(self, b: bytes):
        self.boundary()
        if self.get(("bytes", b)):
            return
        self.write(b"C" + bytes([len(b)]) + b)
        self.memoize(("bytes", b))

    def payload(self, length: int):
        """A bytes object whose content is written later; returns its payload index."""
        self.boundary()
        idx = len(self.layout.lengths)
        self.layout.lengths.append(length)
        if length < 256:
            header = b"C" + bytes([length])
        elif length <= 0xFFFFFFFF:
            header = b"B" + struct.pack("<I", length)
        else:
            header = b"\x8e" + struct.pack("<Q", length)
        if length >= FRAME_SIZE_TARGET:  # large payloads bypass the frame
            self.commit()
            self.layout.segments.append(header)
            self.layout.segments.append(idx)
        else:
            self.write(header)
            self.frame.append(idx)
            self.frame_len += length
        self.memoize(None)
        return idx

    def tuple_of(self, items):
        """Save a fresh tuple; ``items`` are callables that save one element each."""
        self.boundary()
        n = len(items)
        if n == 0:
            self.write(b")")
            return
        if n > 3:
            self.write(b"(")
        for item in items:
            item()
        self.write({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(n, b"t"))
        self.memoize(None)

    # -- numpy ---------------------------------------------------------------------------------
    def dtype(self, dtype: np.dtype):
        self.boundary()
        self.global_("numpy", "dtype")
        if dtype == np.float32:
            descr, order, tail = (lambda: self.str("f4")), "<", (-1, -1, 0)
        elif dtype == np.int8:
            descr, order, tail = (lambda: self.str("i1")), "|", (-1, -1, 0)
        elif dtype.name == "bfloat16":
            descr, order, tail = (lambda: self.global_("ml_dtypes", "bfloat16")), "<", (2, 2, BF16_FLAGS)
        else:
            raise ValueError(f"dtype {dtype} is not part of the Grok-1 format")
        self.tuple_of([descr, lambda: self.const(b"\x89"), lambda: self.const(b"\x88")])
        self.write(b"R")
        self.memoize(None)
        state = [lambda: self.int(3), lambda: self.str(order), lambda: self.const(b"N"),
                 lambda: self.const(b"N"), lambda: self.const(b"N")] + [
                     (lambda v=v: self.int(v)) for v in tail]
        self.tuple_of(state)
        self.write(b"b")

    def ndarray(self, dtype: np.dtype, shape: tuple) -> int:
        self.boundary()
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.tuple_of([lambda: self.global_("numpy", "ndarray"),
                       lambda: self.tuple_of([lambda: self.int(0)]),
                       lambda: self.small_bytes(b"b")])
        self.write(b"R")
        self.memoize(None)
        idx = []
        self.tuple_of([lambda: self.int(1),
                       lambda: self.tuple_of([(lambda d=d: self.int(d)) for d in shape]),
                       lambda: self.dtype(np.dtype(dtype)),
                       lambda: self.const(b"\x89"),
                       lambda: idx.append(self.payload(math.prod(shape) * np.dtype(dtype).itemsize))])
        self.write(b"b")
        return idx[0]

    def finish(self) -> PickleLayout:
        self.write(b".")
        self.commit()
        return self.layout


def layout_array(dtype, shape) -> PickleLayout:
    """Layout of a file holding one plain ndarray (embeddings, norms, router: float32)."""
    enc = _Encoder()
    enc.ndarray(np.dtype(dtype), tuple(shape))
    return enc.finish()


def layout_quantized(weight_shape, scales_shape) -> PickleLayout:
    """Layout of ``__main__.QuantizedWeight8bit(weight=int8, scales=bfloat16)``; payload 0 weight, 1 scales."""
    import ml_dtypes

    enc = _Encoder()
    enc.global_("__main__", "QuantizedWeight8bit")
    enc.write(b")")            # EMPTY_TUPLE (args of NEWOBJ)
    enc.write(b"\x81")         # NEWOBJ
    enc.memoize(None)
    enc.boundary()
    enc.write(b"}")            # the instance __dict__
    enc.memoize(None)
    enc.write(b"(")
    enc.str("weight")
    enc.ndarray(np.dtype(np.int8), tuple(weight_shape))
    enc.str("scales")
    enc.ndarray(np.dtype(ml_dtypes.bfloat16), tuple(scales_shape))
    enc.write(b"u")            # SETITEMS
    enc.write(b"b")            # BUILD
    return enc.finish()
