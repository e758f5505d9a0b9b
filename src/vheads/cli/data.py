"""`vheads data`: write the built-in ShapesQA set, list the dataset loaders."""

from __future__ import annotations

from pathlib import Path

import typer

from vheads.cli.common import FORMAT_HELP, at_least, errors, out_folder
from vheads.cli.output import check_format, emit, say

data_app = typer.Typer(help="Datasets: write the built-in ShapesQA set, list the loaders.", no_args_is_help=True)


@data_app.command("shapes")
def data_shapes(n: int = typer.Option(500, "--n", min=1, help="Questions to write."),
                seed: int = typer.Option(0, "--seed", help="Generator seed."),
                split: str = typer.Option("test", "--split", help="test (held out) or train."),
                out: Path = typer.Option(..., "--out", "-o", help="Output folder (shapes.json + PNGs).")) -> None:
    """Write ShapesQA in the PointQA (ViP-LLaVA JSON) format; read it back with --dataset pointqa."""
    from vheads.data import write_shapes

    with errors():
        at_least(seed, "--seed", 0)
        path = write_shapes(out_folder(out), n=n, seed=seed, split=split)
        say(f"wrote {n} questions to {path}")


@data_app.command("list")
def data_list(fmt: str = typer.Option("table", "--format", help=FORMAT_HELP)) -> None:
    """List the dataset loaders and what each reads."""
    import pandas as pd

    from vheads.data import describe_dataset, list_datasets

    with errors():
        frame = pd.DataFrame({"dataset": list_datasets(), "reads": [describe_dataset(n) for n in list_datasets()]})
        emit(frame, check_format(fmt))


def register(app: typer.Typer) -> None:
    """Add the `data` group to the vheads app."""
    app.add_typer(data_app, name="data")
