"""Reading a store: runs by name or id, a run's samples and head figures, any SQL, and Parquet export."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from vheads import figures
from vheads.store.schema import (
    GROUNDING_FIELDS,
    JSON_RUN_COLUMNS,
    ROW_KEYS,
    RUN_LISTS,
    StoreError,
    column_names,
    first_line,
    loads,
    quote,
    renamed,
    renames,
    sql_str,
    table_names,
)


def run_id(con: duckdb.DuckDBPyConnection, ref: str | int, path: Path) -> int:
    """The run_id of a run reference: a run's name, its id (an int or digits), or `name:TEXT` / `id:N`, each read
    one way only. Digits that name one run and number another -> StoreError naming both; unknown -> StoreError
    listing the known names."""
    text = str(ref)
    name: str | None = None if isinstance(ref, int) else text
    number = ref if isinstance(ref, int) else None
    if isinstance(ref, str):
        if text.startswith("name:"):
            name = text[len("name:"):]
        elif re.fullmatch(r"id:[0-9]+", text):
            name, number = None, int(text[len("id:"):])
        elif re.fullmatch(r"[0-9]+", text):
            number = int(text)
    named = con.execute("SELECT run_id FROM runs WHERE name = ?", [name]).fetchone() if name is not None else None
    numbered = (con.execute("SELECT run_id, name FROM runs WHERE run_id = ?", [number]).fetchone()
                if number is not None else None)
    if named and numbered and named[0] != numbered[0]:
        raise StoreError(f"run {text!r} is ambiguous in {path}: it names run id {named[0]} and is the id of the run "
                         f"named {numbered[1]!r}; write name:{text} or id:{text}")
    if named or numbered:
        return (named or numbered)[0]
    names = [r[0] for r in con.execute("SELECT name FROM runs ORDER BY run_id").fetchall()]
    known = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    raise StoreError(f"unknown run {text!r} in {path}; known runs: {known or 'none yet'}")


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
    """A runs row with its JSON columns decoded and renamed columns under their current names."""
    row = renamed("runs", row)
    for column in JSON_RUN_COLUMNS:
        row[column] = loads(row[column])
    return row


def runs(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Every run, oldest first, with config / skipped / tags decoded from JSON."""
    frame = con.execute("SELECT * EXCLUDE (writer_pid) FROM runs ORDER BY run_id").df()
    frame = frame.rename(columns=renames("runs"))
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


def head_means(con: duckdb.DuckDBPyConnection, run_id: int, where: str | None = None) -> pd.DataFrame:
    """Per (layer, head): every figure of `vheads.figures` reduced over a run's samples (its `reduce`, NULLs such as
    undefined C or no box left out), n (samples) and n_concentration (those with a C).

    `where` (SQL over head_stats `h` and samples `s`) keeps some samples; a figure the store predates reads as NULL.
    """
    database = con.execute("SELECT current_database()").fetchone()[0]
    have = set(column_names(con, database, "head_stats"))
    columns = ", ".join(f"h.{quote(f.name)}" if f.name in have else f"NULL::{f.sql_type} AS {quote(f.name)}"
                        for f in figures.stored())
    reduced = ", ".join(f"{f.head_sql()} AS {quote(f.name)}" for f in figures.FIGURES)
    joined = (" JOIN samples s ON s.run_id = h.run_id AND s.sample_id = h.sample_id" if where else "")
    return con.execute(
        f"""SELECT layer, head, {reduced}, count(*) AS n, count(concentration) AS n_concentration
            FROM (SELECT h.layer, h.head, {columns} FROM head_stats h{joined}
                  WHERE h.run_id = ?{f" AND ({where})" if where else ""})
            GROUP BY layer, head ORDER BY layer, head""",
        [run_id],
    ).df()


