"""Write to a temporary sibling name, rename into place when complete (nothing half-written looks done)."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ..errors import DiskFullError

__all__ = ["atomic_write", "TMP_SUFFIX", "atomic_write_text", "disk_full", "raise_if_disk_full", "is_complete",
           "write_planned"]

TMP_SUFFIX = ".incomplete"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT error behind ``exc``, if any (torch.save wraps it in a RuntimeError)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def raise_if_disk_full(exc: BaseException, path) -> None:
    """Turn a full disk met while writing ``path`` into one :class:`DiskFullError` naming it."""
    e = disk_full(exc)
    if e is not None and not isinstance(exc, DiskFullError):
        raise DiskFullError(f"no space left on the device while writing it ({os.strerror(e.errno)}); "
                            "the partial file was removed", path=path) from None


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file opened on ``path + '.incomplete'``; fsync-free rename to ``path`` on success.

    On any exception the temporary file is removed, so a killed or failed run never leaves a
    file under its final name. (A SIGKILL leaves ``*.incomplete``, which readers ignore.) A full
    disk becomes a :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        f = open(tmp, mode)
    except OSError as e:
        raise_if_disk_full(e, path)
        raise
    try:
        yield f
        f.close()
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):   # closing flushes: on a full disk that fails again
            f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise_if_disk_full(e, path)
        raise


def atomic_write_text(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def is_complete(path: Path, size: int, header: bytes) -> bool:
    """A planned file already written whole: its final name, its planned size, its planned header."""
    path = Path(path)
    if not path.exists() or path.stat().st_size != size:
        return False
    with open(path, "rb") as f:
        return f.read(len(header)) == header


def write_planned(final: Path, size: int, header: bytes, fill, on_bytes=None, before_rename=None) -> None:
    """Write a file whose layout was planned from metadata (safetensors shards, GGUF parts).

    The file is made at its full ``size`` under ``final + '.incomplete'``, the ``header`` goes to
    offset 0, then ``fill(fd)`` writes the payloads at their planned offsets (``pwrite``, from any
    number of threads). ``before_rename()`` runs when the bytes are whole, then the file takes its final
    name. On any error the temporary file is removed; a full disk is one :class:`DiskFullError`.
    """
    final = Path(final)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, header, 0)
            if on_bytes is not None:
                on_bytes(len(header))
            fill(fd)
        finally:
            os.close(fd)
        if before_rename is not None:
            before_rename()
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, final)
        raise
    os.replace(tmp, final)
