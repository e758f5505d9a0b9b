"""Merging stores: shard files (or any vheads stores) folded into one, all or nothing; merging twice adds nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from vheads.settings import differences
from vheads.store.read import decode_run, records, run_row, run_row_by_id
from vheads.store.schema import (
    COMPAT_FIELDS,
    HEAD_FIELDS,
    SAMPLE_FIELDS,
    SCHEMA_VERSION,
    StoreError,
    dumps,
    iso,
    open_store,
    present_columns,
    sql_str,
    translate,
)
from vheads.store.write import transaction


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
    con = open_store(into, read_only=False)
    try:
        _fold(con, sources, summary)
    finally:
        con.close()
    return summary


def _fold(con: duckdb.DuckDBPyConnection, sources: Sequence[Path], summary: MergeSummary) -> None:
    """Fold files into the store of `con` in one transaction, all or nothing; each is attached read-only, so a shard
    still being written is refused by its own lock before anything changes."""
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
            for alias, src in zip(attached, sources, strict=True):
                for record in records(con.execute(f"SELECT * FROM {alias}.runs ORDER BY run_id")):
                    _merge_run(con, alias, src, decode_run(record), summary)
    finally:
        for alias in attached:
            con.execute(f"DETACH {alias}")


def _merge_run(con: duckdb.DuckDBPyConnection, alias: str, src: Path, source: dict[str, Any],
               summary: MergeSummary) -> None:
    """Copy one attached run's missing samples and head rows, then recompute the run's status from its shards."""
    name = source["name"]
    target = run_row(con, name)
    source_parts = _parts(source, stale_running=True)
    if target is None:
        run_id = con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
        con.execute(
            "INSERT INTO runs (run_id, name, family, config, status, started, sweep, tags, "
            + ", ".join(COMPAT_FIELDS)
            + ") VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, name, source["family"], dumps(source["config"]), source["started"], source["sweep"]]
            + [dumps(source["tags"])]
            + [source[key] for key in COMPAT_FIELDS],
        )
        target = run_row_by_id(con, run_id)
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
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE vheads_new_ids AS SELECT sample_id FROM {alias}.samples "
        "WHERE run_id = ? EXCEPT SELECT sample_id FROM samples WHERE run_id = ?",
        [src_id, run_id],
    )
    for table, columns in (
        ("head_stats", ("sample_id", "layer", "head") + HEAD_FIELDS),
        ("samples", ("sample_id",) + SAMPLE_FIELDS),
    ):
        names = ", ".join(columns)
        present = present_columns(con, alias, table)
        picked = ", ".join(c if c in present else f"NULL AS {c}" for c in columns)
        added = con.execute(
            f"INSERT INTO {table} (run_id, {names}) SELECT ?, {picked} FROM {alias}.{table} "
            "WHERE run_id = ? AND sample_id IN (SELECT sample_id FROM vheads_new_ids)",
            [run_id, src_id],
        ).fetchone()[0]
        if table == "samples":
            summary.samples_added += added
        else:
            summary.head_rows_added += added
    con.execute("DROP TABLE vheads_new_ids")
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
