"""The `vheads` command line: run a study, rank heads, ablate, compare, report, manage the store."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Find and test the attention heads vision-language models use to look at images (visual heads).\n\n"
         "With no --model, every command uses the embedded demo LLaVA trained on ShapesQA; with no --dataset, "
         "held-out ShapesQA. Results go to a DuckDB store (vheads.duckdb in the current folder).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: write the built-in ShapesQA set, list the loaders.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err = Console(stderr=True)

STORE_HELP = "DuckDB results store."
MODEL_HELP = "Hub id or local folder of an image-text-to-text model (default: the embedded demo LLaVA)."


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def errors() -> Iterator[None]:
    """Turn the documented user-facing errors into one line and exit code 2 (130 for an interrupt)."""
    from vheads.capture import CaptureError
    from vheads.data import DataError
    from vheads.models import ModelError
    from vheads.pipeline import Interrupted
    from vheads.store import StoreError

    try:
        yield
    except Interrupted as exc:
        err.print(f"[yellow]{exc}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except (DataError, ModelError, StoreError, CaptureError, ValueError, FileNotFoundError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def setup_logging(verbose: bool) -> None:
    """Warnings (skipped samples, ...) as plain lines on stderr; info too with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def frame_table(frame: Any, title: str | None = None, floats: str = "{:.3f}") -> Table:
    """A rich table of a pandas DataFrame."""
    table = Table(title=title, header_style="bold")
    for column in frame.columns:
        table.add_column(str(column), justify="right" if frame[column].dtype.kind in "iuf" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[floats.format(v) if isinstance(v, float) else str(v) for v in row])
    return table


def emit(frame: Any, fmt: str, title: str | None = None) -> None:
    """Print a DataFrame as a table, CSV or JSON records."""
    if fmt == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    elif fmt == "json":
        sys.stdout.write(frame.to_json(orient="records", indent=2) + "\n")
    elif fmt == "table":
        console.print(frame_table(frame, title))
    else:
        fail(f"unknown --format {fmt!r}; expected table, csv or json")


def progress_callbacks(label: str) -> tuple[Callable[[int], None], Callable[[int, int, int], None], Any]:
    """A rich progress bar with samples/s and running accuracy, as (start, update, bar)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.1f} samples/s"), TextColumn("acc {task.fields[acc]}"),
                   TimeElapsedColumn(), console=err, transient=False)
    state: dict[str, Any] = {}

    def start(total: int) -> None:
        state["task"] = bar.add_task(label, total=total, rate=0.0, acc="-")

    def update(done: int, total: int, correct: int) -> None:
        task = bar.tasks[state["task"]]
        elapsed = task.elapsed or 1e-9
        bar.update(state["task"], completed=done, rate=done / elapsed, acc=f"{correct / max(done, 1):.3f}")

    return start, update, bar


@app.command()
def run(
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    dataset: str = typer.Option("shapes", "--dataset", "-d", help="Dataset loader: shapes, pointqa, pope, mmbench, "
                                "seedbench, qbench, jsonl, hf (see `vheads data list`)."),
    data: str = typer.Option(None, "--data", help="The benchmark file or folder (not needed for shapes)."),
    images: str = typer.Option(None, "--images", help="Folder that image paths are relative to."),
    split: str = typer.Option(None, "--split", help="Split (POPE: adversarial/popular/random; shapes: test/train)."),
    question_type: str = typer.Option(None, "--question-type", help="PointQA / ShapesQA: general, obj or super."),
    prompt_style: str = typer.Option(None, "--prompt-style", help="Box prompt: visual (drawn), plain (text "
                                     "coordinates) or none."),
    limit: int = typer.Option(None, "--limit", "-n", help="At most this many questions (drawn with --seed)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Samples per batch (halved on OOM)."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1, help="Answer length limit (greedy)."),
    readout: str = typer.Option("prompt", "--readout", help="Query rows measured: prompt (last prompt position), "
                                "first-generated, or generated (all generated tokens, averaged)."),
    ablate_heads: str = typer.Option(None, "--ablate", help="Heads to ablate: a LAYER.HEAD list (3.1,4.7) or a "
                                     "selector: top:K, late:K (rank the heads of --from), random:K[:seed], "
                                     "stage:early|mid|late."),
    from_run: str = typer.Option(None, "--from", help="Run whose head ranking top:K / late:K select from."),
    ablation: str = typer.Option("zero", "--ablation", help="zero (output zeroed) or uniform (uniform weights)."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    name: str = typer.Option(None, "--name", help="Run name (default: model-dataset-split, numbered if taken)."),
    shard: str = typer.Option(None, "--shard", help="K/N: run the K-th of N contiguous shards into its own file "
                              "beside the store; fold them in with `vheads merge`."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", "--device", help="auto (all GPUs via accelerate), cpu, cuda, cuda:N."),
    attn: str = typer.Option("sdpa", "--attn", help="Kernel the model runs: sdpa, eager, flash_attention_2."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run of that --name, skipping stored samples."),
    seed: int = typer.Option(0, "--seed", help="Seed for --limit sampling."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines."),
) -> None:
    """Run a model over a dataset: answer (greedy), score, and store every sample's per-head figures."""
    setup_logging(verbose)
    from vheads.analysis.selectors import run_option_heads
    from vheads.pipeline import RunConfig, parse_shard
    from vheads.pipeline import run as run_pipeline

    with errors():
        config = RunConfig(model=model, dataset=dataset, data=data, images=images, split=split,
                           question_type=question_type, prompt_style=prompt_style, limit=limit,
                           batch_size=batch_size, max_new_tokens=max_new_tokens,
                           readout=check_choice(readout, "readout"),
                           ablate=run_option_heads(ablate_heads, from_run, store, model, trust_remote_code),
                           ablation=check_choice(ablation, "ablation"), store=store,
                           name=name, shard=parse_shard(shard), dtype=dtype, device=device, attn=attn, resume=resume,
                           seed=seed, trust_remote_code=trust_remote_code,
                           tags={"ablate": ablate_heads, "from_run": from_run} if from_run else {})
        start, update, bar = progress_callbacks("run")
        with bar:
            summary = run_pipeline(config, progress=update, start=start)
        print_summary(summary)


