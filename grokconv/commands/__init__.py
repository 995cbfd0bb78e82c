"""CLI commands, one module each (registered in grokconv/cli.py)."""
