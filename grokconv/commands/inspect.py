import json

import click

from ..inspect import format_report, inspect_checkpoint


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor (default: the first 40).")
def command(path, as_json, show_all):
    """List every tensor of a checkpoint (any format), its quantization, totals and problems.

    Reads headers only. Exits 1 when problems are found.
    """
    rep = inspect_checkpoint(path)
    click.echo(json.dumps(rep, indent=1) if as_json else format_report(rep, None if show_all else 40))
    if rep["problems"]:
        raise SystemExit(1)
