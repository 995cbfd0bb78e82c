import click

from ..inspect import human
from ..mapping import layout_names
from ..roles import ENCODINGS
from ..schema import parse_layers
from ._output import emit, json_option, overwrite_option, summary_dict


def _layers(ctx_value, num_layers):
    return None if ctx_value is None else parse_layers(ctx_value, num_layers)


def print_summary(s, echo=click.echo):
    echo(f"{s.tensors} tensors, {s.shards_written} shard(s) written, {s.shards_skipped} already complete; "
         f"read {human(s.bytes_read)}, wrote {human(s.bytes_written)} in {s.seconds:.1f} s "
         f"({human(s.rate)}/s moved); peak RSS {human(s.peak_rss)}")
    if s.errors:
        worst = sorted(((v.get("rel_l2", 0), k, v) for k, v in s.errors.items() if "rel_l2" in v), reverse=True)[:5]
        if worst:
            echo("worst tensors (relative L2, SQNR dB, max abs error, amax):")
            for rel, k, v in worst:
                echo(f"  {k}: {rel:.3e}  {v['sqnr_db']:.1f}  {v['max_abs']:.3e}  {v['amax']:.3e}")


@click.command("to-safetensors")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--layout", type=click.Choice(layout_names()), default="hf", show_default=True,
              help="Target names: hf (vLLM / hpcai-tech), keyfan (llama.cpp), sglang.")
@click.option("--quantize", type=click.Choice(list(ENCODINGS)), default="none", show_default=True,
              help="none: bf16; int8: lossless compressed-tensors int8; fp8: e4m3.")
@click.option("--fp8-scheme", type=click.Choice(["channel", "tensor", "block"]), default="channel", show_default=True)
@click.option("--fp8-format", type=click.Choice(["compressed-tensors", "fp8"]), default="compressed-tensors",
              show_default=True, help="fp8: DeepSeek-style weight_scale_inv blocks (with --fp8-scheme block).")
@click.option("--int8-scheme", type=click.Choice(["group", "channel"]), default="group", show_default=True,
              help="int8: group keeps the original row-block scales exactly; channel is exact only for "
                   "weights with one scale per column (the others are re-quantized).")
@click.option("--layers", help="Export a slice, e.g. 0-1,5 (default: all).")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False),
              help="A tokenizer.model to copy into the export (default: the source's). --layout keyfan needs one: "
                   "llama.cpp's convert_hf_to_gguf.py reads it.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Tensors converted at once (threads). Default: one per available CPU core.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the plan (every output tensor, its shard and size).")
@click.option("--force", is_flag=True, help="Write a layout whose engine would misread this model (head size != "
                                             "d_model / heads for hf: vLLM, keyfan: llama.cpp) instead of refusing.")
@click.option("--no-progress", is_flag=True)
@overwrite_option
@json_option
def to_st(src, dst, layout, quantize, fp8_scheme, fp8_format, int8_scheme, layers, tokenizer, max_shard_size, workers,
          device, dry_run, force, no_progress, overwrite, as_json):
    """Convert SRC (any format grokconv reads) to sharded safetensors in DST."""
    from ..convert import to_safetensors
    from ..formats.base import open_checkpoint
    from ..config import find_config_path
    from ..mapping import check_head_size, load_layout
    with open_checkpoint(src, strict=False) as r:
        layer_list = _layers(layers, r.config.num_layers)
        # a config that disagrees with the tensors is the conversion's error to report, not this one
        warning = None if r.problems() else check_head_size(load_layout(layout), r.config, force,
                                                              path=find_config_path(r.path) or r.path)
    if warning:
        click.echo(f"warning (--force): {warning}", err=True)
    res = to_safetensors(src, dst, layout=layout, quantize=quantize, fp8_scheme=fp8_scheme, fp8_format=fp8_format,
                         int8_scheme=int8_scheme, layers=layer_list, max_shard_size=max_shard_size, workers=workers, device=device,
                         dry_run=dry_run, progress=not no_progress, tokenizer=tokenizer, require_files=True,
                         overwrite=overwrite)
    if dry_run:
        def text():
            for shard in res.shards:
                click.echo(f"{shard.filename}  {human(shard.size)}")
                for name, dtype, shape in shard.tensors:
                    n = shard.offsets[name]
                    click.echo(f"  {name}  {dtype} {list(shape)}  @{n}")
            click.echo(f"{sum(len(s.tensors) for s in res.shards)} tensors in {len(res.shards)} shard(s), "
                       f"{human(res.total_size)}")
        emit({"command": "to-safetensors", "dry_run": True, "layout": layout, "quantize": quantize,
              "total_bytes": res.total_size, "quantization_config": res.quantization_config,
              "shards": [{"file": s.filename, "bytes": s.size,
                          "tensors": [{"name": n, "dtype": d, "shape": list(sh), "offset": s.offsets[n]}
                                      for n, d, sh in s.tensors]} for s in res.shards]}, as_json, text)
        return
    emit(summary_dict("to-safetensors", res, src=src, dst=dst), as_json, lambda: print_summary(res))


@click.command("to-jax")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--no-progress", is_flag=True)
@overwrite_option
@json_option
def to_jx(src, dst, no_progress, overwrite, as_json):
    """Write SRC back in the original Grok-1 format (DST/ckpt-0/tensorNNNNN_000)."""
    from ..jax_export import to_jax
    res = to_jax(src, dst, progress=not no_progress, overwrite=overwrite)
    emit(summary_dict("to-jax", res, src=src, dst=dst), as_json, lambda: print_summary(res))


COMMANDS = [to_st, to_jx]
