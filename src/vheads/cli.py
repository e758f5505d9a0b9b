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
from rich.text import Text
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException, UsageError

from vheads.output import FORMATS, ProgressView, check_format, console, emit, emit_many, err, frame_table, say


class OneLineErrors(TyperGroup):
    """The vheads command group: a mistyped option or a value out of an option's range is one `error:` line and
    exit code 2, like every other user error, instead of click's usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed: nothing else to say
                exc.show()
                sys.exit(exc.exit_code)
            command = f"{exc.ctx.command_path} --help" if exc.ctx is not None else "vheads --help"
            err.print(Text.assemble(("error:", "bold red"), " ", exc.format_message(), f" (see {command})"),
                      soft_wrap=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Find and test the attention heads vision-language models use to look at images (visual heads).\n\n"
         "With no --model, every command uses the embedded demo LLaVA trained on ShapesQA; with no --dataset, "
         "held-out ShapesQA. Results go to a DuckDB store (vheads.duckdb in the current folder).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: write the built-in ShapesQA set, list the loaders.", no_args_is_help=True)
app.add_typer(data_app, name="data")

STORE_HELP = "DuckDB results store."
MODEL_HELP = "Hub id or local folder of an image-text-to-text model (default: the embedded demo LLaVA)."
FORMAT_HELP = "table, csv or json."
LIMIT_HELP = ("At most this many questions, drawn with --seed (default: 1,000 for shapes, every question for the "
              "other datasets).")
MAX_PIXELS_HELP = ("Skip images with more pixels than this, read from the file header before decoding (0: no cap); "
                   "counted as 'image too large'.")

__all__ = ["FORMATS", "check_format", "console", "emit", "emit_many", "err", "fail", "frame_table", "say"]


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line (the message literally) and exit non-zero."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


def out_folder(path: Path, option: str = "--out") -> Path:
    """`path` when it is a folder or does not exist yet; ValueError naming the option when it is a file."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder; name a folder (it is created if missing)")
    return path


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
        err.print(Text(str(exc), style="yellow"), soft_wrap=True)
        raise typer.Exit(130) from None
    except (DataError, ModelError, StoreError, CaptureError, ValueError, FileNotFoundError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or type(exc).__name__}")


