"""Writing runs: start (or resume) a run, store its batches one transaction each, finish it.

Each batch is committed in one transaction as it finishes, so a run killed at any moment resumes with no
duplicate and no lost row: `start_run(..., resume=True)` hands back the sample ids already stored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from vheads.figures import stored_names
from vheads.store.read import run_row
from vheads.store.schema import (
    COMPAT_FIELDS,
    SAMPLE_FIELDS,
    SAMPLE_TYPES,
    STATUSES,
    StoreError,
    dumps,
    now,
)


@dataclass
class RunHandle:
    """A run open for writing: what `add_batch` needs, and the sample ids already stored (skip them)."""

    run_id: int
    name: str
    layers: int
    heads: int
    done_ids: set[str] = field(default_factory=set)
    resumed: bool = False


def shard_path(store_path: str | Path, k: int, n: int) -> Path:
    """The file shard k of n writes, beside the store (`vheads.duckdb` -> `vheads.shard-2-of-4.duckdb`)."""
    if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
        raise StoreError(f"bad shard {k}/{n}: expected k/n with 1 <= k <= n")
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.stem}.shard-{k}-of-{n}{store_path.suffix or '.duckdb'}")


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """All statements inside commit together or not at all."""
    con.begin()
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    con.commit()


def start_run(
    con: duckdb.DuckDBPyConnection,
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
    curve: str | None = None,
    shard: tuple[int, int] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> RunHandle:
    """Create run `name`, or with `resume` reopen it so the pipeline skips the samples already stored."""
    if not name:
        raise StoreError("a run needs a non-empty --name")
    if int(layers) < 1 or int(heads) < 1:
        raise StoreError(f"run {name}: layers and heads must be positive, got {layers} x {heads}")
    if shard is not None:
        shard_path("store", *shard)
    wanted = dict(zip(COMPAT_FIELDS, (model, dataset, split, readout, ablation, int(layers), int(heads)), strict=True))
    row = run_row(con, name)
    if row is None and name.isascii() and name.isdigit():
        raise StoreError(f"run name {name!r} is all digits and would read as a run id; choose another --name "
                         f"(e.g. run-{name})")
    if row is None:
        all_tags = dict(tags or {})
        if shard is not None:
            all_tags["shard"] = list(shard)
        with transaction(con):
            run_id = con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
            con.execute(
                "INSERT INTO runs (run_id, name, family, config, status, started, curve, tags, writer_pid, "
                + ", ".join(COMPAT_FIELDS)
                + ") VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, name, family, dumps(config), now(), curve, dumps(all_tags), os.getpid()]
                + list(wanted.values()),
            )
        return RunHandle(run_id, name, int(layers), int(heads))
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
    con.execute(
        "UPDATE runs SET status = 'running', finished = NULL, writer_pid = ?, tags = ?, "
        "curve = coalesce(?, curve) WHERE run_id = ?",
        [os.getpid(), dumps(new_tags), curve, row["run_id"]],
    )
    done = con.execute("SELECT sample_id FROM samples WHERE run_id = ?", [row["run_id"]]).fetchall()
    return RunHandle(row["run_id"], name, row["layers"], row["heads"], {r[0] for r in done}, resumed=True)


def figure_arrays(arrays: Sequence[np.ndarray | None], named: Mapping[str, np.ndarray | None]
                  ) -> dict[str, np.ndarray | None]:
    """Every stored figure's array (None where not given) from positional arrays, in declaration order, and named
    ones; TypeError for an undeclared name, a figure given twice or too many arrays."""
    names = stored_names()
    if len(arrays) > len(names):
        raise TypeError(f"add_batch takes at most {len(names)} figure arrays ({', '.join(names)}), got {len(arrays)}")
    given = dict(zip(names, arrays, strict=False))
    unknown = sorted(set(named) - set(names))
    if unknown:
        raise TypeError(f"add_batch: {', '.join(unknown)} not declared in vheads.figures.FIGURES")
    twice = sorted(set(named) & set(given))
    if twice:
        raise TypeError(f"add_batch: {', '.join(twice)} given by position and by name")
    return {name: {**given, **named}.get(name) for name in names}


def add_batch(
    con: duckdb.DuckDBPyConnection,
    run: RunHandle,
    samples: Sequence[Mapping[str, Any]],
    figures: Mapping[str, np.ndarray | None],
) -> int:
    """Store one batch in one transaction (all rows or none), skipping stored samples; returns how many were new.

    `figures` maps the stored figures' names (`figure_arrays`) to arrays `[batch, layers, heads]`, row i belonging
    to `samples[i]`; NaN is stored as NULL, and an array given as None (not measured) is all NULL.
    """
    ids = [_sample_id(s) for s in samples]
    shape = (len(ids), run.layers, run.heads)
    arrays: dict[str, np.ndarray | None] = {}
    for name, values in figures.items():
        if values is not None:
            values = np.asarray(values, dtype=np.float32)
            if values.shape != shape:
                raise StoreError(f"run {run.name}: {name} has shape {values.shape}, expected {shape}")
        arrays[name] = values
    if not ids:
        return 0
    with transaction(con):
        stored = con.execute(
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
            _insert(con, run, "samples", ("sample_id",) + SAMPLE_FIELDS, _samples_table(samples, keep))
            heads = _head_table([ids[i] for i in keep], keep, arrays, run.layers, run.heads)
            _insert(con, run, "head_stats", ("sample_id", "layer", "head", *arrays), heads)
            con.execute("UPDATE runs SET n_samples = n_samples + ? WHERE run_id = ?", [len(keep), run.run_id])
    run.done_ids.update(ids[i] for i in keep)
    return len(keep)


def finish_run(
    con: duckdb.DuckDBPyConnection,
    run_id: int,
    status: str,
    accuracy: float | None,
    skipped: Mapping[str, Any] | None,
) -> None:
    """Close a run with its final status, accuracy and the samples it had to skip (reason counts or ids); the
    caller has checked `status` (`check_status`)."""
    if accuracy is not None and math.isnan(float(accuracy)):
        accuracy = None
    con.execute(
        "UPDATE runs SET status = ?, finished = ?, accuracy = ?, skipped = ?, "
        "n_samples = (SELECT count(*) FROM samples WHERE run_id = ?) WHERE run_id = ?",
        [status, now(), None if accuracy is None else float(accuracy), None if skipped is None else dumps(skipped),
         run_id, run_id],
    )


def mark(con: duckdb.DuckDBPyConnection, run_id: int, status: str) -> None:
    """Set a checked status (`check_status`); the run counts as finished now unless it is `running` again."""
    finished = None if status == "running" else now()
    con.execute("UPDATE runs SET status = ?, finished = ? WHERE run_id = ?", [status, finished, run_id])


def check_status(status: str) -> None:
    """StoreError unless `status` is one the runs table allows."""
    if status not in STATUSES:
        raise StoreError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")


def _insert(con: duckdb.DuckDBPyConnection, run: RunHandle, table: str, columns: Sequence[str],
            data: pa.Table) -> None:
    """Insert an Arrow table in one statement (never row by row): 1M head rows per run must be cheap."""
    view = f"vheads_batch_{table}"
    con.register(view, data)
    try:
        names = ", ".join(columns)
        con.execute(f"INSERT INTO {table} (run_id, {names}) SELECT ?, {names} FROM {view}", [run.run_id])
    finally:
        con.unregister(view)


def _samples_table(samples: Sequence[Mapping[str, Any]], keep: list[int]) -> pa.Table:
    """The kept samples as an Arrow table with the samples-table types (unknown keys are a caller bug)."""
    allowed = {"sample_id", *SAMPLE_FIELDS}
    columns = {"sample_id": pa.array([_sample_id(samples[i]) for i in keep], pa.string())}
    for i in keep:
        unknown = set(samples[i]) - allowed
        if unknown:
            raise StoreError(f"sample {samples[i]['sample_id']}: unknown fields {sorted(unknown)}")
    for name, kind in SAMPLE_TYPES.items():
        values = [_cell(name, samples[i].get(name)) for i in keep]
        columns[name] = pa.array(values, kind)
    return pa.table(columns)


def _cell(name: str, value: Any) -> Any:
    """One sample field converted to its column's Python type (answers may be ints, flags numpy bools)."""
    if value is None:
        return None
    if name == "meta":
        return dumps(value)
    kind = SAMPLE_TYPES[name]
    if kind == pa.bool_():
        return bool(value)
    if kind == pa.int32():
        return int(value)
    if kind == pa.float64():
        return None if math.isnan(float(value)) else float(value)
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


