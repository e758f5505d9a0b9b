"""Merging stores: shard files (or any vheads stores) folded into one, every table of them, all or nothing; merging
twice adds nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from vheads.store import lock
from vheads.store.read import decode_run, records, run_row, run_row_by_id
from vheads.store.schema import (
    COMPAT_FIELDS,
    ROW_KEYS,
    SCHEMA_VERSION,
    StoreError,
    check_path,
    column_names,
    connect,
    dumps,
    first_line,
    iso,
    prepare,
    quote,
    renamed,
    sql_str,
    table_names,
    translate,
)
from vheads.store.write import transaction

# How the summary names the rows of each table ("3 grounding rows"); other tables read "N <table> rows".
_ROWS = {"samples": "samples", "head_stats": "head rows", "groundings": "grounding rows",
         "comparisons": "comparison rows"}
# Runs columns that merge recomputes from the shards rather than copies.
_RECOMPUTED = {"run_id", "status", "started", "finished", "n_samples", "accuracy", "skipped", "tags", "writer_pid"}


@dataclass
class MergeSummary:
    """What a merge added, per table and per run, so the CLI can report it and a second merge can be seen to add
    nothing."""

    into: Path
    files: list[Path]
    runs_created: list[str] = field(default_factory=list)
    runs_updated: list[str] = field(default_factory=list)
    rows_added: dict[str, int] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)

    @property
    def samples_added(self) -> int:
        """Samples added, over all runs."""
        return self.rows_added.get("samples", 0)

    @property
    def head_rows_added(self) -> int:
        """head_stats rows added, over all runs."""
        return self.rows_added.get("head_stats", 0)

    def __str__(self) -> str:
        runs = ", ".join(f"{name} ({state})" for name, state in self.status.items()) or "no runs"
        counts = {"samples": self.samples_added, "head_stats": self.head_rows_added,
                  **{t: n for t, n in self.rows_added.items() if n}}
        added = ", ".join(f"{n} {_ROWS.get(table, f'{table} rows')}" for table, n in counts.items())
        return f"merged {len(self.files)} file(s) into {self.into}: {added} added; {runs}"


Conflicts = Callable[[Mapping[str, Any] | None, Mapping[str, Any] | None], list[str]]


def merge(files: Sequence[str | Path], into: str | Path, conflicts: Conflicts | None = None) -> MergeSummary:
    """Fold shard (or other store) files into one store, all or nothing; re-merging adds nothing.

    Every table of the store is merged, its columns read from the files (a column a source lacks is NULL), so a
    table or column added later comes along. Same-named runs become one run with a new run_id; its accuracy is
    recomputed as the mean of `correct`. Runs of one name are merged only when they agree on `COMPAT_FIELDS` (model,
    dataset, grid, ...) and `conflicts(target_config, source_config)` names no difference: the store knows no run
    settings, so the caller says which stored options define a run (`vheads.pipeline.config.differences`: every
    defining option; batch size, device and shard may differ). Otherwise StoreError. On any failure a new `into`
    is removed and an existing one is left as it was.
    """
    into = Path(into)
    sources = [Path(f) for f in files]
    for src in sources:
        if not src.is_file():
            raise StoreError(f"cannot merge {src}: no such file")
        if into.exists() and src.resolve() == into.resolve():
            raise StoreError(f"cannot merge {src} into itself")
    sources = list({src.resolve(): src for src in sources}.values())
    for src in sources:
        writer = lock.holder(src)
        if writer is not None:
            raise StoreError(f"cannot merge {src}: another process ({writer}) is writing it; merge it when it is done")
    summary = MergeSummary(into=into, files=sources)
    check_path(into, read_only=False)
    lock.acquire(into)
    try:
        existed = into.exists()
        con = connect(into, read_only=False)
        try:
            _fold(con, into, sources, summary, conflicts)
        except BaseException:
            con.close()
            if not existed:
                for path in (into, into.with_name(into.name + ".wal")):
                    path.unlink(missing_ok=True)
            raise
        con.close()
    finally:
        lock.release(into)
    return summary


def _fold(con: duckdb.DuckDBPyConnection, into: Path, sources: Sequence[Path], summary: MergeSummary,
          conflicts: Conflicts | None) -> None:
    """Fold files into the store of `con` in one transaction (schema upgrade of `into` included), all or nothing;
    each is attached read-only and checked first, so a file another process holds open is refused before anything
    changes (`merge` has refused those another process is writing)."""
    attached: list[str] = []
    try:
        for index, src in enumerate(sources):
            alias = f"vheads_src_{index}"
            try:
                con.execute(f"ATTACH {sql_str(src)} AS {alias} (READ_ONLY)")
            except duckdb.Error as error:
                raise translate(error, src) from error
            attached.append(alias)
            try:
                version = con.execute(f"SELECT value FROM {alias}.meta WHERE key = 'schema_version'")
                version = version.fetchone()
            except duckdb.CatalogException as error:
                raise StoreError(f"cannot merge {src}: not a vheads store") from error
            if version is None or int(version[0]) > SCHEMA_VERSION:
                raise StoreError(f"cannot merge {src}: written by a newer vheads (schema {version}), upgrade")
        with transaction(con):
            prepare(con, into, read_only=False)
            target = con.execute("SELECT current_database()").fetchone()[0]
            for alias, src in zip(attached, sources, strict=True):
                try:
                    tables = _shared_tables(con, alias, src, target)
                    for record in records(con.execute(f"SELECT * FROM {alias}.runs ORDER BY run_id")):
                        _merge_run(con, alias, src, decode_run(record), tables, summary, conflicts)
                    for table, columns in tables.items():
                        if "run_id" not in columns and table != "runs":
                            _count(summary, table, _copy_rows(con, alias, table, columns))
                except duckdb.Error as error:
                    raise StoreError(f"cannot merge {src}: {first_line(error)}") from error
    finally:
        for alias in attached:
            con.execute(f"DETACH {alias}")


def _shared_tables(con: duckdb.DuckDBPyConnection, alias: str, src: Path,
                   target: str) -> dict[str, dict[str, str | None]]:
    """The tables to copy from one source: for each table of the target the source has, its target columns, each
    with the source's name for it (an older name where it was renamed since, `schema.RENAMED_COLUMNS`), None where
    the source lacks it. A source table or column the target lacks is refused: it would be lost."""
    ours = table_names(con, target)
    tables = {}
    for table in table_names(con, alias):
        if table not in ours:
            raise StoreError(f"cannot merge {src}: its table {table} is unknown to this vheads; upgrade vheads")
        have = renamed(table, {c: c for c in column_names(con, alias, table)})
        columns = column_names(con, target, table)
        unknown = [old for new, old in have.items() if new not in columns]
        if unknown:
            raise StoreError(f"cannot merge {src}: its column {table}.{unknown[0]} is unknown to this vheads; "
                             "upgrade vheads")
        tables[table] = {c: have.get(c) for c in columns}
    return tables


def _copy_rows(con: duckdb.DuckDBPyConnection, alias: str, table: str, columns: Mapping[str, str | None],
               run_ids: tuple[int, int] | None = None) -> int:
    """Copy the rows of `alias.table` whose key (`ROW_KEYS`, else the whole row) the target lacks; returns how many.

    With `run_ids` (target, source) only the source run's rows, given the target's run_id. A column the source
    lacks is NULL.
    """
    names = [c for c in columns if c != "run_id"]
    value = {c: f"s.{quote(columns[c])}" if columns[c] else "NULL" for c in names}
    key = ROW_KEYS.get(table, tuple(names))
    same = " AND ".join(f"t.{quote(c)} IS NOT DISTINCT FROM {value[c]}" for c in key) or "TRUE"
    into, picked = ", ".join(quote(c) for c in names), ", ".join(value[c] for c in names)
    params: list[Any] = []
    if run_ids is not None:
        into, picked = f"run_id, {into}", f"?::INTEGER, {picked}"
        params = [run_ids[0], run_ids[1], run_ids[0]]
    sql = (f"INSERT INTO {quote(table)} ({into}) SELECT {picked} FROM {alias}.{quote(table)} AS s "
           f"WHERE {'s.run_id = ? AND ' if run_ids else ''}NOT EXISTS (SELECT 1 FROM {quote(table)} AS t "
           f"WHERE {'t.run_id = ? AND ' if run_ids else ''}{same})")
    return con.execute(sql, params).fetchone()[0]


def _count(summary: MergeSummary, table: str, added: int) -> None:
    """Add `added` rows of `table` to the summary."""
    summary.rows_added[table] = summary.rows_added.get(table, 0) + added


def _merge_run(con: duckdb.DuckDBPyConnection, alias: str, src: Path, source: dict[str, Any],
               tables: Mapping[str, Mapping[str, str | None]], summary: MergeSummary,
               conflicts: Conflicts | None) -> None:
    """Copy one attached run's missing rows of every table keyed by run_id, then recompute the run's status from its
    shards."""
    name = source["name"]
    target = run_row(con, name)
    source_parts = _parts(source, stale_running=True)
    if target is None:
        run_id = con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
        copied = {c: old for c, old in tables["runs"].items() if old and c not in _RECOMPUTED}
        con.execute(
            f"INSERT INTO runs (run_id, status, {', '.join(quote(c) for c in copied)}) "
            f"SELECT ?, 'running', {', '.join(quote(old) for old in copied.values())} FROM {alias}.runs "
            "WHERE run_id = ?",
            [run_id, source["run_id"]],
        )
        target = run_row_by_id(con, run_id)
        parts: dict[str, dict[str, Any]] = {}
        summary.runs_created.append(name)
    else:
        diffs = [f"{k} {target[k]!r} != {source[k]!r}" for k in COMPAT_FIELDS if target[k] != source[k]]
        diffs += conflicts(target["config"], source["config"]) if conflicts is not None else []
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
    run_id = target["run_id"]
    for table, columns in tables.items():
        if "run_id" in columns and table != "runs":
            _count(summary, table, _copy_rows(con, alias, table, columns, (run_id, source["run_id"])))
    status = _parts_status(parts)
    tags = {k: v for k, v in (target["tags"] or source["tags"] or {}).items() if k != "shard"}
    tags["parts"] = parts
    started = min((p["started"] for p in parts.values() if p["started"]), default=None)
    finished = max((p["finished"] for p in parts.values() if p["finished"]), default=None)
    skipped = _combine_skipped([p["skipped"] for p in parts.values() if p["skipped"]])
    con.execute(
        """UPDATE runs SET status = ?, started = ?, finished = ?, tags = ?, skipped = ?, writer_pid = NULL,
               n_samples = (SELECT count(*) FROM samples WHERE run_id = ?),
               accuracy = (SELECT avg(correct::DOUBLE) FROM samples WHERE run_id = ?)
           WHERE run_id = ?""",
        [
            status,
            started,
            None if status == "running" else finished,
            dumps(tags),
            None if skipped is None else dumps(skipped),
            run_id,
            run_id,
            run_id,
        ],
    )
    summary.status[name] = status


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
            "started": iso(row["started"]),
            "finished": iso(row["finished"]),
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
