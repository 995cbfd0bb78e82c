"""A pickle opcode walker that executes nothing.

It reads the opcode stream of one file with exact positioned reads, checks every opcode and every
global against allow-lists, and returns *where* the array payloads are, never their bytes. Arrays
are then mapped read-only from the file (zero copy). Anything outside the shapes the Grok-1 release
uses -- another global, another opcode, a second pickle, trailing bytes, a length that disagrees
with the shape -- raises an error naming the file.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..errors import CheckpointFormatError, TruncatedFileError, UnsafePickleError

__all__ = ["ArrayRef", "QuantRef", "walk_file", "ALLOWED_GLOBALS"]

# The five globals the real files use (grok1-checkpoint.md section 1.4). numpy 2 spells the first
# one numpy._core.multiarray; we accept that spelling too, it names the same function.
ALLOWED_GLOBALS = frozenset({
    ("__main__", "QuantizedWeight8bit"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("ml_dtypes", "bfloat16"),
})
_DTYPES = {"f4": np.dtype(np.float32), "i1": np.dtype(np.int8), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
MAX_STRING = 256
MAX_FRAME = 1 << 24
MAX_OPS = 4096


@dataclass(frozen=True)
class ArrayRef:
    """A C-ordered array inside a file: where its payload is, what it holds."""
    path: str
    dtype: np.dtype
    shape: tuple
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class QuantRef:
    """``__main__.QuantizedWeight8bit(weight=int8, scales=bfloat16)``."""
    weight: ArrayRef
    scales: ArrayRef


class _Global:
    __slots__ = ("module", "name")

    def __init__(self, module, name):
        self.module, self.name = module, name


class _Payload:
    __slots__ = ("offset", "length")

    def __init__(self, offset, length):
        self.offset, self.length = offset, length


class _Obj:
    """A placeholder for what REDUCE / NEWOBJ would have built: kind + collected pieces."""
    __slots__ = ("kind", "args", "state")

    def __init__(self, kind, args):
        self.kind, self.args, self.state = kind, args, None


_MARK = object()


class _Reader:
    def __init__(self, fd, size, path):
        self.fd, self.size, self.path, self.pos, self.bytes_read = fd, size, path, 0, 0

    def read(self, n):
        if self.pos + n > self.size:
            raise TruncatedFileError(f"pickle stream ends at byte {self.size}, needs {self.pos + n}",
                                     path=self.path)
        data = os.pread(self.fd, n, self.pos)
        if len(data) != n:
            raise TruncatedFileError("short read", path=self.path)
        self.pos += n
        self.bytes_read += n
        return data

    def skip(self, n):
        if self.pos + n > self.size:
            raise TruncatedFileError(
                f"payload of {n} bytes at offset {self.pos} runs past the end of the file ({self.size} bytes)",
                path=self.path)
        self.pos += n


def walk_file(path, *, stats: dict | None = None):
    """Return an ``ArrayRef`` or ``QuantRef`` for one checkpoint file, reading no payload byte."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        r = _Reader(fd, size, path)
        result = _walk(r)
        if r.pos != size:
            raise CheckpointFormatError(f"{size - r.pos} trailing bytes after the pickle's STOP "
                                        "(a second pickle or garbage)", path=path)
        if stats is not None:
            stats["bytes_read"] = stats.get("bytes_read", 0) + r.bytes_read
        return result
    finally:
        os.close(fd)


def _bad(r, msg):
    return CheckpointFormatError(msg, path=r.path)


