"""Finding a Megatron-LM checkpoint directory: the root, its tracker file, the iteration directory, and
which of the two kinds it holds (legacy ``mp_rank_*`` rank directories, or a torch_dist checkpoint:
``metadata.json`` + ``.metadata``)."""
from __future__ import annotations

import re
from pathlib import Path

from ...errors import CheckpointFormatError, MissingTensorError
from .plan import RELEASE_DIR, TRACKER_FILE

__all__ = ["checkpoint_root", "iteration_dir", "has_rank_dirs", "is_dist_dir", "detect", "RANK_DIR"]

RANK_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3}){0,2}$")
_ITER_DIR = re.compile(r"^iter_\d{7}$")
DIST_MARKER = "metadata.json"        # Megatron-Core's marker of a distributed checkpoint, written last


def is_dist_dir(d: Path) -> bool:
    return d.is_dir() and (d / DIST_MARKER).is_file() and (d / ".metadata").is_file()


def checkpoint_root(path: Path) -> Path:
    """The checkpoint root, also from ``ROOT/release`` or ``ROOT/iter_NNNNNNN``."""
    p = Path(path)
    if p.is_dir() and (p.name == "release" or _ITER_DIR.match(p.name)) and not (p / TRACKER_FILE).exists():
        return p.parent
    return p


def has_rank_dirs(d: Path) -> bool:
    return d.is_dir() and any(c.is_dir() and RANK_DIR.match(c.name) for c in d.iterdir())


def detect(path) -> bool:
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / TRACKER_FILE).exists() or has_rank_dirs(p / RELEASE_DIR) or is_dist_dir(p / RELEASE_DIR):
        return True
    return (p.name == RELEASE_DIR or bool(_ITER_DIR.match(p.name))) and (has_rank_dirs(p) or is_dist_dir(p))


def iteration_dir(root: Path) -> Path:
    tracker = root / TRACKER_FILE
    if tracker.exists():
        try:
            text = tracker.read_bytes()[:64].decode("ascii").strip()
        except UnicodeDecodeError:
            raise CheckpointFormatError("tracker file is not text ('release' or an iteration number)",
                                        path=tracker) from None
        if text == "release":
            return root / "release"
        try:
            if not text.isdigit():
                raise ValueError(text)
            return root / f"iter_{int(text):07d}"
        except ValueError:
            raise CheckpointFormatError(f"tracker file holds {text!r}, neither 'release' nor an iteration",
                                        path=tracker) from None
    if (root / "release").is_dir():
        return root / "release"
    raise MissingTensorError(f"no {TRACKER_FILE} and no release/ directory", path=root)
