"""The `vheads` command line."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Find and test the attention heads vision-language models use to look at images.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the vheads version."""
    from vheads import __version__

    typer.echo(__version__)