def _walk(r: _Reader):  # noqa: C901 - one flat dispatch loop reads best here
    stack: list = []
    memo: dict[int, object] = {}
    if r.read(2) != b"\x80\x04":
        raise _bad(r, "not a protocol-4 pickle (expected bytes 80 04 at the start)")
    for _ in range(MAX_OPS):
        op = r.read(1)
        if op == b"\x95":                      # FRAME
            (n,) = struct.unpack("<Q", r.read(8))
            if n > MAX_FRAME:
                raise _bad(r, f"frame of {n} bytes exceeds the cap")
        elif op == b"\x8c":                    # SHORT_BINUNICODE
            n = r.read(1)[0]
            stack.append(r.read(n).decode("utf-8"))
        elif op == b"X":                       # BINUNICODE
            (n,) = struct.unpack("<I", r.read(4))
            if n > MAX_STRING:
                raise _bad(r, f"string of {n} bytes exceeds the cap")
            stack.append(r.read(n).decode("utf-8"))
        elif op == b"\x94":                    # MEMOIZE
            if not stack:
                raise _bad(r, "MEMOIZE on an empty stack")
            memo[len(memo)] = stack[-1]
        elif op in (b"h", b"j"):               # BINGET, LONG_BINGET
            idx = r.read(1)[0] if op == b"h" else struct.unpack("<I", r.read(4))[0]
            if idx not in memo:
                raise _bad(r, f"memo index {idx} used before it was set")
            stack.append(memo[idx])
        elif op == b"\x93":                    # STACK_GLOBAL
            name, module = stack.pop(), stack.pop()
            if not (isinstance(module, str) and isinstance(name, str)):
                raise _bad(r, "STACK_GLOBAL operands are not strings")
            if (module, name) not in ALLOWED_GLOBALS:
                raise UnsafePickleError(
                    f"refused global {module}.{name}: only the globals of the Grok-1 release are allowed "
                    "(nothing in the file was run)", path=r.path, global_name=f"{module}.{name}")
            stack.append(_Global(module, name))
        elif op == b"K":
            stack.append(r.read(1)[0])
        elif op == b"M":
            stack.append(struct.unpack("<H", r.read(2))[0])
        elif op == b"J":
            stack.append(struct.unpack("<i", r.read(4))[0])
        elif op == b"\x8a":                    # LONG1
            n = r.read(1)[0]
            if n > 8:
                raise _bad(r, "integer too long")
            stack.append(int.from_bytes(r.read(n), "little", signed=True))
        elif op == b"N":
            stack.append(None)
        elif op == b"\x88":
            stack.append(True)
        elif op == b"\x89":
            stack.append(False)
        elif op == b")":
            stack.append(())
        elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
            n = op[0] - 0x84
            if len(stack) < n:
                raise _bad(r, "tuple opcode on a short stack")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif op == b"(":
            stack.append(_MARK)
        elif op == b"t":                       # TUPLE (to mark)
            items = _pop_mark(r, stack)
            stack.append(tuple(items))
        elif op == b"}":
            stack.append({})
        elif op == b"u":                       # SETITEMS
            items = _pop_mark(r, stack)
            d = stack[-1] if stack else None
            if not isinstance(d, dict) or len(items) % 2:
                raise _bad(r, "SETITEMS without a dict")
            for k, v in zip(items[::2], items[1::2]):
                if not isinstance(k, str):
                    raise _bad(r, "dict key is not a string")
                d[k] = v
        elif op == b"s":                       # SETITEM
            v, k = stack.pop(), stack.pop()
            if not isinstance(stack[-1], dict) or not isinstance(k, str):
                raise _bad(r, "SETITEM without a dict")
            stack[-1][k] = v
        elif op in (b"C", b"B", b"\x8e"):      # SHORT_BINBYTES, BINBYTES, BINBYTES8
            fmt = {b"C": "<B", b"B": "<I", b"\x8e": "<Q"}[op]
            (n,) = struct.unpack(fmt, r.read(struct.calcsize(fmt)))
            stack.append(_Payload(r.pos, n))
            r.skip(n)                          # never read: its offset is all we keep
        elif op == b"R":                       # REDUCE
            args, fn = stack.pop(), stack.pop()
            if not isinstance(fn, _Global) or not isinstance(args, tuple):
                raise _bad(r, "REDUCE of something that is not an allowed global")
            if fn.name == "_reconstruct":
                stack.append(_Obj("ndarray", args))
            elif (fn.module, fn.name) == ("numpy", "dtype"):
                stack.append(_Obj("dtype", args))
            else:
                raise UnsafePickleError(f"refused call of {fn.module}.{fn.name}", path=r.path,
                                        global_name=f"{fn.module}.{fn.name}")
        elif op == b"\x81":                    # NEWOBJ
            args, cls = stack.pop(), stack.pop()
            if not (isinstance(cls, _Global) and cls.name == "QuantizedWeight8bit" and args == ()):
                raise UnsafePickleError("refused NEWOBJ of anything but QuantizedWeight8bit()", path=r.path)
            stack.append(_Obj("qw8", ()))
        elif op == b"b":                       # BUILD
            state, obj = stack.pop(), stack[-1] if stack else None
            if not isinstance(obj, _Obj) or obj.state is not None:
                raise _bad(r, "BUILD on something that is not a fresh array, dtype or QuantizedWeight8bit")
            obj.state = state
        elif op == b".":                       # STOP
            if len(stack) != 1:
                raise _bad(r, "STOP with a malformed stack")
            return _interpret(r, stack[0])
        else:
            raise UnsafePickleError(f"refused opcode {op!r} at byte {r.pos - 1}: outside the allow-list",
                                    path=r.path)
    raise _bad(r, f"more than {MAX_OPS} opcodes")


def _pop_mark(r, stack):
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise _bad(r, "no MARK on the stack")


def _dtype(r, obj) -> np.dtype:
    if not (isinstance(obj, _Obj) and obj.kind == "dtype" and isinstance(obj.state, tuple)):
        raise _bad(r, "array dtype is malformed")
    spec = obj.args[0] if obj.args else None
    key = spec.name if isinstance(spec, _Global) else spec
    if key not in _DTYPES:
        raise _bad(r, f"dtype {key!r} is not one of float32, int8, bfloat16")
    order = obj.state[1] if len(obj.state) > 1 else None
    if order not in ("<", "|", "="):
        raise _bad(r, f"byte order {order!r} is not little-endian")
    return _DTYPES[key]


def _array(r, obj) -> ArrayRef:
    if not (isinstance(obj, _Obj) and obj.kind == "ndarray" and isinstance(obj.state, tuple)
            and len(obj.state) == 5):
        raise _bad(r, "expected a numpy array")
    _version, shape, dtobj, fortran, payload = obj.state
    if fortran is not False:
        raise _bad(r, "Fortran-ordered arrays are not part of the format")
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _bad(r, "array shape is malformed")
    dtype = _dtype(r, dtobj)
    if not isinstance(payload, _Payload):
        raise _bad(r, "array data is not a bytes payload")
    ref = ArrayRef(r.path, dtype, shape, payload.offset)
    if payload.length != ref.nbytes:
        raise _bad(r, f"payload holds {payload.length} bytes but shape {shape} of {dtype} needs {ref.nbytes}")
    return ref


def _interpret(r, obj):
    if isinstance(obj, _Obj) and obj.kind == "qw8":
        state = obj.state
        if not (isinstance(state, dict) and list(state) == ["weight", "scales"]):
            raise _bad(r, "QuantizedWeight8bit state must be {'weight', 'scales'}")
        q = QuantRef(_array(r, state["weight"]), _array(r, state["scales"]))
        if q.weight.dtype != np.int8 or q.scales.dtype != _DTYPES["bfloat16"]:
            raise _bad(r, "QuantizedWeight8bit must hold int8 weight and bfloat16 scales")
        return q
    return _array(r, obj)
