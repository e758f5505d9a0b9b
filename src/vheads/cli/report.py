"""The report commands: `report` (HTML page and PNGs) and `demo` (the whole study in one command)."""

from __future__ import annotations

from pathlib import Path

import typer

from vheads.cli.analysis import curve_table
from vheads.cli.common import (
    RUN_HELP,
    STORE_HELP,
    errors,
    existing_store,
    out_folder,
    parse_stages_option,
    print_heads,
    setup_logging,
)
from vheads.cli.output import ProgressView, console, err, frame_table, say


def report(
    runs: list[str] = typer.Option(None, "--run", "-r", help=RUN_HELP + " Repeat for several (default: "
                                   "every finished run that is not a curve point, with its curves)."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    out: Path = typer.Option(Path("vheads-report"), "--out", "-o", help="Folder for index.html and the PNGs."),
    overlays: int = typer.Option(3, "--overlays", min=0, help="Correct and wrong samples drawn per run with the top "
                                 "heads' attention (re-runs the run's model on them; 0 = none)."),
    device: str = typer.Option("auto", "--device", help="Where the overlays re-run the model: auto, cpu, cuda."),
    stages: str = typer.Option(None, "--stages", help="A,B: stage boundaries for every run (default: each run's "
                               "own --stages, else thirds)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines."),
) -> None:
    """Write a self-contained HTML report (index.html, opens offline) and a PNG per figure."""
    setup_logging(verbose)
    from vheads.models import check_device
    from vheads.report.build import build_report

    with errors():
        check_device(device)
        with ProgressView() as view:
            index = build_report(existing_store(store), out_folder(out), runs=runs or None, overlays=overlays,
                                 device=device, stages=parse_stages_option(stages),
                                 progress=lambda done, total, what: view.update("report", done, total, what,
                                                                                unit="steps"))
    say(str(index))


def demo(
    out: Path = typer.Option(Path("vheads-demo"), "--out", "-o", help="Folder for the report (and the store)."),
    store: Path = typer.Option(None, "--store", help="Store to write (default: a fresh vheads-demo.duckdb in --out, "
                               "replaced on every demo)."),
    limit: int = typer.Option(300, "--limit", "-n", min=1, help="Held-out ShapesQA questions to rank heads on."),
    curve_limit: int = typer.Option(None, "--curve-limit", "--sweep-limit", min=1,
                                    help="Questions each point of the pruning curve is run on (default: the same "
                                    "questions as --limit; --sweep-limit is its old name)."),
    model: str = typer.Option(None, "--model", "-m", help="Model folder or hub id (default: the embedded demo LLaVA)."),
    threads: int = typer.Option(1, "--threads", min=0, help="CPU threads for torch (0: torch's default). One is "
                                "fastest for the small demo model, above all on a busy machine."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines."),
) -> None:
    """The whole study in one command: run, rank heads, ablate top vs random vs late heads, keep the image only for
    the top or random heads beside FastV, write the report."""
    setup_logging(verbose)
    import torch

    from vheads.demo.study import DemoSettings, run_demo

    if threads:
        torch.set_num_threads(threads)
    settings = DemoSettings(out=out, store=store, limit=limit, curve_limit=curve_limit, model=model)

    def show(ranking: object) -> None:
        print_heads(ranking.head(10), f"top-10 heads (K = {ranking.attrs['k']})")

    with errors():
        out_folder(out)
        result = run_demo(settings, say=lambda line: say(line, err), on_ranking=show)
    console.print(frame_table(curve_table(result.points), title="pruning curve (zero ablation)"))
    if result.pruning:
        console.print(frame_table(curve_table(result.pruning), title="efficiency frontier (keep-only image-blind, "
                                  "FastV)"))
    timing = ", ".join(f"{step} {value:.0f} s" for step, value in result.seconds.items())
    say(f"store {result.store}; {timing}", err)
    say(str(result.index))


def register(app: typer.Typer) -> None:
    """Add `report` and `demo` to the vheads app."""
    app.command()(report)
    app.command()(demo)
