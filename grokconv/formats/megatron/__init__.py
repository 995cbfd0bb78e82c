"""Megatron-LM checkpoints: written by ``grokconv to-megatron`` and read back by every command.

One concern per module, no import cycles (each imports only those above it):

    layout.py          the typed mappings (rename / QKV / gated MLP / vocab) and mappings/megatron.json
    plan.py            legacy rank-file plan, and the ``args`` Megatron-LM reads
    dist_plan.py       torch_dist plan: global tensors, chunks, ``_extra_state`` objects, the tiling check
    legacy_writer.py   ``--format torch``: one torch.save per rank (built in memory, under a memory limit)
    dist_writer.py     ``--format torch_dist``: streamed, one chunk at a time
    driver.py          ``to_megatron``: source -> plan -> writer, tracker last
    rankfile.py        weights-only ``torch.load`` of rank files and ``common.pt``
    checkpoint_dir.py  tracker, iteration directory, which kind of checkpoint
    args_read.py       layout, layer spec and Grok config from a checkpoint's args
    legacy_reader.py   legacy rank files -> canonical tensors
    dist_reader.py     torch_dist -> canonical tensors
"""
from __future__ import annotations

from pathlib import Path

from ..base import register_format
from .checkpoint_dir import checkpoint_root, detect, has_rank_dirs, iteration_dir
from .layout import (DEFAULT_IMPL, IMPLS, DirectMapping, GatedMLPMapping, MegatronLayout, QKVMapping,
                     TensorMapping, VocabMapping, load_megatron_layout, read_block)
from .plan import (CHECKPOINT_VERSION, RANK_FILE, RELEASE_DIR, TRACKER_FILE, MegatronPlan, RankPlan,
                   megatron_args, plan_megatron)
from .rankfile import STUB_MODULES, load_rank_file

__all__ = ["open_megatron", "load_rank_file", "STUB_MODULES", "MegatronLayout", "load_megatron_layout",
           "TensorMapping", "DirectMapping", "VocabMapping", "QKVMapping", "GatedMLPMapping", "read_block",
           "RankPlan", "MegatronPlan", "plan_megatron", "megatron_args", "IMPLS", "DEFAULT_IMPL", "TRACKER_FILE",
           "RANK_FILE", "RELEASE_DIR", "CHECKPOINT_VERSION", "MegatronCheckpoint", "DistCheckpoint", "to_megatron"]


def open_megatron(path, *, layers=None, strict: bool = True):
    """A reader for a Megatron-LM checkpoint directory of either kind (root, release/ or iter_NNNNNNN/)."""
    root = checkpoint_root(Path(path))
    it = iteration_dir(root)
    if not has_rank_dirs(it) and ((it / ".metadata").exists() or (it / "common.pt").exists()
                                  or (it / "metadata.json").exists()):
        from .dist_reader import DistCheckpoint
        return DistCheckpoint(root, it, layers=layers, strict=strict)
    from .legacy_reader import MegatronCheckpoint
    return MegatronCheckpoint(root, it, layers=layers, strict=strict)


def __getattr__(name):          # the readers and the driver import torch's heavier parts: on first use
    if name == "MegatronCheckpoint":
        from .legacy_reader import MegatronCheckpoint
        return MegatronCheckpoint
    if name == "DistCheckpoint":
        from .dist_reader import DistCheckpoint
        return DistCheckpoint
    if name == "to_megatron":
        from .driver import to_megatron
        return to_megatron
    raise AttributeError(name)


register_format("megatron", detect, open_megatron)
