"""Checking a ``torch.save`` zip inside a ``*.distcp`` file from its structure alone, without reading its
payload: the zip's directory and local headers, the records ``torch.save`` writes, and its ``data.pkl``
(walked by an unpickler that builds nothing: it only records what ``_rebuild_tensor_v2`` would be given)
naming one contiguous tensor of the planned shape and dtype whose storage record holds exactly its bytes.

A reader runs this on every chunk before anything is converted, so a damaged chunk is one clear error
up front, not a failure half-way through writing an export."""
from __future__ import annotations

import io
import math
import pickle
import zipfile

import torch

__all__ = ["chunk_problem"]

_STORAGES = {f"{n}Storage": d for n, d in (("BFloat16", torch.bfloat16), ("Float", torch.float32),
                                             ("Half", torch.float16), ("Double", torch.float64))}


_COPY_BELOW = 1 << 20


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``buf[start:start + length]`` (no copy)."""

    def __init__(self, buf, start: int, length: int):
        self.buf, self.start, self.length, self.pos = buf, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, off, whence=0):
        self.pos = {0: off, 1: self.pos + off, 2: self.length + off}[whence]
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        b[:n] = self.buf[self.start + self.pos: self.start + self.pos + n]
        self.pos += n
        return n


class _Rebuild:
    def __init__(self, *args):
        self.args = args


class _PklWalker(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGES:
            return name
        raise pickle.UnpicklingError(f"global {module}.{name}")

    def persistent_load(self, pid):
        return tuple(pid)


def chunk_problem(buf, start: int, length: int, sizes: tuple, dtype: torch.dtype) -> str | None:
    """None when ``buf[start:start+length]`` is a ``torch.save`` of one contiguous ``dtype`` tensor of
    ``sizes``; else what is wrong."""
    try:
        # a small chunk is copied (cheaper than the window's Python-level reads); a large one is not
        src = io.BytesIO(buf[start:start + length]) if length <= _COPY_BELOW else _Window(buf, start, length)
        z = zipfile.ZipFile(src)
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            return "no data.pkl record"
        prefix = pkl[0][: -len("data.pkl")]
        rebuilt = _PklWalker(io.BytesIO(z.read(pkl[0]))).load()        # z.read checks the CRC
        if not isinstance(rebuilt, _Rebuild) or len(rebuilt.args) < 4:
            return "data.pkl does not rebuild a tensor"
        storage, offset, size, stride = rebuilt.args[:4]
        if not (isinstance(storage, tuple) and len(storage) >= 3 and storage[0] == "storage"):
            return "data.pkl names no storage"
        got = _STORAGES.get(storage[1])
        if got != dtype or tuple(size) != tuple(sizes) or offset != 0:
            return f"holds {got} {tuple(size)} at offset {offset}, the metadata says {dtype} {tuple(sizes)}"
        want_stride, acc = [], 1
        for s in reversed(sizes):
            want_stride.insert(0, acc)
            acc *= s
        if tuple(stride) != tuple(want_stride) and math.prod(sizes) > 1:
            return f"strides {tuple(stride)} are not contiguous"
        rec = f"{prefix}data/{storage[2]}"
        info = z.getinfo(rec)
        if info.file_size != math.prod(sizes) * torch.empty((), dtype=dtype).element_size() or \
                info.compress_type != zipfile.ZIP_STORED:
            return f"storage record {rec} holds {info.file_size} bytes"
        with z.open(rec):                          # its local header is read and checked against the directory
            pass
    except Exception as e:                          # whatever a damaged zip or pickle raises: a problem
        return f"not a torch.save zip ({type(e).__name__}: {str(e)[:80]})"
    return None
