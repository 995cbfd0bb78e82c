"""Write to a temporary sibling name, make it durable, rename into place (nothing half-written looks done).

Temporary names are unique to the run: ``NAME.<pid>-<random>.incomplete``, so two runs never write
the same temporary file, and a run removes only its own (or, holding the output's lock, a dead run's:
:func:`temp_owner` reads the pid back). Before a file takes its final name its bytes are fsync'd, and
after the rename its directory is, so a power loss cannot leave a renamed file without its payload.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from pathlib import Path

from ..errors import DiskFullError

__all__ = ["atomic_write", "TMP_SUFFIX", "atomic_write_text", "disk_full", "raise_if_disk_full", "is_complete",
           "write_planned", "temp_path", "temp_owner", "fsync_dir", "durable_replace"]

TMP_SUFFIX = ".incomplete"
_RUN = {}
_TEMP_RE = re.compile(r"\.(\d+)-[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$")


def temp_path(final) -> Path:
    """A temporary sibling of ``final`` unique to this process: ``NAME.<pid>-<8 hex>.incomplete``."""
    final = Path(final)
    pid = os.getpid()
    tag = _RUN.get(pid) or _RUN.setdefault(pid, f"{pid}-{secrets.token_hex(4)}")
    return final.with_name(f"{final.name}.{tag}{TMP_SUFFIX}")


def temp_owner(path) -> int | None:
    """The pid that made temporary file ``path`` (None for a name this module did not make)."""
    m = _TEMP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def fsync_dir(directory) -> None:
    """Make a rename (or creation) in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:     # some filesystems refuse fsync on a directory: nothing more can be done there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def durable_replace(tmp, final) -> None:
    """Rename the already fsync'd ``tmp`` to ``final`` and fsync the directory."""
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)
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
def atomic_write(path, mode: str = "wb", durable=None):
    """Yield a file opened on a temporary name (:func:`temp_path`); on success its bytes are fsync'd,
    ``durable(size)`` is called (a guarded output's journal: :meth:`OutputGuard.done`), it is renamed
    to ``path`` and the directory is fsync'd.

    On any exception the temporary file is removed, so a killed or failed run never leaves a
    file under its final name. (A SIGKILL leaves ``*.incomplete``, which readers ignore.) A full
    disk becomes a :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        f = open(tmp, mode)
    except OSError as e:
        raise_if_disk_full(e, path)
        raise
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        size = os.fstat(f.fileno()).st_size
        f.close()
        if durable is not None:
            durable(size)
        durable_replace(tmp, path)
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

    The file is made at its full ``size`` under a temporary name, the ``header`` goes to
    offset 0, then ``fill(fd)`` writes the payloads at their planned offsets (``pwrite``, from any
    number of threads) and the bytes are fsync'd. ``before_rename()`` runs when the bytes are whole, then
    the file takes its final name (the directory fsync'd). On any error the temporary file is removed;
    a full disk is one :class:`DiskFullError`.
    """
    final = Path(final)
    tmp = temp_path(final)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise_if_disk_full(e, final)
        raise
    try:
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, header, 0)
            if on_bytes is not None:
                on_bytes(len(header))
            fill(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_rename is not None:
            before_rename()
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, final)
        raise
    durable_replace(tmp, final)
