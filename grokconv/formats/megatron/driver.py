"""``grokconv to-megatron``: any checkpoint grokconv reads -> a Megatron-LM release checkpoint, in the
torch_dist format (:mod:`.dist_writer`, streamed, loadable at any TP / PP / EP the sizes allow) or the
legacy per-rank torch format (:mod:`.legacy_writer`).

    DST/latest_checkpointed_iteration.txt     "release" (written last)
    DST/release/                              the checkpoint
    DST/grokconv-config.json                  the Grok config (so the way back is exact)
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ...config import CONFIG_FILE
from ...errors import LayoutError
from ...sharding import Parallel
from ..atomic import atomic_write_text
from .dist_plan import plan_dist
from .layout import DEFAULT_IMPL
from .plan import RELEASE_DIR, TRACKER_FILE, megatron_args, plan_megatron

__all__ = ["to_megatron", "FORMATS"]

FORMATS = ("torch_dist", "torch")


def to_megatron(src, dst, *, fmt: str = "torch", tp: int = 1, pp: int = 1, ep: int = 1, vp: int | None = None,
                untie: bool = False, memory_limit=None, vocab_pad: str = "replicate",
                make_vocab_size_divisible_by: int = 128, transformer_impl: str = DEFAULT_IMPL,
                dry_run: bool = False, progress: bool = True, echo=print):
    """Write ``src`` (any readable checkpoint, or an open reader) as a Megatron-LM release checkpoint.

    ``fmt``: ``torch_dist`` (the CLI's default) or ``torch`` (legacy rank files; this function's default,
    as before). With ``torch_dist`` the TP / PP / EP / VP sizes only go into ``args`` (and the vocab
    padding, a multiple of ``make_vocab_size_divisible_by * tp``): the checkpoint loads into any layout.
    Returns the plan when ``dry_run``, else a :class:`grokconv.convert.Summary`.
    """
    from ...convert import Summary
    from ...runtime import peak_rss_bytes
    from ...units import parse_size
    from ..base import CheckpointReader, open_checkpoint
    from .legacy_writer import check_memory, default_memory_limit, write_legacy
    if fmt not in FORMATS:
        raise LayoutError(f"unknown Megatron checkpoint format {fmt!r}; choose {' or '.join(FORMATS)}")
    if vocab_pad not in ("replicate", "zero"):
        raise LayoutError(f"unknown vocab padding {vocab_pad!r}; choose replicate or zero")
    reader = src if isinstance(src, CheckpointReader) else open_checkpoint(src)
    cfg = reader.config
    missing = sorted(set(range(cfg.num_layers)) - set(reader.layers))
    if missing:
        raise LayoutError(f"a Megatron checkpoint holds every layer; the source lacks layers {missing[:8]}",
                          path=reader.path)
    # vp=1 is no virtual pipeline: Megatron saves a one-chunk model list as "model"
    par = Parallel(tp, pp, ep, None if vp in (None, 0, 1) else vp, untie, make_vocab_size_divisible_by)
    if fmt == "torch":
        plan = plan_megatron(cfg, par, vocab_pad, transformer_impl)
        plan.memory_limit = default_memory_limit() if memory_limit is None else parse_size(memory_limit)
    else:
        plan = plan_dist(cfg, par, vocab_pad, transformer_impl)
    if dry_run:
        return plan                        # the caller shows the plan, and whether it fits
    if fmt == "torch":
        check_memory(plan, plan.memory_limit)
    args = megatron_args(cfg, par, vocab_pad, transformer_impl, ckpt_format=fmt)
    dst = Path(dst)
    release = dst / RELEASE_DIR
    release.mkdir(parents=True, exist_ok=True)
    (dst / TRACKER_FILE).unlink(missing_ok=True)   # the tracker marks a complete checkpoint: it goes last
    summary = Summary()
    t0 = time.perf_counter()
    from tqdm import tqdm
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=f"to-megatron {fmt}",
               disable=not progress, dynamic_ncols=True)
    try:
        if fmt == "torch":
            write_legacy(reader, plan, args, release, summary, bar)
        else:
            from .dist_writer import write_dist
            write_dist(reader, plan, args, release, summary, bar)
    finally:
        bar.close()
    cfg.save(dst / CONFIG_FILE)
    for cand in (reader.path / "tokenizer.model", reader.path.parent / "tokenizer.model"):
        if cand.exists() and not (dst / "tokenizer.model").exists():
            shutil.copyfile(cand, dst / "tokenizer.model")
            break
    atomic_write_text(dst / TRACKER_FILE, "release")
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss = peak_rss_bytes()
    return summary
