import click

from ..inspect import human
from ._output import emit, json_option, overwrite_option, summary_dict


@click.command("to-gguf")
@click.argument("src", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
@click.option("--type", "type_", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="q8_0", show_default=True,
              help="Linear weights and embeddings: q8_0 keeps the original int8 (lossless where the scale is an "
                   "fp16 number); f32 is exact; f16 / bf16 are rounded once. Norms and the router stay f32.")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False),
              help="SentencePiece tokenizer.model (default: the one beside SRC).")
@click.option("--max-shard-size", help="Split into llama.cpp's -00001-of-0000N.gguf parts of at most this size "
                                       "(e.g. 45GB); llama.cpp loads the first part.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Tensors converted at once (threads). Default: one per available CPU core.")
@click.option("--dry-run", is_flag=True, help="Print the plan (every part, tensor, type, shape and offset).")
@click.option("--force", is_flag=True, help="Write the GGUF even when llama.cpp would refuse it (head size != "
                                             "d_model / heads; grokconv reads it back).")
@click.option("--no-progress", is_flag=True)
@overwrite_option
@json_option
def to_gguf_cmd(src, out, type_, tokenizer, max_shard_size, workers, dry_run, force, no_progress, overwrite, as_json):
    """Convert SRC (any format grokconv reads) to llama.cpp's GGUF (architecture grok) at OUT.gguf."""
    from ..formats.base import open_checkpoint
    from ..gguf_export import to_gguf
    from ..config import find_config_path
    from ..mapping import check_head_size, load_layout
    with open_checkpoint(src, strict=False) as r:
        warning = None if r.problems() else check_head_size(load_layout("gguf"), r.config, force,
                                                              path=find_config_path(r.path) or r.path)
    if warning:
        click.echo(f"warning (--force): {warning}", err=True)
    res = to_gguf(src, out, type=type_, tokenizer=tokenizer, max_shard_size=max_shard_size, workers=workers,
                  dry_run=dry_run, progress=not no_progress, overwrite=overwrite)
    if dry_run:
        if as_json:
            emit({"command": "to-gguf", "dry_run": True, "type": type_, "total_bytes": res.total_size,
                  "tokenizer": res.tokenizer,
                  "files": [{"file": p.filename, "bytes": p.size, "header_bytes": len(p.header),
                             "tensors": [{"name": t.target.name, "type": t.qtype, "shape": list(t.shape),
                                          "offset": t.offset} for t in p.tensors]} for p in res.parts]}, True, None)
            return
        for part in res.parts:
            click.echo(f"{part.filename}  {human(part.size)}  (header {len(part.header)} B)")
            for t in part.tensors:
                click.echo(f"  {t.target.name}  {t.qtype} {list(t.shape)}  @{t.offset}" + (f"  ({t.note})" if t.note else ""))
        click.echo(f"{len(res.tensors)} tensors in {len(res.parts)} file(s), {human(res.total_size)}; "
                   f"vocabulary from {res.tokenizer}")
        return
    if as_json:
        emit({**summary_dict("to-gguf", res, src=src, dst=out), "type": type_, "parts": res.parts,
              "q8_0": res.q8_0, "report": res.report}, True, None)
        return
    click.echo(f"{res.tensors} tensors, {res.shards_written} file(s) written, {res.shards_skipped} already complete; "
               f"read {human(res.bytes_read)}, wrote {human(res.bytes_written)} in {res.seconds:.1f} s "
               f"({human(res.rate)}/s moved); peak RSS {human(res.peak_rss)}")
    if res.q8_0:
        q = res.q8_0
        click.echo(f"q8_0 from the original int8: {q['q8_0_exact_blocks']} of {q['q8_0_blocks']} blocks exact, "
                   f"{q['q8_0_inexact_blocks']} inexact" +
                   (f" (scale not an fp16 number; max abs error {q['inexact_max_abs_error']:.3g}, "
                    f"max relative scale error {q['inexact_max_rel_error']:.3g})" if q["q8_0_inexact_blocks"] else ""))
    lossy = sorted(((v["rel_l2"], k) for k, v in res.errors.items() if "rel_l2" in v), reverse=True)[:5]
    for rel, k in lossy:
        click.echo(f"  ordinary q8_0 {k}: relative L2 error {rel:.3e}")
    if res.report:
        click.echo(f"report: {res.report}")


command = to_gguf_cmd
