"""The ``grokconv`` command line. Each command lives in ``grokconv/commands/``; errors become one line."""
from __future__ import annotations

import errno
import importlib
import sys

import click

from .errors import GrokconvError

# Command modules, each exposing a click command named ``command``.
COMMANDS = ["synth", "inspect", "convert", "parity", "download", "megatron", "gguf"]


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GrokconvError as e:
            click.echo(f"error: {e}", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            sys.exit(2)
        except OSError as e:            # the file system said no (not found, permission, full, ...): one line
            click.echo(f"error: {e}", err=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                click.echo("hint: free space and re-run the same command: it resumes", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="grokconv")
def main():
    """Convert, quantize, verify and fetch xAI Grok-1 weights, streaming and exact."""


for _name in COMMANDS:
    try:
        _mod = importlib.import_module(f"grokconv.commands.{_name}")
    except ModuleNotFoundError as _e:  # a command not built yet
        if _e.name != f"grokconv.commands.{_name}":
            raise
        continue
    for _cmd in getattr(_mod, "COMMANDS", [getattr(_mod, "command", None)]):
        if _cmd is not None:
            main.add_command(_cmd)

if __name__ == "__main__":
    main()
