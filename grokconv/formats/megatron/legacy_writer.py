"""The legacy Megatron-LM checkpoint (``--ckpt-format torch``): one ``torch.save`` per rank.

    DST/release/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt
        {"args": Namespace, "checkpoint_version": 3.0, "iteration": 0, "model" | "model0".."model{V-1}": {...}}

A rank file is built whole in memory before ``torch.save`` writes it (a pickle of the state dict
references every tensor), so the largest rank file must fit ``--memory-limit`` (default 80% of the
available RAM) or nothing is written: raise TP / PP / EP to make rank files smaller, or write
``--format torch_dist``, which streams. One rank file at a time: read only that rank's slices from the
source (its stage's layers, its experts, its rows/columns), save under a temporary name, rename, drop.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

from ...errors import LayoutError
from ...units import format_bytes
from ..atomic import TMP_SUFFIX, atomic_write
from .plan import CHECKPOINT_VERSION, MegatronPlan, RankPlan

__all__ = ["default_memory_limit", "check_memory", "build_rank", "rank_file_complete", "write_legacy"]


def default_memory_limit() -> int:
    import psutil
    return int(0.8 * psutil.virtual_memory().available)


def check_memory(plan: MegatronPlan, limit: int) -> None:
    big = plan.largest
    if big.nbytes > limit:
        raise LayoutError(
            f"the largest rank file ({big.relpath}) would hold {format_bytes(big.nbytes)} "
            f"({big.nbytes} bytes), over the memory limit of {format_bytes(limit)} ({limit} bytes): "
            f"a legacy rank file is built in memory before it is saved",
            hint="write --format torch_dist (streamed), raise --pp / --ep / --tp to make rank files smaller, "
                 "or pass a larger --memory-limit")


def build_rank(reader, plan: MegatronPlan, rp: RankPlan, args: argparse.Namespace) -> dict:
    cfg, par = plan.config, plan.par
    models = [OrderedDict() for _ in range(par.chunks)]
    for t in rp.tensors:
        value = t.mapping.build(reader, cfg, par, t.layer, t.expert, rp.tp)
        if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
            raise LayoutError(f"{rp.relpath}: {t.key} built as {tuple(value.shape)} {value.dtype}, "
                              f"planned {tuple(t.shape)} {t.dtype}")
        models[t.chunk][t.key] = value
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    for key, sd in zip(plan.model_keys(), models):
        state[key] = sd
    return state


def rank_file_complete(path: Path, args: argparse.Namespace, guard=None) -> bool:
    """The one "is this rank file already done" decision: a rank file that a run of this fingerprint made
    durable (``guard``: :class:`grokconv.formats.outputs.OutputGuard`), holding the same args."""
    if not path.exists() or (guard is not None and not guard.is_complete(path)):
        return False
    try:
        from .rankfile import load_rank_file
        old = load_rank_file(path)
    except Exception:
        return False
    return isinstance(old, dict) and vars(old.get("args", argparse.Namespace())) == vars(args)


def _remove_if_empty(d: Path) -> bool:
    """An empty rank directory (left by --overwrite of another layout) is removed; True if it was."""
    if d.is_dir() and not any(d.iterdir()):
        d.rmdir()
        return True
    return False


def write_legacy(reader, plan: MegatronPlan, args: argparse.Namespace, release: Path, summary, bar,
                 guard=None) -> None:
    """Every rank file of ``plan`` under ``release``, one at a time; complete ones are skipped."""
    import torch
    planned = {r.dirname for r in plan.ranks}
    stray = sorted(d.name for d in release.iterdir() if d.name.startswith("mp_rank_") and d.name not in planned
                   and not _remove_if_empty(d))
    if stray:
        raise LayoutError(f"{release} already holds rank directories of another layout ({', '.join(stray[:4])}); "
                          "write to an empty directory", path=release.parent)
    for rp in plan.ranks:
        d = release / rp.dirname
        d.mkdir(exist_ok=True)
        for stale in d.glob(f"*{TMP_SUFFIX}"):
            stale.unlink()
        path = d / rp.relpath.rsplit("/", 1)[-1]
        if rank_file_complete(path, args, guard):
            summary.shards_skipped += 1
            bar.update(rp.nbytes)
            continue
        state = build_rank(reader, plan, rp, args)
        with atomic_write(path, durable=None if guard is None else (lambda n, path=path: guard.done(path, n))) as f:
            torch.save(state, f)
        del state
        summary.shards_written += 1
        summary.tensors += len(rp.tensors)
        summary.bytes_written += path.stat().st_size
        bar.update(rp.nbytes)