def query(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
    """Run any SQL on the store (what `vheads query` does); a DuckDB error becomes a one-line StoreError."""
    try:
        result = con.execute(sql, params)
        return result.df() if result.description else pd.DataFrame()
    except duckdb.Error as error:
        raise StoreError(f"query failed: {first_line(error)}") from error


def query_exact(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
    """Run SQL keeping DuckDB's values as they are, for printing: each column of object dtype, NULL as None and NaN
    as NaN, integers of any size exact, JSON columns parsed into lists and dicts; repeated names numbered `a_1`."""
    try:
        result = con.execute(sql, params)
        if not result.description:
            return pd.DataFrame()
        rows = result.fetchall()
    except duckdb.Error as error:
        raise StoreError(f"query failed: {first_line(error)}") from error
    names: list[str] = []
    for name in (d[0] for d in result.description):
        unique, n = name, 0
        while unique in names:
            n += 1
            unique = f"{name}_{n}"
        names.append(unique)
    columns = {}
    for i, (name, description) in enumerate(zip(names, result.description, strict=True)):
        values = [row[i] for row in rows]
        if str(description[1]) == "JSON":
            values = [loads(v) for v in values]
        columns[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(columns)


def export(con: duckdb.DuckDBPyConnection, run_id: int | None, out_dir: Path, overwrite: bool) -> list[Path]:
    """Write every table of the store (runs, samples, head_stats, groundings, comparisons, and any added later) as
    Parquet files, `<table>.parquet`; for one run, `<run>.<table>.parquet` with that run's rows only.

    Raises StoreError naming the files already there unless `overwrite`.
    """
    database = con.execute("SELECT current_database()").fetchone()[0]
    if run_id is None:
        prefix, name = "", None
    else:
        name = run_row_by_id(con, run_id)["name"]
        prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", name) + "."
    queries: dict[str, tuple[str, list[Any]]] = {}
    for table in table_names(con, database):
        columns = column_names(con, database, table)
        where, params, order = "", [], ROW_KEYS.get(table, ())
        if "run_id" in columns:
            order = ("run_id", *order)
            if name:
                where, params = " WHERE run_id = ?", [run_id]
        elif table in RUN_LISTS and name:
            where, params = f" WHERE list_contains(from_json({quote(RUN_LISTS[table])}, '[\"VARCHAR\"]'), ?)", [name]
        picked = "* EXCLUDE (writer_pid)" if table == "runs" else "*"
        order_by = f" ORDER BY {', '.join(quote(c) for c in order)}" if order else ""
        queries[table] = (f"SELECT {picked} FROM {quote(table)}{where}{order_by}", params)
    targets = {table: out_dir / f"{prefix}{table}.parquet" for table in queries}
    taken = [str(path) for path in targets.values() if path.exists()]
    if taken and not overwrite:
        raise StoreError(f"{', '.join(taken)} already exist(s); pass --force to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table, (sql, params) in queries.items():
        target = targets[table]
        try:
            con.execute(f"COPY ({sql}) TO {sql_str(target)} (FORMAT parquet, COMPRESSION zstd)", params)
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


def has_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """Whether the store has `table` (a store written before it was added, opened read-only, lacks it)."""
    return bool(con.execute("SELECT 1 FROM duckdb_tables() WHERE table_name = ? AND database_name = "
                            "current_database()", [table]).fetchall())


def predictions(con: duckdb.DuckDBPyConnection, run_id: int | None = None) -> pd.DataFrame:
    """Stored error predictions (of one run, or all) joined with their samples' question, answer, prediction and
    correctness; fit decoded. Empty in a store that has none."""
    columns = ["run_id", "run", "predictor", "sample_id", "p_error", "fold", "heads", "fit", "created", "question",
               "answer", "prediction", "correct"]
    if not has_table(con, "predictions"):
        return pd.DataFrame(columns=columns)
    where, params = ("WHERE p.run_id = ?", [run_id]) if run_id is not None else ("", [])
    frame = con.execute(
        "SELECT p.run_id, r.name AS run, p.predictor, p.sample_id, p.p_error, p.fold, p.heads, p.fit, p.created, "
        "s.question, s.answer, s.prediction, s.correct FROM predictions p JOIN runs r USING (run_id) "
        f"LEFT JOIN samples s ON s.run_id = p.run_id AND s.sample_id = p.sample_id {where} "
        "ORDER BY p.run_id, p.predictor, p.sample_id", params).df()
    frame["fit"] = frame["fit"].map(loads)
    return frame


def accuracy_estimates(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Stored accuracy estimates with each run's name and stored accuracy; train decoded. Empty when none."""
    columns = ["run_id", "run", "role", "estimator", "estimate", "accuracy", "features", "train", "created"]
    if not has_table(con, "accuracy_estimates"):
        return pd.DataFrame(columns=columns)
    frame = con.execute(
        "SELECT e.run_id, r.name AS run, e.role, e.estimator, e.estimate, r.accuracy, e.features, e.train, e.created "
        "FROM accuracy_estimates e JOIN runs r USING (run_id) ORDER BY e.role, e.run_id, e.estimator").df()
    frame["train"] = frame["train"].map(loads)
    return frame
