"""``grokconv to-megatron`` and ``grokconv from-megatron``: Megatron-LM checkpoints (torch_dist or legacy torch)."""
from __future__ import annotations

import click

from ..inspect import human as format_bytes
from ..roles import ENCODINGS
from ._output import emit, json_option, overwrite_option, summary_dict

__all__ = ["COMMANDS", "to_megatron", "from_megatron"]


def _safetensors_layouts() -> list[str]:
    from ..mapping import layout_names
    return [n for n in layout_names() if n != "megatron"]


def _summary(s) -> str:
    files = (f", {s.shards_written} file(s) written, {s.shards_skipped} already complete"
             if s.shards_written or s.shards_skipped and s.tensors == 0 else
             f", {s.shards_skipped} already complete" if s.shards_skipped else "")
    return (f"{s.tensors} tensors{files}; wrote {format_bytes(s.bytes_written)} in {s.seconds:.1f} s; "
            f"peak RSS {format_bytes(s.peak_rss)}")


@click.command("to-megatron")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["torch_dist", "torch"]), default="torch_dist", show_default=True,
              help="torch_dist: Megatron-Core's distributed checkpoint (Megatron-LM's default --ckpt-format), "
                   "streamed, loadable into any TP/PP/EP layout the sizes allow (--tp/--pp/--ep/--vp only go into "
                   "args); torch: the legacy per-rank files for exactly that layout.")
@click.option("--tp", default=1, show_default=True, type=int,
              help="Tensor parallel size; divides query groups (num_kv_heads), q heads and ffn_size.")
@click.option("--pp", default=1, show_default=True, type=int, help="Pipeline parallel size; divides num_layers.")
@click.option("--ep", default=1, show_default=True, type=int, help="Expert parallel size; divides num_experts.")
@click.option("--vp", default=None, type=int,
              help="Virtual pipeline chunks per stage (interleaved schedule; needs pp > 1, pp*vp divides layers).")
@click.option("--untie", is_flag=True,
              help="Write a separate output_layer.weight (a copy of the embeddings) and "
                   "untie_embeddings_and_output_weights=True.")
@click.option("--memory-limit", default=None,
              help="--format torch: refuse a layout whose largest rank file exceeds this (e.g. 16GiB); a legacy rank "
                   "file is built in memory. Default: 80% of available RAM.")
@click.option("--vocab-pad", type=click.Choice(["replicate", "zero"]), default="replicate", show_default=True,
              help="Padding rows of the vocab-parallel embedding: replicate the last row (as Megatron's "
                   "converter does) or zeros.")
@click.option("--make-vocab-size-divisible-by", default=128, show_default=True, type=int)
@click.option("--transformer-impl", type=click.Choice(["local", "transformer_engine"]), default="local",
              show_default=True,
              help="The Megatron-Core layer spec the checkpoint is named for (grokconv.mcore.spec): local names the "
                   "input norm input_layernorm, transformer_engine fuses it into self_attention.linear_qkv.")
@click.option("--dry-run", is_flag=True, help="Print every rank file (torch) or global tensor (torch_dist) and its "
                                                 "size; write nothing.")
