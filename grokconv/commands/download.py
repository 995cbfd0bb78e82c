"""``grokconv download`` and ``grokconv verify``: fetch Grok-1 from the hub, check a directory later."""
from __future__ import annotations

from pathlib import Path

import click

from ..config import PRESETS, load_preset
from ..download import (DEFAULT_REPO, DEFAULT_TOKENIZER_REPO, MANIFEST, download as download_files, format_bytes,
                        verify_dir)
from ..errors import CheckpointFormatError, DownloadError
from ..schema import parse_layers
from ._output import emit, json_option

__all__ = ["COMMANDS", "download", "verify"]


def _layers_text(layers) -> str:
    return "all layers" if layers is None else "layers " + ",".join(map(str, layers))


@click.command("download")
@click.option("--repo", default=DEFAULT_REPO, show_default=True, help="Hub repository holding ckpt-0/.")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit.")
@click.option("--dir", "directory", default="checkpoints", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Destination: files land in DIR/ckpt-0/, the layout the original run.py and grokconv read.")
@click.option("--layers", help="Only these decoder layers, e.g. 0-1,63 (plus the embeddings and final norm).")
@click.option("--preset", default="grok-1", show_default=True, type=click.Choice(PRESETS),
              help="Config of the repository's checkpoint; it decides which file holds which layer.")
@click.option("--tokenizer-repo", default=DEFAULT_TOKENIZER_REPO, show_default=True,
              help="Hub repository to take tokenizer.model from (the hub's xai-org/grok-1 has none).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Copy this local tokenizer.model instead (e.g. the one in github.com/xai-org/grok-1).")
@click.option("--no-tokenizer", is_flag=True, help="Fetch no tokenizer.")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(1, 64), help="Parallel transfers.")
@click.option("--dry-run", is_flag=True, help="List the files and the total size; fetch and write nothing.")
@click.option("--no-progress", is_flag=True)
@json_option
def download(repo, revision, directory, layers, preset, tokenizer_repo, tokenizer_path, no_tokenizer, workers,
             dry_run, no_progress, as_json):
    """Fetch Grok-1's original weights from the Hugging Face hub, verified and resumable.

    Every file is checked against the hub's sha256 before it gets its final name; an interrupted
    run, started again with the same command, keeps finished files and resumes partial ones.
    HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are honoured.
    """
    cfg = load_preset(preset)
    try:
        wanted = None if layers is None else parse_layers(layers, cfg.num_layers)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--layers") from None

    def show_plan(result):
        if as_json:
            return
        plan = result.plan
        click.echo(f"source: {plan.repo}@{plan.revision} (commit {plan.commit[:12]}) from {plan.endpoint}")
        click.echo(f"plan: {len(plan.files)} files, {format_bytes(plan.total_bytes)} ({plan.total_bytes:,} bytes), "
                   f"{_layers_text(plan.layers)}; {len(result.present)} already present and verified")
        if plan.tokenizer:
            click.echo(f"tokenizer: {plan.tokenizer}")

    result = download_files(directory, cfg, repo=repo, revision=revision, layers=wanted,
                            tokenizer_repo=None if no_tokenizer else tokenizer_repo, tokenizer_path=tokenizer_path,
                            workers=workers, dry_run=dry_run, on_plan=show_plan,
                            progress=False if no_progress else None)
    plan = result.plan
    if as_json:
        present = set(result.present)
        emit({
            "command": "download", "dry_run": dry_run, "offline": result.offline, "repo": plan.repo,
            "revision": plan.revision, "commit": plan.commit, "endpoint": plan.endpoint, "layers": plan.layers,
            "directory": str(directory), "tokenizer": plan.tokenizer, "total_bytes": plan.total_bytes,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "present": f.path in present}
                      for f in plan.files],
            "fetched_files": result.fetched_files, "fetched_bytes": result.fetched_bytes,
            "seconds": round(result.seconds, 3), "retried": result.retried,
            "manifest": None if dry_run else str(directory / MANIFEST)}, True, None)
        return
    if dry_run:
        present = set(result.present)
        for f in plan.files:
            click.echo(f"  {f.path}  {f.size:,}" + ("  (present)" if f.path in present else ""))
        todo = [f for f in plan.files if f.path not in present]
        click.echo(f"to fetch: {len(todo)} files, {format_bytes(sum(f.size for f in todo))}; "
                   "dry run, nothing written")
        return
    if result.offline:
        click.echo("offline (HF_HUB_OFFLINE): files checked against the manifest of an earlier run, none fetched")
    for path in result.retried:
        click.echo(f"note: {path} failed its sha256 check once and was fetched again")
    click.echo(f"done: {len(plan.files)} files in {directory}: fetched {result.fetched_files} "
               f"({format_bytes(result.fetched_bytes)} in {result.seconds:.1f} s, {format_bytes(result.rate)}/s), "
               f"{len(result.present)} already present; every file matches the hub's sha256")
    if plan.tokenizer_path:
        click.echo(f"tokenizer: {plan.tokenizer}")
    click.echo(f"manifest: {directory / MANIFEST} (check again with `grokconv verify {directory}`)")


@click.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 64), help="Files hashed at once.")
@click.option("--no-progress", is_flag=True)
@json_option
def verify(directory, workers, no_progress, as_json):
    """Check a downloaded or converted directory.

    A grokconv download: every file's size and sha256 against DIR/.grokconv/manifest.json.
    A safetensors checkpoint: every shard of the index exists, its header parses and covers the
    file, and it holds the tensors the index assigns it.
    """
    report = verify_dir(directory, workers=workers, progress=False if no_progress else None)
    summary = f"{report.files} files, {format_bytes(report.bytes)}, against {report.kind} {report.source}"
    emit({"command": "verify", "directory": str(directory), "ok": not report.problems, "kind": report.kind,
          "source": report.source, "files": report.files, "bytes": report.bytes, "problems": report.problems},
         as_json, lambda: [click.echo(f"FAIL {p}") for p in report.problems])
    if report.problems:
        cls = DownloadError if report.kind == "manifest" else CheckpointFormatError
        first = report.problems[0]
        first = first if Path(first.split(": ")[0]).is_absolute() else f"{directory / first}"
        raise cls(f"{len(report.problems)} problem(s) in {directory} ({summary}); first: {first}",
                  hint="re-run `grokconv download` with the same options to replace bad files"
                  if report.kind == "manifest" else None)
    if not as_json:
        click.echo(f"ok: {summary}")


COMMANDS = [download, verify]
