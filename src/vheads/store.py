"""The results store: one embedded DuckDB file holding every run, its samples and per-head attention figures.

Each batch is committed in one transaction as it finishes, so a run killed at any moment resumes with no
duplicate and no lost row. Shards of one run write their own files (`shard_path`) and `merge` folds them in.

Concurrency, as DuckDB behaves: a file open for writing is locked to that one process, and no other
process can open it at all, not even read-only (`StoreError` naming the holder's pid). Several processes
may read one store at the same time, and while they do none can open it for writing. A run left `running`
by a killed process is marked `interrupted` the next time a process opens the store for writing, because
the lock proves nobody is writing it. Times are UTC.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from vheads.settings import differences

SCHEMA_VERSION = 1
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
)
HEAD_FIELDS = ("visual_weight", "concentration", "region_weight", "text_weight", "sink_weight", "pointing",
               "spatial_entropy")
GROUNDING_FIELDS = ("x1", "y1", "x2", "y2", "targets", "pointing", "iou")

_SAMPLE_TYPES = {
    "question_type": pa.string(),
    "prompt_style": pa.string(),
    "question": pa.string(),
    "prediction": pa.string(),
    "answer": pa.string(),
    "correct": pa.bool_(),
    "image_tokens": pa.int32(),
    "region_tokens": pa.int32(),
    "meta": pa.string(),
}
_JSON_RUN_COLUMNS = ("config", "skipped", "tags")

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
        sweep TEXT,
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
        PRIMARY KEY (run_id, sample_id)
    )""",
    """CREATE TABLE IF NOT EXISTS head_stats (
        run_id INTEGER NOT NULL,
        sample_id TEXT NOT NULL,
        layer SMALLINT NOT NULL,
        head SMALLINT NOT NULL,
        visual_weight REAL,
        concentration REAL,
        region_weight REAL,
        text_weight REAL,
        sink_weight REAL,
        pointing REAL,
        spatial_entropy REAL
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
        PRIMARY KEY (run_id, selector, sample_id)
    )""",
)
# Columns added after a table first shipped: stores written before them gain them when opened for writing.
_ADDED_COLUMNS = (("head_stats", "pointing", "REAL"), ("head_stats", "spatial_entropy", "REAL"))


_TABLES = {re.search(r"EXISTS (\w+)", statement).group(1) for statement in _DDL}


class StoreError(Exception):
    """A store problem the user can act on (file in use, unwritable path, unknown or clashing run)."""


@dataclass
class RunHandle:
    """A run open for writing: what `add_batch` needs, and the sample ids already stored (skip them)."""

    run_id: int
    name: str
    layers: int
    heads: int
    done_ids: set[str] = field(default_factory=set)
    resumed: bool = False


RunRef = RunHandle | str | int