def check_choice(value: str, what: str) -> str:
    from vheads.capture import ABLATION_MODES, READOUTS

    allowed = {"readout": READOUTS, "ablation": ABLATION_MODES}[what]
    if value not in allowed:
        raise ValueError(f"unknown --{what} {value!r}; expected one of {', '.join(allowed)}")
    return value


def print_summary(summary: Any) -> None:
    """The end-of-run summary: accuracy per question type, skipped samples, top-10 heads, where it is stored."""
    from vheads.analysis.heads import head_table
    from vheads.store import Store

    acc = "n/a" if summary.accuracy is None else f"{summary.accuracy:.3f}"
    console.print(f"\n[bold]run[/] {summary.name}  samples {summary.samples}  accuracy {acc}  "
                  f"({summary.seconds:.1f} s)", highlight=False)
    if summary.by_type:
        console.print("  by question type: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(summary.by_type.items())))
    if "pope" in summary.extra:
        console.print("  POPE: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.extra["pope"].items()))
    for note in summary.notes:
        console.print(f"  {note}", style="yellow", markup=False, highlight=False)
    skipped = sum(summary.skipped.values())
    if skipped:
        console.print(f"  skipped {skipped}: " + ", ".join(f"{n} {why}" for why, n in summary.skipped.items()))
    with Store(summary.store, read_only=True) as store:
        table = head_table(store, summary.run_id).head(10)
    console.print(frame_table(table, title=f"top-10 heads (K = {table.attrs['k']})"))
    console.print(f"stored in {summary.store} as run [bold]{summary.name}[/]", highlight=False)


@app.command()
def runs(store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
         fmt: str = typer.Option("table", "--format", help="table, csv or json.")) -> None:
    """List the runs in the store."""
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        frame = db.runs()
        cols = [c for c in ("run_id", "name", "model", "dataset", "split", "readout", "ablation", "status",
                            "n_samples", "accuracy", "sweep") if c in frame.columns]
        frame = frame[cols].copy()
        if fmt == "table" and "model" in frame:
            frame["model"] = frame["model"].map(lambda m: Path(str(m)).name)
        emit(frame, fmt, title=f"runs in {store}")


def existing_store(store: str) -> str:
    if not Path(store).exists():
        raise FileNotFoundError(f"store {store} does not exist; run `vheads run` first or pass --store")
    return store


@app.command()
def heads(
    run_name: str = typer.Option(None, "--run", "-r", help="Run name or id (default: the latest run)."),
    top: int = typer.Option(20, "--top", help="Show this many heads (0 = all)."),
    k: int = typer.Option(None, "--k", help="Top-K per sample for the head score (default round(0.1 x heads))."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
) -> None:
    """Rank the heads of a run: score (share of samples with the head in the top K by W), mean W, mean C, stage."""
    from vheads.analysis.heads import head_table
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        name = run_name or latest_run(db)
        table = head_table(db, name, k=k)
        if top:
            table = table.head(top)
        emit(table, fmt, title=f"heads of {name} (K = {table.attrs['k']}, {table.attrs['samples']} samples)")


def latest_run(db: Any) -> str:
    """The most recently started run of a store."""
    frame = db.runs()
    if not len(frame):
        raise ValueError("the store has no runs yet; run `vheads run` first")
    return str(frame.sort_values("run_id").iloc[-1]["name"])


@app.command()
def query(sql: str = typer.Argument(..., help="SQL over the tables runs, samples, head_stats."),
          store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
          csv: bool = typer.Option(False, "--csv", help="CSV instead of a table.")) -> None:
    """Run SQL on the store, e.g. vheads query "SELECT layer, avg(visual_weight) FROM head_stats GROUP BY 1"."""
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        emit(db.query(sql), "csv" if csv else "table")


@app.command()
def export(run_name: str = typer.Option(None, "--run", "-r", help="Run name or id (default: all runs)."),
           out: Path = typer.Option(..., "--out", "-o", help="Folder for the Parquet files."),
           store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP)) -> None:
    """Export runs, samples and head figures to Parquet."""
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        for path in db.export(run_name, out):
            console.print(str(path), highlight=False)


@app.command()
def merge(files: list[Path] = typer.Argument(..., help="Shard stores written by `vheads run --shard K/N`."),
          into: Path = typer.Option(Path("vheads.duckdb"), "--into", help="The store to fold them into.")) -> None:
    """Fold shard stores into one store (idempotent: merging twice adds nothing)."""
    from vheads.store import merge as merge_stores

    with errors():
        console.print(str(merge_stores(files, into)), highlight=False)


@data_app.command("shapes")
def data_shapes(n: int = typer.Option(500, "--n", min=1, help="Questions to write."),
                seed: int = typer.Option(0, "--seed", help="Generator seed."),
                split: str = typer.Option("test", "--split", help="test (held out) or train."),
                out: Path = typer.Option(..., "--out", "-o", help="Output folder (shapes.json + PNGs).")) -> None:
    """Write ShapesQA in the PointQA (ViP-LLaVA JSON) format; read it back with --dataset pointqa."""
    from vheads.data import write_shapes

    with errors():
        path = write_shapes(out, n=n, seed=seed, split=split)
        console.print(f"wrote {n} questions to {path}", highlight=False)


@data_app.command("list")
def data_list() -> None:
    """List the dataset loaders and what each reads."""
    from vheads.data import describe_dataset, list_datasets

    table = Table("dataset", "reads", header_style="bold")
    for name in list_datasets():
        table.add_row(name, describe_dataset(name))
    console.print(table)


@app.command("train-demo")
def train_demo(out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained model."),
               minutes: float = typer.Option(None, "--minutes", help="Train for this long."),
               steps: int = typer.Option(None, "--steps", help="Train for this many steps."),
               seed: int = typer.Option(0, "--seed", help="Seed (same seed, same machine: same model)."),
               threads: int = typer.Option(None, "--threads", help="CPU threads for torch.")) -> None:
    """Train the small demo LLaVA on ShapesQA (what ships as the embedded default)."""
    import torch

    from vheads.models.train_demo import train_demo as train

    if threads:
        torch.set_num_threads(threads)
    if minutes is None and steps is None:
        fail("pass --minutes or --steps")
    with errors():
        metrics = train(out, steps=steps, minutes=minutes, seed=seed, log=lambda line: err.print(line))
        console.print(json.dumps(metrics, indent=2), highlight=False)


@app.command()
def version() -> None:
    """Print the vheads version."""
    from vheads import __version__

    typer.echo(__version__)


from vheads.analysis.commands import register as _register_analysis  # noqa: E402

_register_analysis(app)
from vheads.report.commands import register as _register_report  # noqa: E402

_register_report(app)
from vheads.sweep_commands import register as _register_sweep  # noqa: E402

_register_sweep(app)
