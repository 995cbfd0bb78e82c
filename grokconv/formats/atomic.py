"""Write to a temporary sibling name, rename into place when complete (nothing half-written looks done)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["atomic_write", "TMP_SUFFIX", "atomic_write_text"]

TMP_SUFFIX = ".incomplete"


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file opened on ``path + '.incomplete'``; fsync-free rename to ``path`` on success.

    On any exception the temporary file is removed, so a killed or failed run never leaves a
    file under its final name. (A SIGKILL leaves ``*.incomplete``, which readers ignore.)
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    f = open(tmp, mode)
    try:
        yield f
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)
