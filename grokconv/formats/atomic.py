"""Write to a temporary sibling name, rename into place when complete (nothing half-written looks done)."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ..errors import DiskFullError

__all__ = ["atomic_write", "TMP_SUFFIX", "atomic_write_text", "disk_full", "raise_if_disk_full"]

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
