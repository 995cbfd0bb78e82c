"""One convention for every command's report: text for people by default; with ``--json``, one JSON
object on stdout and nothing else there (progress bars and errors go to stderr, errors as one
``error: ...`` line with a non-zero exit, as always)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

__all__ = ["json_option", "overwrite_option", "emit", "summary_dict"]

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print a machine-readable summary (one JSON object) on stdout instead of text.")

overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="Replace an output that another source or other options made (without it, such an output is an error; "
         "an unfinished output of this same command is resumed either way).")


def _plain(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {k: _plain(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and v != v:
        return None
    return v


def emit(obj: dict, as_json: bool, text) -> None:
    """``obj`` as JSON when ``as_json``; else call ``text()`` (which echoes the human summary)."""
    if as_json:
        click.echo(json.dumps(_plain(obj), indent=1, sort_keys=False))
    else:
        text()


def summary_dict(command: str, s, **extra) -> dict:
    """A conversion :class:`grokconv.convert.Summary` as a plain dict."""
    return {"command": command, **extra, "tensors": s.tensors, "files_written": s.shards_written,
            "files_skipped": s.shards_skipped, "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
            "seconds": round(s.seconds, 3), "peak_rss_bytes": s.peak_rss, "phases": s.phases,
            "errors": s.errors}