def _sample_id(sample: Mapping[str, Any]) -> str:
    try:
        return str(sample["sample_id"])
    except KeyError:
        raise StoreError(f"a sample has no sample_id: {dict(sample)!r:.200}") from None


def add_groundings(con: duckdb.DuckDBPyConnection, run_id: int, selector: str, heads: Sequence[str],
                   rows: Sequence[Mapping[str, Any]], source: str) -> None:
    """Keep the boxes one head set drew on a run's samples, replacing the earlier ones of that selector chosen on
    that `source` run (one transaction). Each row: sample_id, the box x1 y1 x2 y2 (None: no box), targets,
    pointing, iou (None: not scored)."""
    created = now()
    values = [[run_id, source, selector, dumps(list(heads)), str(r["sample_id"]),
               *(None if r.get(k) is None else float(r[k]) for k in ("x1", "y1", "x2", "y2")),
               dumps(r.get("targets")), None if r.get("pointing") is None else bool(r["pointing"]),
               None if r.get("iou") is None else float(r["iou"]), created] for r in rows]
    with transaction(con):
        con.execute("DELETE FROM groundings WHERE run_id = ? AND source = ? AND selector = ?",
                    [run_id, source, selector])
        if values:
            con.executemany("INSERT INTO groundings (run_id, source, selector, heads, sample_id, x1, y1, x2, y2, "
                            "targets, pointing, iou, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            values)


def add_predictions(con: duckdb.DuckDBPyConnection, rows: Sequence[Mapping[str, Any]], heads: str | None,
                    fit: Sequence[str]) -> None:
    """Keep predicted error probabilities, replacing the earlier ones of each (run, predictor) they cover (one
    transaction, one insert). Each row: run_id, predictor, sample_id, p_error, fold; `heads` names the head set,
    `fit` the runs the model was cross-validated over."""
    data = pa.table({
        "run_id": pa.array([int(r["run_id"]) for r in rows], pa.int32()),
        "predictor": pa.array([str(r["predictor"]) for r in rows], pa.string()),
        "sample_id": pa.array([str(r["sample_id"]) for r in rows], pa.string()),
        "p_error": pa.array([float(r["p_error"]) for r in rows], pa.float64()),
        "fold": pa.array([None if r.get("fold") is None else int(r["fold"]) for r in rows], pa.int32()),
    })
    covered = sorted({(int(r["run_id"]), str(r["predictor"])) for r in rows})
    view = "vheads_batch_predictions"
    with transaction(con):
        for run_id, predictor in covered:
            con.execute("DELETE FROM predictions WHERE run_id = ? AND predictor = ?", [run_id, predictor])
        con.register(view, data)
        try:
            con.execute("INSERT INTO predictions (run_id, predictor, sample_id, p_error, fold, heads, fit, created) "
                        f"SELECT run_id, predictor, sample_id, p_error, fold, ?, ?, ? FROM {view}",
                        [heads, dumps(list(fit)), now()])
        finally:
            con.unregister(view)


def add_accuracy_estimates(con: duckdb.DuckDBPyConnection, rows: Sequence[Mapping[str, Any]], features: str,
                           train: Sequence[str]) -> None:
    """Keep runs' accuracy estimates, replacing earlier ones of the same run, role and estimator (one transaction).
    Each row: run_id, role (`target`, or `left-out` for leave-one-run-out), estimator, estimate."""
    created = now()
    values = [[int(r["run_id"]), str(r["role"]), str(r["estimator"]),
               None if r.get("estimate") is None or math.isnan(float(r["estimate"])) else float(r["estimate"]),
               features, dumps(list(train)), created] for r in rows]
    with transaction(con):
        for v in values:
            con.execute("DELETE FROM accuracy_estimates WHERE run_id = ? AND role = ? AND estimator = ?", v[:3])
        if values:
            con.executemany("INSERT INTO accuracy_estimates (run_id, role, estimator, estimate, features, train, "
                            "created) VALUES (?, ?, ?, ?, ?, ?, ?)", values)