def setup_logging(verbose: bool) -> None:
    """Warnings (skipped samples, ...) as plain lines on stderr; info too with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_progress(view: ProgressView, label: str = "run") -> tuple[Callable[[int], None],
                                                                 Callable[[int, int, int], None]]:
    """`start(total)` and `update(done, total, correct)` of a run, shown on `view` with rate and accuracy."""
    began: dict[str, float] = {}

    def start(total: int) -> None:
        import time

        began["t"] = time.monotonic()
        view.update(label, 0, total, "")

    def update(done: int, total: int, correct: int) -> None:
        import time

        rate = done / max(time.monotonic() - began.get("t", time.monotonic()), 1e-9)
        view.update(label, done, total, f"{rate:.1f} samples/s, acc {correct / max(done, 1):.3f}")

    return start, update


RUN_FIELDS = {"ablate_heads": "ablate"}


def explicit_options(ctx: typer.Context, rename: dict[str, str] | None = None) -> tuple[str, ...]:
    """The options of this command given on the command line (not left at their defaults), as RunConfig fields."""
    rename = {**RUN_FIELDS, **(rename or {})}
    sources = {name: getattr(ctx.get_parameter_source(name), "name", None) for name in ctx.params}
    given = [name for name, source in sources.items() if source not in (None, "DEFAULT", "DEFAULT_MAP")]
    return tuple(sorted(rename.get(name, name) for name in given))


def parse_stages_option(text: str | None) -> tuple[int, int] | None:
    """`--stages A,B` as a pair (checked against the model's depth when it is known)."""
    from vheads.metrics import parse_stages

    return None if text is None else parse_stages(text)


def at_least(value: float | None, option: str, low: float) -> None:
    """ValueError naming the option when a number given for it is below `low`."""
    if value is not None and value < low:
        raise ValueError(f"{option} {value}: must be at least {low}")


@app.command()
def run(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    dataset: str = typer.Option("shapes", "--dataset", "-d", help="Dataset loader: shapes, pointqa, pope, mmbench, "
                                "seedbench, qbench, jsonl, hf (see `vheads data list`)."),
    data: str = typer.Option(None, "--data", help="The benchmark file or folder (default: none; not needed for "
                             "shapes)."),
    images: str = typer.Option(None, "--images", help="Folder that relative image paths start from (default: the "
                               "data file's folder); a relative path may not leave it, absolute paths are used as "
                               "given."),
    split: str = typer.Option(None, "--split", help="Split (default: the loader's; POPE: adversarial/popular/random; "
                              "shapes: test/train)."),
    question_type: str = typer.Option(None, "--question-type", help="PointQA / ShapesQA: general, obj or super "
                                      "(default: all types)."),
    prompt_style: str = typer.Option(None, "--prompt-style", help="Box prompt: visual (drawn), plain (text "
                                     "coordinates) or none (default: the loader's)."),
    limit: int = typer.Option(None, "--limit", "-n", help=LIMIT_HELP),
    max_pixels: int = typer.Option(50_000_000, "--max-pixels", min=0, help=MAX_PIXELS_HELP),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Samples per batch (halved on OOM)."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1, help="Answer length limit (greedy)."),
    readout: str = typer.Option("prompt", "--readout", help="Query rows measured: prompt (last prompt position), "
                                "first-generated, or generated (all generated tokens, averaged)."),
    ablate_heads: str = typer.Option(None, "--ablate", help="Heads to ablate (default: none): a LAYER.HEAD list "
                                     "(3.1,4.7) or a selector: top:K, late:K (rank the heads of --from), "
                                     "random:K[:seed], stage:early|mid|late."),
    from_run: str = typer.Option(None, "--from", help="Run whose head ranking top:K / late:K select from "
                                 "(default: none)."),
    ablation: str = typer.Option("zero", "--ablation", help="zero (output zeroed) or uniform (uniform weights)."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    name: str = typer.Option(None, "--name", help="Run name (default: model-dataset-split, numbered if taken)."),
    shard: str = typer.Option(None, "--shard", help="K/N: run the K-th of N contiguous shards into its own file "
                              "beside the store; fold them in with `vheads merge` (default: the whole dataset)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", "--device", help="auto (all GPUs via accelerate), cpu, cuda, cuda:N."),
    attn: str = typer.Option("sdpa", "--attn", help="Kernel the model runs: sdpa, eager, flash_attention_2."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run of that --name with its stored options, "
                                "skipping stored samples; an option given that differs from the run is refused."),
    seed: int = typer.Option(0, "--seed", help="Seed for --limit sampling."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    preset: str = typer.Option(None, "--preset", help="paper: the reference code's choices (readout "
                               "first-generated, max-new-tokens 128, its stage boundaries); options given win."),
    stages: str = typer.Option(None, "--stages", help="A,B: mid starts at layer A, late at layer B (default: "
                               "thirds); stored with the run for heads, selectors, compare and report."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines."),
) -> None:
    """Run a model over a dataset: answer (greedy), score, and store every sample's per-head figures."""
    setup_logging(verbose)
    from vheads.analysis.selectors import run_option_heads
    from vheads.models import check_device
    from vheads.pipeline import RunConfig, parse_shard
    from vheads.pipeline import run as run_pipeline

    with errors():
        check_device(device)
        bounds = parse_stages_option(stages)
        config = RunConfig(model=model, dataset=dataset, data=data, images=images, split=split,
                           question_type=question_type, prompt_style=prompt_style, limit=limit,
                           batch_size=batch_size, max_new_tokens=max_new_tokens,
                           readout=check_choice(readout, "readout"),
                           ablate=run_option_heads(ablate_heads, from_run, store, model, trust_remote_code, bounds),
                           ablation=check_choice(ablation, "ablation"), store=store,
                           name=name, shard=parse_shard(shard), dtype=dtype, device=device, attn=attn, resume=resume,
                           seed=seed, trust_remote_code=trust_remote_code, stages=bounds, preset=preset,
                           explicit=explicit_options(ctx),
                           tags={"ablate": ablate_heads, "from_run": from_run} if from_run else {},
                           max_pixels=max_pixels or None)
        with ProgressView() as view:
            start, update = run_progress(view)
            view.status(f"loading the model ({model or 'embedded demo'}) and the data ({dataset}) ...")
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
    from vheads.analysis.heads import head_table, no_readout_hint
    from vheads.store import Store

    acc = "n/a" if summary.accuracy is None else f"{summary.accuracy:.3f}"
    say(f"\nrun {summary.name}  samples {summary.samples}  accuracy {acc}  ({summary.seconds:.1f} s)")
    if summary.by_type:
        say("  by question type: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(summary.by_type.items())))
    if "pope" in summary.extra:
        pope = dict(summary.extra["pope"])
        counted, left_out = int(pope.pop("n")), int(pope.pop("left_out"))
        note = f", {left_out} left out (label neither yes nor no)" if left_out else ""
        figures = ", ".join(f"{k} {v:.3f}" for k, v in pope.items())
        say(f"  POPE over {counted} yes/no items{note}: {figures}")
    if summary.long_prompts:
        say(f"  {summary.long_prompts} prompt(s) longer than the model's {summary.max_positions} positions "
            "(processed; marked over_max_positions in samples.meta)")
    for note in summary.notes:
        say(f"  {note}")
    skipped = sum(summary.skipped.values())
    if skipped:
        say(f"  skipped {skipped}: " + ", ".join(f"{n} {why}" for why, n in summary.skipped.items())
            + " (--verbose lists every one)")
    with Store(summary.store, read_only=True) as store:
        table = head_table(store, summary.run_id)
    hint = no_readout_hint(table)
    if hint:
        say(f"  {hint}")
    print_heads(table.head(10), f"top-10 heads (K = {table.attrs['k']}, scored over {table.attrs['scored']} samples)")
    say(f"stored in {summary.store} as run {summary.name}")


HEAD_HEADERS = {"rank": "#", "layer": "layer", "head": "head", "score": "score", "mean_w": "W", "mean_c": "C",
                "pointing": "point", "mean_region_share": "region", "stage": "stage", "visual": "visual"}
HEAD_LEGEND = ("score: share of the scored samples with the head in the top K by W; W: mean visual weight; C: mean "
               "concentration; point: share of the samples whose most-attended image token lies on a target; "
               "region: mean share of the image attention on the asked-about box; —: undefined")


def print_heads(table: Any, title: str, fmt: str = "table") -> None:
    """A head ranking: short headers and a legend in a table, the full column names in CSV and JSON."""
    emit(table, fmt, title=title, headers=HEAD_HEADERS, legend=HEAD_LEGEND)


@app.command()
def runs(store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
         fmt: str = typer.Option("table", "--format", help=FORMAT_HELP)) -> None:
    """List the runs in the store."""
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        check_format(fmt)
        frame = db.runs()
        cols = [c for c in ("run_id", "name", "model", "dataset", "split", "readout", "ablation", "status",
                            "n_samples", "accuracy", "sweep") if c in frame.columns]
        frame = frame[cols].copy()
        if fmt == "table":
            frame = runs_table(frame)
        emit(frame, fmt, title=f"runs in {store}",
             legend="data: dataset/split; n: samples; acc: accuracy; —: none" if fmt == "table" else None)


def runs_table(frame: Any) -> Any:
    """The runs listing for an 80-column terminal: model folders by their last part, dataset and split together,
    the readout and sweep only when some run has one other than the default."""
    import pandas as pd

    table = pd.DataFrame({"id": frame["run_id"], "name": frame["name"],
                          "model": frame["model"].map(lambda m: Path(str(m)).name),
                          "data": [f"{d}/{s}" if s else str(d) for d, s in zip(frame["dataset"], frame["split"],
                                                                                   strict=True)]})
    if "readout" in frame and (frame["readout"] != "prompt").any():
        table["readout"] = frame["readout"]
    table["ablation"] = frame["ablation"].replace({"none": None})
    if table["ablation"].isna().all():
        table = table.drop(columns="ablation")
    table["status"] = frame["status"]
    table["n"] = frame["n_samples"]
    table["acc"] = frame["accuracy"]
    if "sweep" in frame and frame["sweep"].notna().any():
        table["sweep"] = frame["sweep"]
    return table


def existing_store(store: str) -> str:
    if not Path(store).exists():
        raise FileNotFoundError(f"store {store} does not exist; run `vheads run` first or pass --store")
    return store


@app.command()
def heads(
    run_name: str = typer.Option(None, "--run", "-r", help="Run name or id (default: the latest run)."),
    top: int = typer.Option(20, "--top", help="Show this many heads (0 = all)."),
    k: int = typer.Option(None, "--k", help="Top-K per sample for the head score (default: round(0.1 x heads))."),
    stages: str = typer.Option(None, "--stages", help="A,B: mid starts at layer A, late at layer B (default: the "
                               "run's --stages, else thirds)."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """Rank the heads of a run: score (share of the samples with the readout row that have the head in the top K
    by W; undefined when none has it), mean W, mean C, pointing (share of samples whose most-attended image token
    lies on a target), stage."""
    from vheads.analysis.heads import head_table, no_readout_hint
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        check_format(fmt)
        at_least(top, "--top", 0)
        name = run_name or latest_run(db)
        table = head_table(db, name, k=k, stages=parse_stages_option(stages))
        hint = no_readout_hint(table)
        if hint:
            say(f"note: {hint}", err)
        if top:
            table = table.head(top)
        print_heads(table, f"heads of {name} (K = {table.attrs['k']}, scored over {table.attrs['scored']} of "
                           f"{table.attrs['samples']} samples)", fmt)


def latest_run(db: Any) -> str:
    """The most recently started run of a store."""
    frame = db.runs()
    if not len(frame):
        raise ValueError("the store has no runs yet; run `vheads run` first")
    return str(frame.sort_values("run_id").iloc[-1]["name"])


@app.command()
def query(sql: str = typer.Argument(..., help="SQL over the tables runs, samples, head_stats."),
          store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
          fmt: str = typer.Option("table", "--format", help=FORMAT_HELP),
          csv: bool = typer.Option(False, "--csv", help="Same as --format csv.")) -> None:
    """Run SQL on the store, e.g. vheads query "SELECT layer, avg(visual_weight) FROM head_stats GROUP BY 1"."""
    from vheads.store import Store

    with errors():
        fmt = check_format("csv" if csv else fmt)
        if not _has_sql(sql):
            raise ValueError("no SQL given; e.g. vheads query \"SELECT name, accuracy FROM runs\"")
        with Store(existing_store(store), read_only=True) as db:
            emit(db.query(sql), fmt)


def _has_sql(sql: str) -> bool:
    """Whether `sql` holds anything but blanks, semicolons and comments."""
    import re

    text = re.sub(r"--[^\n]*|/\*.*?\*/", " ", sql, flags=re.S)
    return bool(text.replace(";", " ").strip())


@app.command()
def export(run_name: str = typer.Option(None, "--run", "-r", help="Run name or id (default: all runs)."),
           out: Path = typer.Option(..., "--out", "-o", help="Folder for the Parquet files."),
           store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
           force: bool = typer.Option(False, "--force", help="Overwrite Parquet files already in --out.")) -> None:
    """Export runs, samples and head figures to Parquet (existing files are kept unless --force)."""
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        for path in db.export(run_name, out_folder(out), overwrite=force):
            say(str(path))


@app.command()
def merge(files: list[Path] = typer.Argument(..., help="Shard stores written by `vheads run --shard K/N`."),
          into: Path = typer.Option(Path("vheads.duckdb"), "--into", help="The store to fold them into.")) -> None:
    """Fold shard stores into one store (idempotent: merging twice adds nothing)."""
    from vheads.store import merge as merge_stores

    with errors():
        say(str(merge_stores(files, into)))


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


@app.command("train-demo")
def train_demo(out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained model."),
               minutes: float = typer.Option(None, "--minutes", help="Train for this long (default: none; pass "
                                             "--minutes or --steps)."),
               steps: int = typer.Option(None, "--steps", help="Train for this many steps (default: none)."),
               seed: int = typer.Option(0, "--seed", help="Seed (same seed, same machine: same model)."),
               threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's "
                                           "own choice).")) -> None:
    """Train the small demo LLaVA on ShapesQA (what ships as the embedded default)."""
    import torch

    from vheads.models.train_demo import train_demo as train

    for value, option in ((minutes, "--minutes"), (steps, "--steps"), (threads, "--threads")):
        if value is not None and value <= 0:
            fail(f"{option} {value}: must be more than 0")
    if threads:
        torch.set_num_threads(threads)
    if minutes is None and steps is None:
        fail("pass --minutes or --steps")
    with errors():
        metrics = train(out_folder(out), steps=steps, minutes=minutes, seed=seed, log=lambda line: say(line, err))
        say(json.dumps(metrics, indent=2))


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