@dataclass
class MergeSummary:
    """What a merge added, per run, so the CLI can report it and a second merge can be seen to add nothing."""

    into: Path
    files: list[Path]
    runs_created: list[str] = field(default_factory=list)
    runs_updated: list[str] = field(default_factory=list)
    samples_added: int = 0
    head_rows_added: int = 0
    status: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        runs = ", ".join(f"{name} ({state})" for name, state in self.status.items()) or "no runs"
        return (
            f"merged {len(self.files)} file(s) into {self.into}: {self.samples_added} samples, "
            f"{self.head_rows_added} head rows added; {runs}"
        )


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table the store needs; idempotent, so later features extend `_DDL` and old files catch up."""
    for statement in _DDL:
        con.execute(statement)
    for table, column, kind in _ADDED_COLUMNS:
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
    con.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING", [str(SCHEMA_VERSION)])


def shard_path(store_path: str | Path, k: int, n: int) -> Path:
    """The file shard k of n writes, beside the store (`vheads.duckdb` -> `vheads.shard-2-of-4.duckdb`)."""
    if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
        raise StoreError(f"bad shard {k}/{n}: expected k/n with 1 <= k <= n")
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.stem}.shard-{k}-of-{n}{store_path.suffix or '.duckdb'}")


def check_writable(path: str | Path) -> None:
    """Fail now, before a model is loaded, if the store cannot be opened for writing; creates it if absent."""
    Store(path).close()


def merge(files: Sequence[str | Path], into: str | Path) -> MergeSummary:
    """Fold shard (or other store) files into one store, all or nothing; re-merging adds nothing.

    Same-named runs become one run with a new run_id; its accuracy is recomputed as the mean of `correct`. Runs of
    one name are merged only when their whole configuration agrees (model, data, limit, seed, readout, every
    defining option of `settings.DEFINING`; batch size, device and shard may differ): otherwise StoreError.
    """
    into = Path(into)
    sources = [Path(f) for f in files]
    for src in sources:
        if not src.is_file():
            raise StoreError(f"cannot merge {src}: no such file")
        if into.exists() and src.resolve() == into.resolve():
            raise StoreError(f"cannot merge {src} into itself")
    sources = list({src.resolve(): src for src in sources}.values())
    summary = MergeSummary(into=into, files=sources)
    with Store(into) as store:
        store._merge(sources, summary)
    return summary


class Store:
    """An open results store; use as a context manager so the file is closed and unfinished runs are marked."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._open_runs: dict[int, RunHandle] = {}
        self._con = _open(self.path, read_only)
        try:
            self._prepare()
        except BaseException:
            self._con.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        crashed = exc_type is not None and not issubclass(exc_type, KeyboardInterrupt | SystemExit)
        self.close(status="failed" if crashed else "interrupted")

    def close(self, status: str = "interrupted") -> None:
        """Mark runs started here but not finished with `status`, then release the file lock."""
        if self._con is None:
            return
        for run_id in list(self._open_runs):
            self.mark(run_id, status)
        self._con.close()
        self._con = None

    def start_run(
        self,
        name: str,
        *,
        model: str,
        family: str | None,
        dataset: str,
        split: str | None,
        layers: int,
        heads: int,
        readout: str | None,
        ablation: str | None,
        config: Mapping[str, Any],
        resume: bool = False,
        sweep: str | None = None,
        shard: tuple[int, int] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> RunHandle:
        """Create run `name`, or with `resume` reopen it so the pipeline skips the samples already stored."""
        self._require_writable()
        if not name:
            raise StoreError("a run needs a non-empty --name")
        if int(layers) < 1 or int(heads) < 1:
            raise StoreError(f"run {name}: layers and heads must be positive, got {layers} x {heads}")
        if shard is not None:
            shard_path("store", *shard)
        wanted = dict(
            zip(COMPAT_FIELDS, (model, dataset, split, readout, ablation, int(layers), int(heads)), strict=True)
        )
        row = self._run_row(name)
        if row is None:
            all_tags = dict(tags or {})
            if shard is not None:
                all_tags["shard"] = list(shard)
            with self._transaction():
                run_id = self._con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
                self._con.execute(
                    "INSERT INTO runs (run_id, name, family, config, status, started, sweep, tags, writer_pid, "
                    + ", ".join(COMPAT_FIELDS)
                    + ") VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, name, family, _dumps(config), _now(), sweep, _dumps(all_tags), os.getpid()]
                    + list(wanted.values()),
                )
            return self._track(RunHandle(run_id, name, int(layers), int(heads)))
        if not resume:
            raise StoreError(f"run {name} exists; pass --resume to continue it or choose another --name")
        diffs = [f"{key} {row[key]!r} != {value!r}" for key, value in wanted.items() if row[key] != value]
        if diffs:
            raise StoreError(f"cannot resume run {name}: it was started with {'; '.join(diffs)}")
        old_tags = row["tags"] or {}
        if "parts" in old_tags:
            raise StoreError(
                f"run {name} was assembled by merge from shards; resume the missing shard in its own file "
                "(--shard k/n) and merge again"
            )
        old_shard = tuple(old_tags["shard"]) if old_tags.get("shard") else None
        if old_shard != (tuple(shard) if shard else None):
            raise StoreError(f"cannot resume run {name}: it was run as shard {old_shard}, not {shard}")
        new_tags = {**old_tags, **(tags or {})}
        self._con.execute(
            "UPDATE runs SET status = 'running', finished = NULL, writer_pid = ?, tags = ?, "
            "sweep = coalesce(?, sweep) WHERE run_id = ?",
            [os.getpid(), _dumps(new_tags), sweep, row["run_id"]],
        )
        done = self._con.execute("SELECT sample_id FROM samples WHERE run_id = ?", [row["run_id"]]).fetchall()
        handle = RunHandle(row["run_id"], name, row["layers"], row["heads"], {r[0] for r in done}, resumed=True)
        return self._track(handle)

    def add_batch(
        self,
        run: RunHandle,
        samples: Sequence[Mapping[str, Any]],
        visual_weight: np.ndarray,
        concentration: np.ndarray,
        region_weight: np.ndarray | None,
        text_weight: np.ndarray | None,
        sink_weight: np.ndarray | None,
        pointing: np.ndarray | None = None,
        spatial_entropy: np.ndarray | None = None,
    ) -> int:
        """Store one batch in one transaction (all rows or none), skipping stored samples; returns how many were new.

        The arrays are `[batch, layers, heads]`, row i belonging to `samples[i]`; NaN is stored as NULL, and an
        array given as None (not measured) is all NULL.
        """
        self._require_writable()
        if run.run_id not in self._open_runs:
            raise StoreError(f"run {run.name} is not open for writing here; start_run(..., resume=True) first")
        ids = [_sample_id(s) for s in samples]
        shape = (len(ids), run.layers, run.heads)
        arrays: dict[str, np.ndarray | None] = {}
        given = (visual_weight, concentration, region_weight, text_weight, sink_weight, pointing, spatial_entropy)
        for name, values in zip(HEAD_FIELDS, given, strict=True):
            if values is not None:
                values = np.asarray(values, dtype=np.float32)
                if values.shape != shape:
                    raise StoreError(f"run {run.name}: {name} has shape {values.shape}, expected {shape}")
            arrays[name] = values
        if not ids:
            return 0
        with self._transaction():
            stored = self._con.execute(
                "SELECT sample_id FROM samples WHERE run_id = ? AND list_contains(?::TEXT[], sample_id)",
                [run.run_id, ids],
            ).fetchall()
            seen = {r[0] for r in stored}
            keep = []
            for i, sid in enumerate(ids):
                if sid not in seen:
                    seen.add(sid)
                    keep.append(i)
            if keep:
                self._insert(run, "samples", ("sample_id",) + SAMPLE_FIELDS, _samples_table(samples, keep))
                heads = _head_table([ids[i] for i in keep], keep, arrays, run.layers, run.heads)
                self._insert(run, "head_stats", ("sample_id", "layer", "head") + HEAD_FIELDS, heads)
                self._con.execute("UPDATE runs SET n_samples = n_samples + ? WHERE run_id = ?", [len(keep), run.run_id])
        run.done_ids.update(ids[i] for i in keep)
        return len(keep)

    def finish_run(
        self,
        run: RunRef,
        status: str = "done",
        accuracy: float | None = None,
        skipped: Mapping[str, Any] | None = None,
    ) -> None:
        """Close a run with its final status, accuracy and the samples it had to skip (reason counts or ids)."""
        self._require_writable()
        _check_status(status)
        run_id = self._resolve(run)
        if accuracy is not None and math.isnan(float(accuracy)):
            accuracy = None
        self._con.execute(
            "UPDATE runs SET status = ?, finished = ?, accuracy = ?, skipped = ?, "
            "n_samples = (SELECT count(*) FROM samples WHERE run_id = ?) WHERE run_id = ?",
            [
                status,
                _now(),
                None if accuracy is None else float(accuracy),
                None if skipped is None else _dumps(skipped),
                run_id,
                run_id,
            ],
        )
        self._open_runs.pop(run_id, None)

    def set_threads(self, threads: int | None) -> None:
        """Limit the threads DuckDB uses on this connection (None: back to its default, one per core)."""
        if self._con is not None:
            self._con.execute("RESET threads" if threads is None else f"SET threads = {int(threads)}")

    def mark(self, run_name: str | int, status: str) -> None:
        """Set a run's status by hand, e.g. to flag one as failed after the fact."""
        self._require_writable()
        _check_status(status)
        run_id = self._resolve(run_name)
        finished = None if status == "running" else _now()
        self._con.execute("UPDATE runs SET status = ?, finished = ? WHERE run_id = ?", [status, finished, run_id])
        if status != "running":
            self._open_runs.pop(run_id, None)

    def runs(self) -> pd.DataFrame:
        """Every run, oldest first, with config / skipped / tags decoded from JSON."""
        frame = self._con.execute("SELECT * EXCLUDE (writer_pid) FROM runs ORDER BY run_id").df()
        for column in _JSON_RUN_COLUMNS:
            frame[column] = frame[column].map(_loads)
        return frame

    def run(self, name_or_id: RunRef) -> dict[str, Any]:
        """One run's row as a dict; an unknown name raises StoreError listing the known ones."""
        row = self._run_row_by_id(self._resolve(name_or_id))
        row.pop("writer_pid")
        return row

    def samples(self, run: RunRef) -> pd.DataFrame:
        """A run's samples (prediction, answer, correct, token counts), ordered by sample id."""
        frame = self._con.execute(
            "SELECT * FROM samples WHERE run_id = ? ORDER BY sample_id", [self._resolve(run)]
        ).df()
        frame["meta"] = frame["meta"].map(_loads)
        return frame

    def head_stats(self, run: RunRef) -> pd.DataFrame:
        """A run's per-sample, per-head figures (layers x heads rows per sample); NULL reads as NaN."""
        return self._con.execute(
            "SELECT * FROM head_stats WHERE run_id = ? ORDER BY sample_id, layer, head", [self._resolve(run)]
        ).df()

    def head_means(self, run: RunRef) -> pd.DataFrame:
        """Per (layer, head) means over a run's samples; NULLs (undefined C, no box) are left out of each mean."""
        return self._con.execute(
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
            [self._resolve(run)],
        ).df()

    def add_groundings(self, run: RunRef, selector: str, heads: Sequence[str],
                       rows: Sequence[Mapping[str, Any]]) -> None:
        """Keep the boxes one head set drew on a run's samples, replacing that selector's earlier ones (one
        transaction). Each row: sample_id, the box x1 y1 x2 y2 (None: no box), targets, pointing, iou."""
        self._require_writable()
        run_id = self._resolve(run)
        now = _now()
        values = [[run_id, selector, _dumps(list(heads)), str(r["sample_id"]),
                   *(None if r.get(k) is None else float(r[k]) for k in ("x1", "y1", "x2", "y2")),
                   _dumps(r.get("targets")), None if r.get("pointing") is None else bool(r["pointing"]),
                   None if r.get("iou") is None else float(r["iou"]), now] for r in rows]
        with self._transaction():
            self._con.execute("DELETE FROM groundings WHERE run_id = ? AND selector = ?", [run_id, selector])
            if values:
                self._con.executemany("INSERT INTO groundings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)

    def groundings(self, run: RunRef) -> pd.DataFrame:
        """The boxes `add_groundings` kept for a run, newest selector first; heads and targets decoded (none in a
        store written before grounding existed)."""
        run_id = self._resolve(run)
        if not self._con.execute("SELECT 1 FROM duckdb_tables() WHERE table_name = 'groundings' "
                                 "AND database_name = current_database()").fetchall():
            return pd.DataFrame(columns=["run_id", "selector", "heads", "sample_id", *GROUNDING_FIELDS, "created"])
        frame = self._con.execute("SELECT * FROM groundings WHERE run_id = ? ORDER BY created DESC, selector, "
                                  "sample_id", [run_id]).df()
        for column in ("heads", "targets"):
            frame[column] = frame[column].map(_loads)
        return frame

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run any SQL on the store (what `vheads query` does); a DuckDB error becomes a one-line StoreError."""
        try:
            result = self._con.execute(sql, params)
            return result.df() if result.description else pd.DataFrame()
        except duckdb.Error as error:
            raise StoreError(f"query failed: {_first_line(error)}") from error

    def export(self, run: RunRef | None, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
        """Write the runs row(s), samples and head_stats of one run (None: all runs) as Parquet files.

        Raises StoreError naming the files already there unless `overwrite`.
        """
        out_dir = Path(out_dir)
        if run is None:
            where, prefix = "", ""
        else:
            run_id = self._resolve(run)
            name = self._run_row_by_id(run_id)["name"]
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
                self._con.execute(f"COPY ({sql}) TO {_sql_str(target)} (FORMAT parquet, COMPRESSION zstd)")
            except duckdb.Error as error:
                raise StoreError(f"cannot write {target}: {_first_line(error)}") from error
            written.append(target)
        return written

    def _prepare(self) -> None:
        """Check this is a vheads store of a version we read; create the schema; unstick runs of dead writers."""
        tables = {r[0] for r in self._con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if tables and "meta" not in tables:
            raise StoreError(f"{self.path} is a DuckDB file but not a vheads store")
        if not tables and self.read_only:
            raise StoreError(f"{self.path} is an empty DuckDB file, not a vheads store")
        if not self.read_only and not (tables >= _TABLES and self._has_added_columns()):
            create_schema(self._con)
        version = self._con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None or int(version[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has store schema {version and version[0]}; this vheads reads up to "
                f"{SCHEMA_VERSION}, upgrade vheads"
            )
        if not self.read_only:
            self._con.execute(
                "UPDATE runs SET status = 'interrupted' "
                "WHERE status = 'running' AND writer_pid IS NOT NULL AND writer_pid <> ?",
                [os.getpid()],
            )

    def _has_added_columns(self) -> bool:
        """Whether the tables already have every column added since they first shipped."""
        have = {(r[0], r[1]) for r in self._con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = current_database()").fetchall()}
        return all((table, column) in have for table, column, _ in _ADDED_COLUMNS)

    def _merge(self, sources: Sequence[Path], summary: MergeSummary) -> None:
        """Fold files into this store in one transaction, all or nothing; each is attached read-only, so a shard
        still being written is refused by its own lock before anything changes."""
        attached: list[str] = []
        try:
            for index, src in enumerate(sources):
                alias = f"vheads_src_{index}"
                try:
                    self._con.execute(f"ATTACH {_sql_str(src)} AS {alias} (READ_ONLY)")
                except duckdb.Error as error:
                    raise _translate(error, src) from error
                attached.append(alias)
                try:
                    version = self._con.execute(f"SELECT value FROM {alias}.meta WHERE key = 'schema_version'")
                    version = version.fetchone()
                except duckdb.CatalogException as error:
                    raise StoreError(f"cannot merge {src}: not a vheads store") from error
                if version is None or int(version[0]) > SCHEMA_VERSION:
                    raise StoreError(f"cannot merge {src}: written by a newer vheads (schema {version}), upgrade")
            with self._transaction():
                for alias, src in zip(attached, sources, strict=True):
                    for record in _records(self._con.execute(f"SELECT * FROM {alias}.runs ORDER BY run_id")):
                        self._merge_run(alias, src, _decode_run(record), summary)
        finally:
            for alias in attached:
                self._con.execute(f"DETACH {alias}")

    def _merge_run(self, alias: str, src: Path, source: dict[str, Any], summary: MergeSummary) -> None:
        """Copy one attached run's missing samples and head rows, then recompute the run's status from its shards."""
        name = source["name"]
        target = self._run_row(name)
        source_parts = _parts(source, stale_running=True)
        if target is None:
            run_id = self._con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
            self._con.execute(
                "INSERT INTO runs (run_id, name, family, config, status, started, sweep, tags, "
                + ", ".join(COMPAT_FIELDS)
                + ") VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, name, source["family"], _dumps(source["config"]), source["started"], source["sweep"]]
                + [_dumps(source["tags"])]
                + [source[key] for key in COMPAT_FIELDS],
            )
            target = self._run_row_by_id(run_id)
            parts: dict[str, dict[str, Any]] = {}
            summary.runs_created.append(name)
        else:
            diffs = [f"{k} {target[k]!r} != {source[k]!r}" for k in COMPAT_FIELDS if target[k] != source[k]]
            diffs += differences(target["config"], source["config"])
            if diffs:
                raise StoreError(
                    f"cannot merge run {name} from {src}: it differs from the stored run ({'; '.join(diffs)})"
                )
            parts = _parts(target, stale_running=False)
            if name not in summary.runs_created + summary.runs_updated:
                summary.runs_updated.append(name)
        have = {key.split("/")[1] for key in parts}
        incoming = {key.split("/")[1] for key in source_parts}
        if have and have != incoming:
            raise StoreError(
                f"cannot merge run {name} from {src}: it is cut into {'/'.join(incoming)} shard(s) there "
                f"but {'/'.join(have)} in the runs merged before"
            )
        for key, part in source_parts.items():
            if parts.get(key, {}).get("status") != "done" or part["status"] == "done":
                parts[key] = part
        run_id, src_id = target["run_id"], source["run_id"]
        self._con.execute(
            f"CREATE OR REPLACE TEMP TABLE vheads_new_ids AS SELECT sample_id FROM {alias}.samples "
            "WHERE run_id = ? EXCEPT SELECT sample_id FROM samples WHERE run_id = ?",
            [src_id, run_id],
        )
        for table, columns in (
            ("head_stats", ("sample_id", "layer", "head") + HEAD_FIELDS),
            ("samples", ("sample_id",) + SAMPLE_FIELDS),
        ):
            names = ", ".join(columns)
            present = {r[0] for r in self._con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND table_name = ?",
                [alias, table]).fetchall()}
            picked = ", ".join(c if c in present else f"NULL AS {c}" for c in columns)
            added = self._con.execute(
                f"INSERT INTO {table} (run_id, {names}) SELECT ?, {picked} FROM {alias}.{table} "
                "WHERE run_id = ? AND sample_id IN (SELECT sample_id FROM vheads_new_ids)",
                [run_id, src_id],
            ).fetchone()[0]
            if table == "samples":
                summary.samples_added += added
            else:
                summary.head_rows_added += added
        self._con.execute("DROP TABLE vheads_new_ids")
        status = _parts_status(parts)
        tags = {k: v for k, v in (target["tags"] or source["tags"] or {}).items() if k != "shard"}
        tags["parts"] = parts
        started = min((p["started"] for p in parts.values() if p["started"]), default=None)
        finished = max((p["finished"] for p in parts.values() if p["finished"]), default=None)
        skipped = _combine_skipped([p["skipped"] for p in parts.values() if p["skipped"]])
        self._con.execute(
            """UPDATE runs SET status = ?, started = ?, finished = ?, tags = ?, skipped = ?, writer_pid = NULL,
                   n_samples = (SELECT count(*) FROM samples WHERE run_id = ?),
                   accuracy = (SELECT avg(correct::DOUBLE) FROM samples WHERE run_id = ?)
               WHERE run_id = ?""",
            [
                status,
                started,
                None if status == "running" else finished,
                _dumps(tags),
                None if skipped is None else _dumps(skipped),
                run_id,
                run_id,
                run_id,
            ],
        )
        summary.status[name] = status

    def _insert(self, run: RunHandle, table: str, columns: Sequence[str], data: pa.Table) -> None:
        """Insert an Arrow table in one statement (never row by row): 1M head rows per run must be cheap."""
        view = f"vheads_batch_{table}"
        self._con.register(view, data)
        try:
            names = ", ".join(columns)
            self._con.execute(f"INSERT INTO {table} (run_id, {names}) SELECT ?, {names} FROM {view}", [run.run_id])
        finally:
            self._con.unregister(view)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """All statements inside commit together or not at all."""
        self._con.begin()
        try:
            yield
        except BaseException:
            self._con.rollback()
            raise
        self._con.commit()

    def _track(self, run: RunHandle) -> RunHandle:
        self._open_runs[run.run_id] = run
        return run

    def _require_writable(self) -> None:
        if self._con is None:
            raise StoreError(f"store {self.path} is closed")
        if self.read_only:
            raise StoreError(f"store {self.path} was opened read-only")

    def _resolve(self, ref: RunRef) -> int:
        """The run_id of a handle, name or id; unknown -> StoreError listing the known names."""
        if isinstance(ref, RunHandle):
            return ref.run_id
        if isinstance(ref, str):
            row = self._con.execute("SELECT run_id FROM runs WHERE name = ?", [ref]).fetchone()
            if row is None and ref.isdigit():
                ref = int(ref)
        else:
            row = None
        if row is None and isinstance(ref, int):
            row = self._con.execute("SELECT run_id FROM runs WHERE run_id = ?", [ref]).fetchone()
        if row is None:
            names = [r[0] for r in self._con.execute("SELECT name FROM runs ORDER BY run_id").fetchall()]
            known = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            raise StoreError(f"unknown run {ref!r} in {self.path}; known runs: {known or 'none yet'}")
        return row[0]

    def _run_row(self, name: str) -> dict[str, Any] | None:
        row = self._con.execute("SELECT run_id FROM runs WHERE name = ?", [name]).fetchone()
        return None if row is None else self._run_row_by_id(row[0])

    def _run_row_by_id(self, run_id: int) -> dict[str, Any]:
        return _decode_run(_records(self._con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id]))[0])


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """Connect, turning DuckDB's errors (lock held, missing folder) into one-line StoreErrors naming the path."""
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
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as error:
        raise _translate(error, path) from error


def _translate(error: duckdb.Error, path: Path) -> StoreError:
    message = str(error)
    if "Could not set lock" in message:
        pid = re.search(r"PID (\d+)", message)
        holder = f"pid {pid.group(1)}" if pid else "pid unknown"
        return StoreError(
            f"store {path} is in use by another process ({holder}); DuckDB allows one writer and no reader "
            "beside it: wait for it to finish, or use another store"
        )
    if "different configuration" in message:
        return StoreError(f"store {path} is already open in this process in another mode")
    return StoreError(f"cannot open store {path}: {_first_line(error)}")


def _samples_table(samples: Sequence[Mapping[str, Any]], keep: list[int]) -> pa.Table:
    """The kept samples as an Arrow table with the samples-table types (unknown keys are a caller bug)."""
    allowed = {"sample_id", *SAMPLE_FIELDS}
    columns = {"sample_id": pa.array([_sample_id(samples[i]) for i in keep], pa.string())}
    for i in keep:
        unknown = set(samples[i]) - allowed
        if unknown:
            raise StoreError(f"sample {samples[i]['sample_id']}: unknown fields {sorted(unknown)}")
    for name, kind in _SAMPLE_TYPES.items():
        values = [_cell(name, samples[i].get(name)) for i in keep]
        columns[name] = pa.array(values, kind)
    return pa.table(columns)


def _cell(name: str, value: Any) -> Any:
    """One sample field converted to its column's Python type (answers may be ints, flags numpy bools)."""
    if value is None:
        return None
    if name == "meta":
        return _dumps(value)
    kind = _SAMPLE_TYPES[name]
    if kind == pa.bool_():
        return bool(value)
    if kind == pa.int32():
        return int(value)
    return str(value)


def _head_table(
    ids: list[str], keep: list[int], arrays: Mapping[str, np.ndarray | None], layers: int, heads: int
) -> pa.Table:
    """Flatten `[batch, layers, heads]` arrays to one row per (sample, layer, head), NaN masked to NULL."""
    n, per_sample = len(keep), layers * heads
    rows = n * per_sample
    index = np.asarray(keep)
    columns: dict[str, pa.Array] = {
        "sample_id": pa.DictionaryArray.from_arrays(
            pa.array(np.repeat(np.arange(n, dtype=np.int32), per_sample)), pa.array(ids, pa.string())
        ),
        "layer": pa.array(np.tile(np.repeat(np.arange(layers, dtype=np.int16), heads), n)),
        "head": pa.array(np.tile(np.arange(heads, dtype=np.int16), n * layers)),
    }
    for name, values in arrays.items():
        if values is None:
            columns[name] = pa.nulls(rows, pa.float32())
        else:
            flat = np.ascontiguousarray(values[index]).reshape(-1)
            columns[name] = pa.array(flat, mask=np.isnan(flat))
    return pa.table(columns)


def _parts(row: Mapping[str, Any], stale_running: bool) -> dict[str, dict[str, Any]]:
    """A run's shards as {"k/n": status and times}; an unsharded run is the single part "1/1".

    A source file could be attached, so nobody is writing it: its `running` means `interrupted`.
    """
    tags = row["tags"] or {}
    if "parts" in tags:
        return {key: dict(part) for key, part in tags["parts"].items()}
    k, n = tags.get("shard") or (1, 1)
    status = "interrupted" if stale_running and row["status"] == "running" else row["status"]
    return {
        f"{k}/{n}": {
            "status": status,
            "started": _iso(row["started"]),
            "finished": _iso(row["finished"]),
            "skipped": row["skipped"],
        }
    }


def _parts_status(parts: Mapping[str, Mapping[str, Any]]) -> str:
    """done when every shard arrived done; failed / interrupted if one did; running while shards are missing."""
    states = [part["status"] for part in parts.values()]
    expected = int(next(iter(parts)).split("/")[1])
    if "failed" in states:
        return "failed"
    if any(state != "done" for state in states):
        return "interrupted"
    return "done" if len(parts) == expected else "running"


def _combine_skipped(reports: list[Any]) -> Any:
    """Union of shards' skip reports: counts add up, lists concatenate, anything else is kept per key."""
    if not reports:
        return None
    if not all(isinstance(report, dict) for report in reports):
        return [item for report in reports for item in (report if isinstance(report, list) else [report])]
    combined: dict[str, Any] = {}
    for report in reports:
        for key, value in report.items():
            old = combined.get(key)
            if old is None:
                combined[key] = value
            elif isinstance(old, int | float) and isinstance(value, int | float):
                combined[key] = old + value
            elif isinstance(old, list) and isinstance(value, list):
                combined[key] = old + value
            elif isinstance(old, dict) and isinstance(value, dict):
                combined[key] = _combine_skipped([old, value])
            else:
                combined[key] = value
    return combined


def _records(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def _decode_run(row: dict[str, Any]) -> dict[str, Any]:
    for column in _JSON_RUN_COLUMNS:
        row[column] = _loads(row[column])
    return row


def _sample_id(sample: Mapping[str, Any]) -> str:
    try:
        return str(sample["sample_id"])
    except KeyError:
        raise StoreError(f"a sample has no sample_id: {dict(sample)!r:.200}") from None


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise StoreError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _sql_str(path: Path) -> str:
    """A path as a SQL string literal (COPY and ATTACH take no bound parameters)."""
    return "'" + str(path).replace("'", "''") + "'"
