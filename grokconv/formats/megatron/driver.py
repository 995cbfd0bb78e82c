"""``grokconv to-megatron``: any checkpoint grokconv reads -> a Megatron-LM release checkpoint, in the
torch_dist format (:mod:`.dist_writer`, streamed, loadable at any TP / PP / EP the sizes allow) or the
legacy per-rank torch format (:mod:`.legacy_writer`).

    DST/latest_checkpointed_iteration.txt     "release" (written last)
    DST/release/                              the checkpoint
    DST/grokconv-config.json                  the Grok config (so the way back is exact)
"""
from __future__ import annotations

import time
from pathlib import Path

from ...config import CONFIG_FILE
from ...errors import LayoutError
from ...sharding import Parallel
from ...tokenizer import TOKENIZER_FILE, find_tokenizer
from ..atomic import atomic_write, atomic_write_text
from ..outputs import guard_output, make_fingerprint
from .dist_plan import plan_dist
from .layout import DEFAULT_IMPL
from .plan import RELEASE_DIR, TRACKER_FILE, megatron_args, plan_megatron

__all__ = ["to_megatron", "FORMATS"]

FORMATS = ("torch_dist", "torch")
# what to-megatron writes in DST (replaced with --overwrite, or when no recorded run made it)
OWNED = (f"{RELEASE_DIR}/*", f"{RELEASE_DIR}/*/*", f"{RELEASE_DIR}/.metadata", TRACKER_FILE, CONFIG_FILE, "tokenizer.model")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def to_megatron(src, dst, *, fmt: str = "torch", tp: int = 1, pp: int = 1, ep: int = 1, vp: int | None = None,
                untie: bool = False, memory_limit=None, vocab_pad: str = "replicate",
                make_vocab_size_divisible_by: int = 128, transformer_impl: str = DEFAULT_IMPL,
                dry_run: bool = False, progress: bool = True, overwrite: bool = False, echo=print):
    """Write ``src`` (any readable checkpoint, or an open reader) as a Megatron-LM release checkpoint.

    ``fmt``: ``torch_dist`` (the CLI's default) or ``torch`` (legacy rank files; this function's default,
    as before). With ``torch_dist`` the TP / PP / EP / VP sizes only go into ``args`` (and the vocab
    padding, a multiple of ``make_vocab_size_divisible_by * tp``): the checkpoint loads into any layout.
    Returns the plan when ``dry_run``, else a :class:`grokconv.convert.Summary`.

    The output is guarded (:mod:`grokconv.formats.outputs`): one run at a time per DST; a file is kept on
    resume only when a run with the same source and byte-changing options made it durable; another
    run's output in DST is an error unless ``overwrite``. The fingerprint's digest is in ``args`` too
    (``grokconv_fingerprint``).
    """
    from ...units import parse_size
    from ..base import CheckpointReader, open_checkpoint
    from .legacy_writer import check_memory, default_memory_limit
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
    fp = make_fingerprint("to-megatron", reader.path, format=fmt, tp=tp, pp=pp, ep=ep, vp=par.vp, untie=untie,
                          vocab_pad=vocab_pad, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                          transformer_impl=transformer_impl)
    args.grokconv_fingerprint = fp.digest
    dst = Path(dst)
    with guard_output(dst, fp, owned=OWNED, overwrite=overwrite) as guard:
        summary = _write(reader, plan, args, dst, fmt, guard, progress)
        guard.finish()
    return summary


def _write(reader, plan, args, dst: Path, fmt: str, guard, progress: bool):
    from ...convert import Summary
    from ...runtime import peak_rss_bytes
    cfg = reader.config
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
            from .legacy_writer import write_legacy
            write_legacy(reader, plan, args, release, summary, bar, guard)
        else:
            from .dist_writer import write_dist
            write_dist(reader, plan, args, release, summary, bar, guard)
    finally:
        bar.close()
    cfg.save(dst / CONFIG_FILE)
    tok = find_tokenizer(reader.path)
    if tok is not None:
        atomic_write_bytes(dst / TOKENIZER_FILE, tok.read_bytes())
    atomic_write_text(dst / TRACKER_FILE, "release")
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss = peak_rss_bytes()
    return summary
