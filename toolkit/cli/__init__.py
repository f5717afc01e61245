"""The `toolkit` command: a thin Typer layer over the library."""
