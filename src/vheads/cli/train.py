"""`vheads train-demo`: train the small demo LLaVA that ships as the default model."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vheads.cli.common import errors, fail, out_folder
from vheads.cli.output import err, say


def train_demo(out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained model."),
               minutes: float = typer.Option(None, "--minutes", help="Train for this long (default: none; pass "
                                             "--minutes or --steps)."),
               steps: int = typer.Option(None, "--steps", help="Train for this many steps (default: none)."),
               seed: int = typer.Option(0, "--seed", help="Seed (same seed, same machine: same model)."),
               head_dropout: float = typer.Option(0.0, "--head-dropout", help="Chance that an attention head "
                                                  "is zeroed for a training sample (0: off)."),
               threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's "
                                           "own choice).")) -> None:
    """Train the small demo LLaVA on ShapesQA (what ships as the embedded default)."""
    import torch

    from vheads.demo.train import train_demo as train

    for value, option in ((minutes, "--minutes"), (steps, "--steps"), (threads, "--threads")):
        if value is not None and value <= 0:
            fail(f"{option} {value}: must be more than 0")
    if threads:
        torch.set_num_threads(threads)
    if minutes is None and steps is None:
        fail("pass --minutes or --steps")
    if not 0 <= head_dropout < 1:
        fail(f"--head-dropout {head_dropout}: must be at least 0 and less than 1")
    with errors():
        metrics = train(out_folder(out), steps=steps, minutes=minutes, seed=seed,
                        head_dropout=head_dropout, log=lambda line: say(line, err))
        say(json.dumps(metrics, indent=2))


def register(app: typer.Typer) -> None:
    """Add `train-demo` to the vheads app."""
    app.command("train-demo")(train_demo)
