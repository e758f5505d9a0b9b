"""`python -m vheads` runs the command line."""

from vheads.cli import app

app()
