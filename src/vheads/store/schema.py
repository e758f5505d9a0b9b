"""The store's tables and how a store file is opened: schema version, waiting out another process's hold on the
file, DuckDB's lock errors as one-line StoreErrors, and runs left `running` by a dead writer marked `interrupted`."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from vheads.figures import stored, stored_names

log = logging.getLogger("vheads.store")

SCHEMA_VERSION = 1
# How long opening a store waits for another process to close it (a writer holds the file while it stores a batch,
# a reader for its whole command), trying every POLL_S; a writer that reopens the file right after closing it first
# leaves it free for WRITER_PAUSE_S (longer than POLL_S), so a reader waiting for it gets in.
OPEN_WAIT_S = 10.0
POLL_S = 0.01
WRITER_PAUSE_S = 0.05
STATUSES = ("running", "done", "interrupted", "failed")
COMPAT_FIELDS = ("model", "dataset", "split", "readout", "ablation", "layers", "heads")
SAMPLE_FIELDS = (
    "question_type",
    "prompt_style",
    "question",
    "prediction",
    "answer",
    "correct",
    "image_tokens",
    "region_tokens",
    "meta",
    "digest",
    "first_token_prob",
    "mean_logprob",
)
# The head_stats figure columns as declared when vheads was imported (the store itself reads `vheads.figures` at call
# time, so a figure declared later, e.g. in a test, gets its column too).
HEAD_FIELDS = stored_names()
GROUNDING_FIELDS = ("x1", "y1", "x2", "y2", "targets", "pointing", "iou")
PREDICTORS = ("heads", "confidence", "both")

SAMPLE_TYPES = {
    "question_type": pa.string(),
    "prompt_style": pa.string(),
    "question": pa.string(),
    "prediction": pa.string(),
    "answer": pa.string(),
    "correct": pa.bool_(),
    "image_tokens": pa.int32(),
    "region_tokens": pa.int32(),
    "meta": pa.string(),
    "digest": pa.string(),
    "first_token_prob": pa.float64(),
    "mean_logprob": pa.float64(),
}
JSON_RUN_COLUMNS = ("config", "skipped", "tags")

# head_stats' `{figures}` becomes one column per stored figure of `vheads.figures` (`ddl`).
_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    f"""CREATE TABLE IF NOT EXISTS runs (
        run_id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        model TEXT NOT NULL,
        family TEXT,
        dataset TEXT NOT NULL,
        split TEXT,
        layers INTEGER NOT NULL,
        heads INTEGER NOT NULL,
        readout TEXT,
        ablation TEXT,
        config JSON,
        status TEXT NOT NULL CHECK (status IN {STATUSES!r}),
        started TIMESTAMP,
        finished TIMESTAMP,
        n_samples INTEGER NOT NULL DEFAULT 0,
        accuracy DOUBLE,
        skipped JSON,
        curve TEXT,
        tags JSON,
        writer_pid INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS samples (
        run_id INTEGER NOT NULL,
        sample_id TEXT NOT NULL,
        question_type TEXT,
        prompt_style TEXT,
        question TEXT,
        prediction TEXT,
        answer TEXT,
        correct BOOLEAN,
        image_tokens INTEGER,
        region_tokens INTEGER,
        meta JSON,
        digest TEXT,
        PRIMARY KEY (run_id, sample_id)
    )""",
    """CREATE TABLE IF NOT EXISTS head_stats (
        run_id INTEGER NOT NULL,
        sample_id TEXT NOT NULL,
        layer SMALLINT NOT NULL,
        head SMALLINT NOT NULL{figures}
    )""",
    """CREATE TABLE IF NOT EXISTS comparisons (
        created TIMESTAMP NOT NULL,
        runs JSON NOT NULL,
        kind TEXT NOT NULL,
        basis TEXT,
        figure TEXT,
        method TEXT NOT NULL,
        value DOUBLE,
        n INTEGER,
        detail JSON
    )""",
    """CREATE TABLE IF NOT EXISTS groundings (
        run_id INTEGER NOT NULL,
        source TEXT NOT NULL DEFAULT '',
        selector TEXT NOT NULL,
        heads JSON,
        sample_id TEXT NOT NULL,
        x1 DOUBLE,
        y1 DOUBLE,
        x2 DOUBLE,
        y2 DOUBLE,
        targets JSON,
        pointing BOOLEAN,
        iou DOUBLE,
        created TIMESTAMP,
        PRIMARY KEY (run_id, source, selector, sample_id)
    )""",
    """CREATE TABLE IF NOT EXISTS predictions (
        run_id INTEGER NOT NULL,
        predictor TEXT NOT NULL,
        sample_id TEXT NOT NULL,
        p_error DOUBLE,
        fold INTEGER,
        heads TEXT,
        fit JSON,
        created TIMESTAMP,
        PRIMARY KEY (run_id, predictor, sample_id)
    )""",
    """CREATE TABLE IF NOT EXISTS accuracy_estimates (
        run_id INTEGER NOT NULL,
        role TEXT NOT NULL,
        estimator TEXT NOT NULL,
        estimate DOUBLE,
        features TEXT,
        train JSON,
        created TIMESTAMP,
        PRIMARY KEY (run_id, role, estimator)
    )""",
)
# Columns added after a table first shipped: stores written before them gain them when opened for writing. Every
# stored figure's head_stats column is one of them (`added_columns`), so a newly declared figure needs no entry here.
_ADDED_COLUMNS = (("samples", "digest", "TEXT"), ("samples", "first_token_prob", "DOUBLE"),
                  ("samples", "mean_logprob", "DOUBLE"))
# Columns renamed after they shipped, (table, old name, new name): renamed when the store is opened for writing;
# reads of a store opened read-only (`read.runs`, `read.decode_run`) and merges from it map the old name.
# runs.sweep -> runs.curve: "sweep" names the Ray grid of `vheads sweep`; an ablation curve's tag is its curve.
RENAMED_COLUMNS = (("runs", "sweep", "curve"),)
# Columns added to a table's key: DuckDB cannot change a key in place, so the table is built again (`_rekey`).
_KEY_COLUMNS = (("groundings", "source"),)


_ORDER = [re.search(r"EXISTS (\w+)", statement).group(1) for statement in _DDL]
_TABLES = set(_ORDER)

# The columns that identify a row within its run (tables with run_id) or within the store; merge matches runs by
# name. Merge copies a row only when the target lacks its key, so merging twice adds nothing; export writes rows in
# key order. A table not named here, such as one added later, is keyed by its whole row; its columns are read from
# the database either way.
ROW_KEYS = {
    "samples": ("sample_id",),
    "head_stats": ("sample_id", "layer", "head"),
    "groundings": ("source", "selector", "sample_id"),
    "predictions": ("predictor", "sample_id"),
    "accuracy_estimates": ("role", "estimator"),
}
# Tables whose rows name their runs in a JSON list of run names instead of a run_id column.
RUN_LISTS = {"comparisons": "runs"}


class StoreError(Exception):
    """A store problem the user can act on (file in use, unwritable path, unknown or clashing run)."""


def ddl() -> tuple[str, ...]:
    """The CREATE TABLE statements of the store, head_stats with a column for each stored figure (`vheads.figures`)."""
    columns = "".join(f",\n        {f.name} {f.sql_type}" for f in stored())
    return tuple(statement.replace("{figures}", columns) for statement in _DDL)


def added_columns() -> tuple[tuple[str, str, str], ...]:
    """(table, column, type) of the columns a store written before them gains when opened for writing: every stored
    figure's column, and `_ADDED_COLUMNS`."""
    return (*(("head_stats", f.name, f.sql_type) for f in stored()), *_ADDED_COLUMNS)


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table the store needs; idempotent, so later features extend `_DDL` and old files catch up."""
    for statement in ddl():
        con.execute(statement)
    have = _columns(con)
    for table, old, new in RENAMED_COLUMNS:
        if (table, old) in have and (table, new) not in have:
            con.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
    for table, column, kind in added_columns():
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
    have = _columns(con)
    for table, column in _KEY_COLUMNS:
        if (table, column) not in have:
            _rekey(con, table)
    con.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING", [str(SCHEMA_VERSION)])


def open_store(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """A connection to the vheads store at `path`, checked and ready (`prepare`); StoreError when it cannot be."""
    con = connect(path, read_only)
    try:
        prepare(con, path, read_only)
    except BaseException:
        con.close()
        raise
    return con


def connect(path: Path, read_only: bool, wait_forever: bool = False) -> duckdb.DuckDBPyConnection:
    """Connect, waiting while another process has the file open (up to OPEN_WAIT_S, or as long as it takes), and
    turning DuckDB's errors (lock held, missing folder) into one-line StoreErrors naming the path."""
    check_path(path, read_only)
    began = time.monotonic()
    delay, warned = POLL_S, False
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as error:
            waited = time.monotonic() - began
            if "Could not set lock" not in str(error) or (not wait_forever and waited >= OPEN_WAIT_S):
                raise translate(error, path, waited) from error
            if wait_forever and not warned and waited >= OPEN_WAIT_S:
                log.warning("store %s is open in another process (%s); waiting for it to close", path,
                            _lock_holder(str(error)))
                warned = True
        time.sleep(delay)
        if wait_forever:  # a writer waiting for a reader's command to end: no need to poll fast
            delay = min(2 * delay, 0.5)


def check_path(path: Path, read_only: bool) -> None:
    """StoreError unless `path` can hold a store: not a folder; existing, to be read; in a writable folder, to be
    written."""
    if path.is_dir():
        raise StoreError(f"store {path} is a folder, expected a .duckdb file")
    if read_only and not path.exists():
        raise StoreError(f"no store at {path}")
    if not read_only:
        folder = path.parent
        if not folder.is_dir():
            raise StoreError(f"cannot create store {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise StoreError(f"cannot write store {path}: permission denied")


def prepare(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
    """Check this is a vheads store of a version we read; create the schema; unstick runs of dead writers."""
    tables = {r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()}
    if tables and "meta" not in tables:
        raise StoreError(f"{path} is a DuckDB file but not a vheads store")
    if not tables and read_only:
        raise StoreError(f"{path} is an empty DuckDB file, not a vheads store")
    if not read_only and not (tables >= _TABLES and _has_added_columns(con)):
        create_schema(con)
    version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version is None or int(version[0]) > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema {version and version[0]}; this vheads reads up to "
            f"{SCHEMA_VERSION}, upgrade vheads"
        )
    if not read_only:
        con.execute(
            "UPDATE runs SET status = 'interrupted' "
            "WHERE status = 'running' AND writer_pid IS NOT NULL AND writer_pid <> ?",
            [os.getpid()],
        )


def _columns(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str]]:
    """(table, column) of every column of the store's tables."""
    return {(r[0], r[1]) for r in con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = current_database()").fetchall()}


def _has_added_columns(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the tables already have every column added since they first shipped."""
    have = _columns(con)
    return all((table, column) in have for table, column, _ in added_columns()) and \
        all(key in have for key in _KEY_COLUMNS) and all((table, new) in have for table, _, new in RENAMED_COLUMNS)


def _rekey(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Build `table` again with its current key (`_DDL`), its rows copied over in one transaction; the columns the
    old table lacks take their defaults (groundings: source '', not recorded)."""
    create = next(statement for statement in ddl() if re.search(rf"EXISTS {table} \(", statement))
    names = ", ".join(r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() AND table_name = ? "
        "ORDER BY column_index", [table]).fetchall())
    con.begin()
    try:
        con.execute(f"ALTER TABLE {table} RENAME TO vheads_old_{table}")
        con.execute(create)
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM vheads_old_{table}")
        con.execute(f"DROP TABLE vheads_old_{table}")
    except BaseException:
        con.rollback()
        raise
    con.commit()


def table_names(con: duckdb.DuckDBPyConnection, database: str) -> list[str]:
    """The results tables of the attached `database` (all but `meta`): the schema's in `_DDL` order, then any other
    (written by a newer vheads) by name; an older store may lack later ones."""
    found = {r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main'",
        [database]).fetchall()} - {"meta"}
    return [t for t in _ORDER if t in found] + sorted(found - set(_ORDER))


def column_names(con: duckdb.DuckDBPyConnection, database: str, table: str) -> list[str]:
    """The columns of `table` in the attached `database`, in table order."""
    return [r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND schema_name = 'main' "
        "AND table_name = ? ORDER BY column_index", [database, table]).fetchall()]


