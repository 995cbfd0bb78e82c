"""A pickle opcode walker that executes nothing.

It reads the opcode stream of one file with exact positioned reads, checks every opcode and every
global against allow-lists, and returns *where* the array payloads are, never their bytes. Arrays
are then mapped read-only from the file (zero copy). Anything outside the shapes the Grok-1 release
uses -- another global, another opcode, a string that is not UTF-8, a frame that overlaps another
or runs past the file, an opcode straddling a frame's end, a memo index never set, a stack deeper
than the release's, a second pickle, trailing bytes, a length that disagrees with the shape --
raises an error naming the file and the byte.
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
MAX_STACK = 256     # the release nests four deep; a real file never holds more than ~20 items
MAX_MEMO = 1024


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
    """Positioned reads of one file, with CPython's framing rules: an opcode or its argument may not
    straddle the end of a frame, and a new frame may not begin before the current one ends."""

    def __init__(self, fd, size, path):
        self.fd, self.size, self.path, self.pos, self.bytes_read = fd, size, path, 0, 0
        self.frame_end: int | None = None

    def _check_frame(self, n):
        if self.frame_end is not None:
            if self.pos >= self.frame_end:
                self.frame_end = None          # the frame is used up: what follows is unframed
            elif self.pos + n > self.frame_end:
                raise CheckpointFormatError(
                    f"{n} bytes at byte {self.pos} run past the end of their frame (byte {self.frame_end})",
                    path=self.path)

    def read(self, n):
        self._check_frame(n)
        if self.pos + n > self.size:
            raise TruncatedFileError(f"pickle stream ends at byte {self.size}, needs {self.pos + n}",
                                     path=self.path)
        data = os.pread(self.fd, n, self.pos)
        if len(data) != n:
            raise TruncatedFileError(f"short read at byte {self.pos} (the file shrank while being read?)",
                                     path=self.path)
        self.pos += n
        self.bytes_read += n
        return data

    def skip(self, n):
        self._check_frame(n)
        if self.pos + n > self.size:
            raise TruncatedFileError(
                f"payload of {n} bytes at offset {self.pos} runs past the end of the file ({self.size} bytes)",
                path=self.path)
        self.pos += n

    def frame(self, n):
        if self.frame_end is not None and self.pos < self.frame_end:
            raise CheckpointFormatError(f"a new frame begins at byte {self.pos - 9}, before the current one "
                                        f"ends (byte {self.frame_end})", path=self.path)
        if n > MAX_FRAME:
            raise CheckpointFormatError(f"frame of {n} bytes at byte {self.pos - 9} exceeds the cap of {MAX_FRAME}",
                                        path=self.path)
        if self.pos + n > self.size:
            raise TruncatedFileError(f"frame of {n} bytes at byte {self.pos - 9} runs past the end of the file "
                                     f"({self.size} bytes)", path=self.path)
        self.frame_end = self.pos + n

    def text(self, n, at):
        raw = self.read(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointFormatError(f"string at byte {at} is not UTF-8 (byte {raw[e.start]:#04x} at "
                                        f"position {e.start}): the file is damaged", path=self.path) from None


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
        if r.frame_end is not None and r.pos < r.frame_end:
            raise CheckpointFormatError("STOP before the end of its frame", path=path)
        if stats is not None:
            stats["bytes_read"] = stats.get("bytes_read", 0) + r.bytes_read
        return result
    finally:
        os.close(fd)


def _bad(r, msg):
    return CheckpointFormatError(msg, path=r.path)


class _Stack(list):
    """The unpickler's stack; popping an empty one or growing past the cap is a format error."""

    def __init__(self, r):
        super().__init__()
        self.r = r

    def pop_n(self, n, op):
        if len(self) < n:
            raise _bad(self.r, f"opcode {op} at byte {self.r.pos - 1} needs {n} stack item(s), has {len(self)}")
        items = self[len(self) - n:]
        del self[len(self) - n:]
        return items

    def top(self, op):
        if not self:
            raise _bad(self.r, f"opcode {op} at byte {self.r.pos - 1} on an empty stack")
        return self[-1]

    def push(self, item):
        if len(self) >= MAX_STACK:
            raise _bad(self.r, f"more than {MAX_STACK} items on the stack (nesting too deep)")
        self.append(item)