@click.option("--no-progress", is_flag=True)
@overwrite_option
@json_option
def to_megatron(src, dst, fmt, tp, pp, ep, vp, untie, memory_limit, vocab_pad, make_vocab_size_divisible_by,
                transformer_impl, dry_run, no_progress, overwrite, as_json):
    """Write SRC (any checkpoint grokconv reads) as a Megatron-LM release checkpoint in DST.

    torch_dist: DST/release/{metadata.json, common.pt, .metadata, __0_0.distcp}, streamed one chunk at a
    time. torch: DST/release/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt, one file per rank.
    Files are written under temporary names; DST/latest_checkpointed_iteration.txt ("release") last.
    """
    from ..formats.megatron.driver import to_megatron as write_megatron
    res = write_megatron(src, dst, fmt=fmt, tp=tp, pp=pp, ep=ep, vp=vp, untie=untie, memory_limit=memory_limit,
                         vocab_pad=vocab_pad, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                         transformer_impl=transformer_impl, dry_run=dry_run, progress=not no_progress,
                         overwrite=overwrite)
    if dry_run and fmt == "torch_dist":
        def dist_text():
            for t in res.tensors:
                click.echo(f"{t.key}  {list(t.shape)} {str(t.dtype).replace('torch.', '')}  "
                           f"{format_bytes(t.nbytes)}  {len(t.chunks)} chunks")
            click.echo(f"{len(res.tensors)} tensors, {len(res.objects)} extra-state objects, "
                       f"{format_bytes(res.total_bytes)} in all; largest chunk {format_bytes(res.largest_chunk)}")
        # streamed: what is held is one chunk, so there is no memory limit to fit
        emit({"command": "to-megatron", "format": fmt, "dry_run": True, "total_bytes": res.total_bytes,
              "largest_chunk": res.largest_chunk, "memory_limit": None, "fits": True,
              "tensors": [{"key": t.key, "shape": list(t.shape), "bytes": t.nbytes, "chunks": len(t.chunks)}
                          for t in res.tensors]}, as_json, dist_text)
        return
    if dry_run:
        big = res.largest

        def text():
            for rp in res.ranks:
                click.echo(f"{rp.relpath}  {format_bytes(rp.nbytes)}  {len(rp.tensors)} tensors")
            click.echo(f"{len(res.ranks)} rank files, {format_bytes(res.total_bytes)} in all; "
                       f"largest {big.relpath} {format_bytes(big.nbytes)}")
            if res.memory_limit is not None and big.nbytes > res.memory_limit:
                click.echo(f"refused without --dry-run: over the memory limit of {format_bytes(res.memory_limit)}")
        emit({"command": "to-megatron", "dry_run": True, "total_bytes": res.total_bytes,
              "memory_limit": res.memory_limit,
              "fits": res.memory_limit is None or big.nbytes <= res.memory_limit,
              "ranks": [{"file": rp.relpath, "bytes": rp.nbytes, "tensors": len(rp.tensors)} for rp in res.ranks]},
             as_json, text)
        return
    emit(summary_dict("to-megatron", res, src=src, dst=dst), as_json, lambda: click.echo(_summary(res)))


@click.command("from-megatron")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--layout", default="hf", show_default=True,
              type=click.Choice(["hf", "keyfan", "sglang", "jax"]),
              help="hf / keyfan / sglang: sharded safetensors in that layout; jax: the original release format.")
@click.option("--quantize", type=click.Choice(list(ENCODINGS)), default="none", show_default=True,
              help="Safetensors encoding (none: bf16; int8; fp8). The jax layout always re-quantizes to the "
                   "original int8.")
@click.option("--fp8-scheme", type=click.Choice(["channel", "tensor", "block"]), default="channel", show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Tensors converted at once (threads). Default: one per available CPU core.")
@click.option("--no-progress", is_flag=True)
@overwrite_option
@json_option
def from_megatron(src, dst, layout, quantize, fp8_scheme, max_shard_size, workers, no_progress, overwrite, as_json):
    """Convert a Megatron-LM checkpoint SRC (torch_dist or legacy, as to-megatron writes it) back to a Grok-1
    layout in DST."""
    from ..formats.base import open_checkpoint
    with open_checkpoint(src, fmt="megatron"):
        pass                                   # a clear error now if SRC is not a Megatron checkpoint
    if layout == "jax":
        if quantize != "none":
            raise click.BadParameter("the jax layout is the original int8 format; leave --quantize at none",
                                     param_hint="--quantize")
        from ..jax_export import to_jax
        s = to_jax(src, dst, progress=not no_progress, overwrite=overwrite)
    else:
        if layout not in _safetensors_layouts():
            raise click.BadParameter(f"unknown layout {layout!r}", param_hint="--layout")
        from ..convert import to_safetensors
        s = to_safetensors(src, dst, layout=layout, quantize=quantize, fp8_scheme=fp8_scheme,
                           max_shard_size=max_shard_size, workers=workers, progress=not no_progress,
                           overwrite=overwrite)
    emit(summary_dict("from-megatron", s, src=src, dst=dst, layout=layout), as_json, lambda: click.echo(_summary(s)))


COMMANDS = [to_megatron, from_megatron]