def quote(name: str) -> str:
    """An identifier as SQL text (column names are read from the database, not typed here)."""
    return '"' + name.replace('"', '""') + '"'


def translate(error: duckdb.Error, path: Path, waited: float = 0.0) -> StoreError:
    """DuckDB's error on opening or attaching `path` as one line the user can act on."""
    message = str(error)
    if "Could not set lock" in message:
        held = f" for over {waited:.0f} s" if waited >= 1 else ""
        return StoreError(
            f"store {path} is in use by another process ({_lock_holder(message)}){held}; DuckDB opens a file to "
            "one writer or to readers: wait for it to finish, or use another store"
        )
    if "different configuration" in message:
        return StoreError(f"store {path} is already open in this process in another mode")
    return StoreError(f"cannot open store {path}: {first_line(error)}")


def _lock_holder(message: str) -> str:
    """The pid named in DuckDB's lock error, as `pid 123`."""
    pid = re.search(r"PID (\d+)", message)
    return f"pid {pid.group(1)}" if pid else "pid unknown"


def now() -> datetime:
    """The time now in UTC, as the store's TIMESTAMP columns keep it."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def dumps(value: Any) -> str | None:
    """A value for a JSON column (keys sorted, so equal settings read back equal)."""
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty), for one-line errors."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def sql_str(path: Path) -> str:
    """A path as a SQL string literal (COPY and ATTACH take no bound parameters)."""
    return "'" + str(path).replace("'", "''") + "'"


def renames(table: str) -> dict[str, str]:
    """Old column name -> current name, for the columns of `table` renamed after they shipped (`RENAMED_COLUMNS`)."""
    return {old: new for t, old, new in RENAMED_COLUMNS if t == table}


def renamed(table: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """A row of `table` read from a store of any age, its renamed columns under their current names."""
    names = renames(table)
    return {names.get(name, name): value for name, value in row.items()}