def _walk(r: _Reader):  # noqa: C901 - one flat dispatch loop reads best here
    stack = _Stack(r)
    push = stack.push
    memo: dict[int, object] = {}
    if r.read(2) != b"\x80\x04":
        raise _bad(r, "not a protocol-4 pickle (expected bytes 80 04 at the start)")
    for _ in range(MAX_OPS):
        at = r.pos
        op = r.read(1)
        if op == b"\x95":                      # FRAME
            (n,) = struct.unpack("<Q", r.read(8))
            r.frame(n)
        elif op == b"\x8c":                    # SHORT_BINUNICODE
            n = r.read(1)[0]
            push(r.text(n, at))
        elif op == b"X":                       # BINUNICODE
            (n,) = struct.unpack("<I", r.read(4))
            if n > MAX_STRING:
                raise _bad(r, f"string of {n} bytes at byte {at} exceeds the cap of {MAX_STRING}")
            push(r.text(n, at))
        elif op == b"\x94":                    # MEMOIZE
            if len(memo) >= MAX_MEMO:
                raise _bad(r, f"more than {MAX_MEMO} memo entries")
            memo[len(memo)] = stack.top("MEMOIZE")
        elif op in (b"h", b"j"):               # BINGET, LONG_BINGET
            idx = r.read(1)[0] if op == b"h" else struct.unpack("<I", r.read(4))[0]
            if idx not in memo:
                raise _bad(r, f"memo index {idx} at byte {at} used before it was set ({len(memo)} set)")
            push(memo[idx])
        elif op == b"\x93":                    # STACK_GLOBAL
            module, name = stack.pop_n(2, "STACK_GLOBAL")
            if not (isinstance(module, str) and isinstance(name, str)):
                raise _bad(r, f"STACK_GLOBAL operands at byte {at} are not strings")
            if (module, name) not in ALLOWED_GLOBALS:
                raise UnsafePickleError(
                    f"refused global {module}.{name}: only the globals of the Grok-1 release are allowed "
                    "(nothing in the file was run)", path=r.path, global_name=f"{module}.{name}")
            push(_Global(module, name))
        elif op == b"K":
            push(r.read(1)[0])
        elif op == b"M":
            push(struct.unpack("<H", r.read(2))[0])
        elif op == b"J":
            push(struct.unpack("<i", r.read(4))[0])
        elif op == b"\x8a":                    # LONG1
            n = r.read(1)[0]
            if n > 8:
                raise _bad(r, f"integer of {n} bytes at byte {at} is too long")
            push(int.from_bytes(r.read(n), "little", signed=True))
        elif op == b"N":
            push(None)
        elif op == b"\x88":
            push(True)
        elif op == b"\x89":
            push(False)
        elif op == b")":
            push(())
        elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
            push(tuple(stack.pop_n(op[0] - 0x84, "TUPLE%d" % (op[0] - 0x84))))
        elif op == b"(":
            push(_MARK)
        elif op == b"t":                       # TUPLE (to mark)
            push(tuple(_pop_mark(r, stack)))
        elif op == b"}":
            push({})
        elif op == b"u":                       # SETITEMS
            items = _pop_mark(r, stack)
            d = stack[-1] if stack else None
            if not isinstance(d, dict) or len(items) % 2:
                raise _bad(r, f"SETITEMS at byte {at} without a dict")
            for k, v in zip(items[::2], items[1::2]):
                if not isinstance(k, str):
                    raise _bad(r, f"dict key at byte {at} is not a string")
                d[k] = v
        elif op == b"s":                       # SETITEM
            k, v = stack.pop_n(2, "SETITEM")
            if not isinstance(stack.top("SETITEM"), dict) or not isinstance(k, str):
                raise _bad(r, f"SETITEM at byte {at} without a dict")
            stack[-1][k] = v
        elif op in (b"C", b"B", b"\x8e"):      # SHORT_BINBYTES, BINBYTES, BINBYTES8
            fmt = {b"C": "<B", b"B": "<I", b"\x8e": "<Q"}[op]
            (n,) = struct.unpack(fmt, r.read(struct.calcsize(fmt)))
            push(_Payload(r.pos, n))
            r.skip(n)                          # never read: its offset is all we keep
        elif op == b"R":                       # REDUCE
            fn, args = stack.pop_n(2, "REDUCE")
            if not isinstance(fn, _Global) or not isinstance(args, tuple):
                raise _bad(r, f"REDUCE at byte {at} of something that is not an allowed global")
            if fn.name == "_reconstruct":
                push(_Obj("ndarray", args))
            elif (fn.module, fn.name) == ("numpy", "dtype"):
                push(_Obj("dtype", args))
            else:
                raise UnsafePickleError(f"refused call of {fn.module}.{fn.name}", path=r.path,
                                        global_name=f"{fn.module}.{fn.name}")
        elif op == b"\x81":                    # NEWOBJ
            cls, args = stack.pop_n(2, "NEWOBJ")
            if not (isinstance(cls, _Global) and cls.name == "QuantizedWeight8bit" and args == ()):
                raise UnsafePickleError("refused NEWOBJ of anything but QuantizedWeight8bit()", path=r.path)
            push(_Obj("qw8", ()))
        elif op == b"b":                       # BUILD
            (state,) = stack.pop_n(1, "BUILD")
            obj = stack.top("BUILD")
            if not isinstance(obj, _Obj) or obj.state is not None:
                raise _bad(r, f"BUILD at byte {at} on something that is not a fresh array, dtype or "
                              "QuantizedWeight8bit")
            obj.state = state
        elif op == b".":                       # STOP
            if len(stack) != 1:
                raise _bad(r, f"STOP at byte {at} with {len(stack)} items on the stack, not 1")
            return _interpret(r, stack[0])
        else:
            raise UnsafePickleError(f"refused opcode {op!r} at byte {at}: outside the allow-list",
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
    if not isinstance(key, str) or key not in _DTYPES:
        raise _bad(r, f"dtype {_short(key)} is not one of float32, int8, bfloat16")
    order = obj.state[1] if len(obj.state) > 1 else None
    if not isinstance(order, str) or order not in ("<", "|", "="):
        raise _bad(r, f"byte order {_short(order)} is not little-endian")
    return _DTYPES[key]


def _short(v) -> str:
    """A value from the file, for a message: its repr, cut short (it may be anything)."""
    if isinstance(v, (_Global, _Obj, _Payload)):
        return f"<{type(v).__name__.lstrip('_').lower()}>"
    text = repr(v) if isinstance(v, (str, int, float, bool, type(None))) else f"<{type(v).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


def _array(r, obj) -> ArrayRef:
    if not (isinstance(obj, _Obj) and obj.kind == "ndarray" and isinstance(obj.state, tuple)
            and len(obj.state) == 5):
        raise _bad(r, "expected a numpy array")
    if not (len(obj.args) == 3 and isinstance(obj.args[0], _Global) and obj.args[0].name == "ndarray"):
        raise _bad(r, "array is not reconstructed as numpy.ndarray")
    _version, shape, dtobj, fortran, payload = obj.state
    if _version != 1:
        raise _bad(r, f"array state version {_short(_version)}, expected 1")
    if fortran is not False:
        raise _bad(r, "Fortran-ordered arrays are not part of the format")
    if not (isinstance(shape, tuple) and len(shape) <= 8
            and all(type(d) is int and d >= 0 for d in shape)):
        raise _bad(r, f"array shape {_short(shape) if not isinstance(shape, tuple) else shape} is malformed")
    dtype = _dtype(r, dtobj)
    if not isinstance(payload, _Payload):
        raise _bad(r, "array data is not a bytes payload")
    ref = ArrayRef(r.path, dtype, shape, payload.offset)
    if payload.length != ref.nbytes:
        raise _bad(r, f"payload holds {payload.length} bytes but shape {list(shape)} of {dtype} needs {ref.nbytes}")
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
