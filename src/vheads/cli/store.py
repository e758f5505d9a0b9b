"""The store commands: `runs`, `heads`, `query`, `export` and `merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vheads.cli.common import (
    FORMAT_HELP,
    RUN_HELP,
    STORE_HELP,
    at_least,
    errors,
    existing_store,
    out_folder,
    parse_stages_option,
    print_heads,
)
from vheads.cli.output import check_format, emit, err, say


def runs(store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
         fmt: str = typer.Option("table", "--format", help=FORMAT_HELP)) -> None:
    """List the runs in the store (pruning runs with the share of the image's keys and values they keep; which
    key/value heads keep the image, per layer: `vheads query "SELECT name, tags.image_kv_heads FROM runs"`)."""
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        check_format(fmt)
        frame = db.runs()
        cols = [c for c in ("run_id", "name", "model", "dataset", "split", "readout", "ablation", "status",
                            "n_samples", "accuracy", "curve") if c in frame.columns]
        shares = frame["tags"].map(lambda t: t.get("image_kv_share") if isinstance(t, dict) else None)
        frame = frame[cols].copy()
        if shares.notna().any():
            frame["image_kv_share"] = shares.astype(float)
        if fmt == "table":
            frame = runs_table(frame)
        emit(frame, fmt, title=f"runs in {store}",
             legend="data: dataset/split; n: samples; acc: accuracy; image KV: share of the image's keys and values "
                    "a pruning run keeps (per layer in runs.tags.image_kv_heads); —: none" if fmt == "table" else None)


def runs_table(frame: Any) -> Any:
    """The runs listing for an 80-column terminal: model folders by their last part, dataset and split together,
    the readout and curve only when some run has one other than the default."""
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
    if "image_kv_share" in frame:
        table["image KV"] = frame["image_kv_share"]
    if "curve" in frame and frame["curve"].notna().any():
        table["curve"] = frame["curve"]
    return table


def heads(
    run_name: str = typer.Option(None, "--run", "-r", help=RUN_HELP + " Default: the latest run."),
    top: int = typer.Option(20, "--top", help="Show this many heads (0 = all)."),
    k: int = typer.Option(None, "--k", help="Top-K per sample for the head score (default: round(0.1 x heads))."),
    stages: str = typer.Option(None, "--stages", help="A,B: mid starts at layer A, late at layer B (default: the "
                               "run's --stages, else thirds)."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """Rank the heads of a run: score (share of the samples with the readout row that have the head in the top K
    by W; undefined when none has it), mean W, mean C, pointing (share of samples whose most-attended image token
    lies on a target), stage; and, where `vheads ablate --each` measured it, each head's ablation cost per mode."""
    from vheads.analysis.costs import with_mode_costs
    from vheads.analysis.ranking import head_table, no_readout_hint
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        check_format(fmt)
        at_least(top, "--top", 0)
        run = run_name or latest_run(db)
        name = db.run(run)["name"]
        table = with_mode_costs(head_table(db, run, k=k, stages=parse_stages_option(stages)), db, run)
        hint = no_readout_hint(table)
        if hint:
            say(f"note: {hint}", err)
        if top:
            table = table.head(top)
        print_heads(table, f"heads of {name} (K = {table.attrs['k']}, scored over {table.attrs['scored']} of "
                           f"{table.attrs['samples']} samples)", fmt)


def latest_run(db: Any) -> int:
    """The id of the most recently started run of a store (an id, so a name of digits cannot mislead)."""
    frame = db.runs()
    if not len(frame):
        raise ValueError("the store has no runs yet; run `vheads run` first")
    return int(frame["run_id"].max())


def query(sql: str = typer.Argument(..., help="SQL over the tables runs, samples, head_stats, groundings, "
                                     "comparisons."),
          store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
          fmt: str = typer.Option("table", "--format", help=FORMAT_HELP),
          csv: bool = typer.Option(False, "--csv", help="Same as --format csv.")) -> None:
    """Run SQL on the store, e.g. vheads query "SELECT layer, avg(visual_weight) FROM head_stats GROUP BY 1".

    Values print as stored: NULL is — / empty / null; inf, -inf and NaN are inf, -inf and nan (JSON strings);
    integers stay exact; JSON columns are nested JSON. A table too wide for the terminal goes on in further tables.
    """
    from vheads.store import Store

    with errors():
        fmt = check_format("csv" if csv else fmt)
        if not _has_sql(sql):
            raise ValueError("no SQL given; e.g. vheads query \"SELECT name, accuracy FROM runs\"")
        with Store(existing_store(store), read_only=True) as db:
            emit(db.query(sql, exact=True), fmt)


def _has_sql(sql: str) -> bool:
    """Whether `sql` holds anything but blanks, semicolons and comments."""
    import re

    text = re.sub(r"--[^\n]*|/\*.*?\*/", " ", sql, flags=re.S)
    return bool(text.replace(";", " ").strip())


def export(run_name: str = typer.Option(None, "--run", "-r", help=RUN_HELP + " Default: all runs."),
           out: Path = typer.Option(..., "--out", "-o", help="Folder for the Parquet files (with --scores: the CSV "
                                    "file)."),
           scores: str = typer.Option(None, "--scores", help="Write only this run's per-head visual scores, as a CSV "
                                      "file with the columns layer,head,score (one row per head of the attention "
                                      "layers, in layer and head order; empty score: undefined), the file "
                                      "head-budgeted KV methods such as SparseMM read."),
           by: str = typer.Option("score", "--by", help="With --scores, the figure written as score: score (the "
                                  "head score: share of samples with the head in the top K by W), mean_w, mean_c, "
                                  "mean_region_share or pointing."),
           store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
           force: bool = typer.Option(False, "--force", help="Overwrite files already in --out.")) -> None:
    """Export every table of the store (runs, samples, head figures, groundings, comparisons) to Parquet, one file
    per table (existing files are kept unless --force); or, with --scores RUN, one run's per-head visual scores as
    a layer,head,score CSV."""
    from vheads.store import Store

    with errors(), Store(existing_store(store), read_only=True) as db:
        if scores is not None:
            say(str(export_scores(db, scores, out, by, force)))
            return
        for path in db.export(run_name, out_folder(out), overwrite=force):
            say(str(path))


def export_scores(db: Any, run: str, out: Path, by: str = "score", force: bool = False) -> Path:
    """`vheads export --scores RUN --out FILE.csv`: the run's `score_table` written as CSV; the file is kept unless
    `force`."""
    from vheads.analysis.ranking import score_table

    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; with --scores name the CSV file to write")
    if out.exists() and not force:
        raise ValueError(f"--out {out} exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    table = score_table(db, run, by)
    table.to_csv(out, index=False, float_format="%.6g")
    return out


def merge(files: list[Path] = typer.Argument(..., help="Shard stores written by `vheads run --shard K/N`."),
          into: Path = typer.Option(Path("vheads.duckdb"), "--into", help="The store to fold them into.")) -> None:
    """Fold shard stores into one store, every table of them (idempotent: merging twice adds nothing; a failed merge
    changes nothing)."""
    from vheads.pipeline.config import differences
    from vheads.store import merge as merge_stores

    with errors():
        say(str(merge_stores(files, into, conflicts=differences)))


def register(app: typer.Typer) -> None:
    """Add the store commands to the vheads app."""
    for command in (runs, heads, query, export, merge):
        app.command()(command)
