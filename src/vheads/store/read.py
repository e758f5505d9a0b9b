"""Reading a store: runs by name or id, a run's samples and head figures, any SQL, and Parquet export."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from vheads.store.schema import GROUNDING_FIELDS, JSON_RUN_COLUMNS, StoreError, first_line, loads, sql_str


def run_id(con: duckdb.DuckDBPyConnection, ref: str | int, path: Path) -> int:
    """The run_id of a run name or id; unknown -> StoreError listing the known names."""
    if isinstance(ref, str):
        row = con.execute("SELECT run_id FROM runs WHERE name = ?", [ref]).fetchone()
        if row is None and ref.isdigit():
            ref = int(ref)
    else:
        row = None
    if row is None and isinstance(ref, int):
        row = con.execute("SELECT run_id FROM runs WHERE run_id = ?", [ref]).fetchone()
    if row is None:
        names = [r[0] for r in con.execute("SELECT name FROM runs ORDER BY run_id").fetchall()]
        known = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        raise StoreError(f"unknown run {ref!r} in {path}; known runs: {known or 'none yet'}")
    return row[0]


def run_row(con: duckdb.DuckDBPyConnection, name: str) -> dict[str, Any] | None:
    """The runs row named `name` with its JSON columns decoded, or None."""
    row = con.execute("SELECT run_id FROM runs WHERE name = ?", [name]).fetchone()
    return None if row is None else run_row_by_id(con, row[0])


def run_row_by_id(con: duckdb.DuckDBPyConnection, run_id: int) -> dict[str, Any]:
    return decode_run(records(con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id]))[0])


def records(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The rows of an executed query as dicts."""
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def decode_run(row: dict[str, Any]) -> dict[str, Any]:
    for column in JSON_RUN_COLUMNS:
        row[column] = loads(row[column])
    return row


def runs(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Every run, oldest first, with config / skipped / tags decoded from JSON."""
    frame = con.execute("SELECT * EXCLUDE (writer_pid) FROM runs ORDER BY run_id").df()
    for column in JSON_RUN_COLUMNS:
        frame[column] = frame[column].map(loads)
    return frame


def samples(con: duckdb.DuckDBPyConnection, run_id: int) -> pd.DataFrame:
    """A run's samples (prediction, answer, correct, token counts), ordered by sample id."""
    frame = con.execute("SELECT * FROM samples WHERE run_id = ? ORDER BY sample_id", [run_id]).df()
    frame["meta"] = frame["meta"].map(loads)
    return frame


def head_stats(con: duckdb.DuckDBPyConnection, run_id: int) -> pd.DataFrame:
    """A run's per-sample, per-head figures (layers x heads rows per sample); NULL reads as NaN."""
    return con.execute(
        "SELECT * FROM head_stats WHERE run_id = ? ORDER BY sample_id, layer, head", [run_id]
    ).df()


def head_means(con: duckdb.DuckDBPyConnection, run_id: int) -> pd.DataFrame:
    """Per (layer, head) means over a run's samples; NULLs (undefined C, no box) are left out of each mean."""
    return con.execute(
        """SELECT layer, head,
                  avg(visual_weight) AS visual_weight,
                  avg(concentration) AS concentration,
                  avg(region_weight) AS region_weight,
                  avg(region_weight / nullif(visual_weight, 0)) AS region_share,
                  avg(text_weight) AS text_weight,
                  avg(sink_weight) AS sink_weight,
                  avg(pointing) AS pointing,
                  count(*) AS n,
                  count(concentration) AS n_concentration
           FROM head_stats WHERE run_id = ? GROUP BY layer, head ORDER BY layer, head""",
        [run_id],
    ).df()


def query(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
    """Run any SQL on the store (what `vheads query` does); a DuckDB error becomes a one-line StoreError."""
    try:
        result = con.execute(sql, params)
        return result.df() if result.description else pd.DataFrame()
    except duckdb.Error as error:
        raise StoreError(f"query failed: {first_line(error)}") from error


def export(con: duckdb.DuckDBPyConnection, run_id: int | None, out_dir: Path, overwrite: bool) -> list[Path]:
    """Write the runs row(s), samples and head_stats of one run (None: all runs) as Parquet files.

    Raises StoreError naming the files already there unless `overwrite`.
    """
    if run_id is None:
        where, prefix = "", ""
    else:
        name = run_row_by_id(con, run_id)["name"]
        where, prefix = f" WHERE run_id = {run_id}", re.sub(r"[^A-Za-z0-9._-]+", "_", name) + "."
    queries = {
        "runs": f"SELECT * EXCLUDE (writer_pid) FROM runs{where} ORDER BY run_id",
        "samples": f"SELECT * FROM samples{where} ORDER BY run_id, sample_id",
        "head_stats": f"SELECT * FROM head_stats{where} ORDER BY run_id, sample_id, layer, head",
    }
    targets = {table: out_dir / f"{prefix}{table}.parquet" for table in queries}
    taken = [str(path) for path in targets.values() if path.exists()]
    if taken and not overwrite:
        raise StoreError(f"{', '.join(taken)} already exist(s); pass --force to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table, sql in queries.items():
        target = targets[table]
        try:
            con.execute(f"COPY ({sql}) TO {sql_str(target)} (FORMAT parquet, COMPRESSION zstd)")
        except duckdb.Error as error:
            raise StoreError(f"cannot write {target}: {first_line(error)}") from error
        written.append(target)
    return written


def groundings(con: duckdb.DuckDBPyConnection, run_id: int) -> pd.DataFrame:
    """The boxes `write.add_groundings` kept for a run, newest selector first; heads and targets decoded (none
    in a store written before grounding existed; source '' where a store written before it was kept)."""
    if not con.execute("SELECT 1 FROM duckdb_tables() WHERE table_name = 'groundings' "
                       "AND database_name = current_database()").fetchall():
        return pd.DataFrame(columns=["run_id", "source", "selector", "heads", "sample_id", *GROUNDING_FIELDS,
                                     "created"])
    frame = con.execute("SELECT * FROM groundings WHERE run_id = ? "
                        "ORDER BY created DESC, selector, sample_id", [run_id]).df()
    if "source" not in frame:
        frame.insert(1, "source", "")
    for column in ("heads", "targets"):
        frame[column] = frame[column].map(loads)
    return frame
