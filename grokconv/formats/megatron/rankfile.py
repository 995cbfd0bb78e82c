"""Loading Megatron ``torch.save`` files (legacy rank files, a torch_dist ``common.pt``) without running code.

``torch.load(weights_only=True)``: tensors, containers, dtypes and ``argparse.Namespace``; globals of
Megatron's config modules (enums in ``args``) load as inert stand-ins; anything else is refused.

The allow-list is torch's process-wide one. :func:`allowing` adds only the entries that are not there
yet and removes only those on exit: ``torch.serialization.safe_globals`` removes every entry it was
given, so wrapping a load in it dropped ``argparse.Namespace`` that Megatron-Core registers at import,
and a later ``dist_checkpointing`` load of a ``common.pt`` in the same process failed.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from ...errors import CheckpointFormatError, UnsafePickleError

__all__ = ["load_rank_file", "allowing", "STUB_MODULES"]

# Real Megatron args carry enums and small config classes from these packages; they load as inert
# stand-ins (their code is never imported or run).
STUB_MODULES = ("megatron.", "transformer_engine.", "nemo.", "modelopt.")


@contextlib.contextmanager
def allowing(extra: list):
    """torch's weights-only allow-list plus ``extra`` inside; exactly as before on exit (entries that were
    there already, e.g. registered by Megatron-Core, stay)."""
    from torch.serialization import add_safe_globals, get_safe_globals
    present = set(get_safe_globals())
    added = [g for g in extra if g not in present]
    add_safe_globals(added)
    try:
        yield
    finally:
        if added:
            from torch.serialization import clear_safe_globals
            keep = [g for g in get_safe_globals() if g not in added]
            clear_safe_globals()
            add_safe_globals(keep)


class _Opaque:
    """Stand-in for a global of Megatron's config modules: records what it was built with, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{type(self).__qualname__} {self.args!r}>"


def load_rank_file(path, *, mmap: bool = True) -> dict:
    """``torch.load`` of one rank file with ``weights_only=True``: tensors, containers, dtypes and
    ``argparse.Namespace``; Megatron config globals as inert stand-ins; anything else refused."""
    path = Path(path)
    from torch.serialization import get_unsafe_globals_in_checkpoint
    try:
        unknown = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:
        raise CheckpointFormatError(f"not a torch checkpoint: {e}", path=path) from None
    stubs = []
    for g in unknown:
        if g == "argparse.Namespace":
            continue
        if not g.startswith(STUB_MODULES):
            raise UnsafePickleError(f"the pickle names the global {g}, which is neither a tensor type nor a "
                                    "Megatron config type; refusing to load it", path=path, global_name=g)
        stubs.append((type(g.rsplit(".", 1)[-1], (_Opaque,), {"__qualname__": g}), g))
    try:
        with allowing([argparse.Namespace, *stubs]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):        # a legacy (non-zip) torch file cannot be mapped
            return load_rank_file(path, mmap=False)
        raise CheckpointFormatError(f"cannot load rank file: {e}", path=path) from None
    except Exception as e:
        raise CheckpointFormatError(f"cannot load rank file safely: {str(e).splitlines()[-1] if str(e) else e}",
                                    path=path) from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"a rank file holds a {type(obj).__name__}, not a dict", path=path)
    return obj

