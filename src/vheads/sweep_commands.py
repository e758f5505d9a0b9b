"""The `vheads sweep` command: many models x datasets (x shards) on Ray, or in-process, merged into one store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vheads.cli import FORMAT_HELP, LIMIT_HELP, STORE_HELP, check_choice, errors, fail, setup_logging
from vheads.output import console, emit, err, frame_table, say

if TYPE_CHECKING:
    from vheads.sweep import SweepResult


def sweep(
    models: str = typer.Option("demo", "--models", "-m", help="Comma list of hub ids or model folders (demo: the "
                               "embedded demo LLaVA). Distinct folder names: they name the runs."),
    datasets: str = typer.Option("shapes", "--datasets", "-d", help="Comma list of datasets, NAME or NAME:PATH "
                                 "(e.g. shapes,pope:/data/pope.jsonl)."),
    shards: int = typer.Option(1, "--shards", min=1, help="Cut each dataset into N shards, one task each."),
    split: str = typer.Option(None, "--split", help="Split of every dataset (default: each loader's)."),
    limit: int = typer.Option(None, "--limit", "-n", help="Per dataset: " + LIMIT_HELP),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Samples per batch (halved on OOM)."),
    readout: str = typer.Option("prompt", "--readout", help="prompt, first-generated or generated."),
    store: Path = typer.Option(Path("vheads.duckdb"), "--store", help=STORE_HELP + " Every run is merged into it."),
    workdir: Path = typer.Option(None, "--workdir", help="Folder for the task files (default: the store's); "
                                 "on a multi-machine cluster a shared filesystem every node reaches."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (auto, ray://HOST:10001); default: "
                                "start a local Ray."),
    gpus_per_task: float = typer.Option(None, "--gpus-per-task", min=0, help="GPUs per task (default: 1 when the "
                                        "cluster has GPUs, else 0; 0.5 packs two tasks per GPU)."),
    cpus_per_task: float = typer.Option(1, "--cpus-per-task", min=0.1, help="CPUs per task."),
    no_ray: bool = typer.Option(False, "--no-ray", help="Run the tasks one after another in this process."),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP + " The task rows, errors included."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines."),
) -> None:
    """Run every model on every dataset (one task per shard) on Ray, and merge all runs into the store.

    Re-running the same command continues: finished tasks are kept, unfinished ones resume.
    """
    setup_logging(verbose)
    if fmt not in ("table", "csv", "json"):
        fail(f"unknown --format {fmt!r}; expected table, csv or json")
    from vheads.pipeline import RunConfig, check_config
    from vheads.sweep import SweepError, plan, run_sweep

    with errors():
        base = RunConfig(split=split, limit=limit, batch_size=batch_size, readout=check_choice(readout, "readout"),
                         store=str(store))
        check_config(base)
        configs = plan(_items(models), _items(datasets), shards, base, workdir=workdir)
        say(f"{len(configs)} task(s) " + ("in this process" if no_ray else f"on Ray ({address or 'local'})"), err)
        try:
            result = run_sweep(configs, into=store, address=address, gpus_per_task=gpus_per_task,
                               cpus_per_task=cpus_per_task, local=no_ray)
        except SweepError as exc:
            fail(str(exc))
    if fmt == "table":
        _print_table(result)
    else:
        emit(result.tasks, fmt)
    if not result.ok:
        failed = int((result.tasks["status"] != "done").sum())
        err.print(f"[yellow]{failed} of {len(result.tasks)} task(s) did not finish (reasons above); run the same "
                  "command again to retry them[/]", highlight=False)
        raise typer.Exit(1)


def _print_table(result: SweepResult) -> None:
    """The tasks as a narrow table (failures' reasons were logged as they came), then what each merge added."""
    import pandas as pd

    tasks = result.tasks
    shown = tasks[["run", "shard", "status", "samples"]].assign(
        accuracy=[f"{a:.3f}" if pd.notna(a) else "" for a in tasks["accuracy"]],
        seconds=[f"{s:.1f}" for s in tasks["seconds"]])
    console.print(frame_table(shown, title="sweep"))
    for merged in result.merges:
        if merged.status:
            say(str(merged))


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def register(app: typer.Typer) -> None:
    """Add `sweep` to the command line."""
    app.command()(sweep)
