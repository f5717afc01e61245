"""The `toolkit` command: a thin Typer layer over the library, one module per command group."""

from toolkit.cli.app import main

__all__ = ["main"]
