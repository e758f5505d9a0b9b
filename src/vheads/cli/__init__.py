"""The `vheads` command line, built from one module per command group; shared helpers live in `common`."""

from __future__ import annotations

import typer

from vheads.cli import analysis, data, predict, report, run, store, sweep, train
from vheads.cli.common import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    help="Find and test the attention heads vision-language models use to look at images (visual heads).\n\n"
         "With no --model, every command uses the embedded demo LLaVA trained on ShapesQA; with no --dataset, "
         "held-out ShapesQA. Results go to a DuckDB store (vheads.duckdb in the current folder).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version() -> None:
    """Print the vheads version."""
    from vheads import __version__

    typer.echo(__version__)


run.register(app)
store.register(app)
train.register(app)
app.command()(version)
for group in (analysis, report, sweep, data, predict):
    group.register(app)

__all__ = ["app"]
