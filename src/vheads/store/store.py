"""`Store`: one open store file and its verbs, each done by the module that holds its job (`write`, `read`).

A reader keeps its connection for its whole life, so everything it reads comes from one state of the store. A
writer holds the writer lock (`lock`) for its whole life, reads through a read-only connection that other readers
share, and opens the DuckDB file for writing only during each write (a batch, a run started or finished), so other
processes can read the store between two batches of a run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from vheads.store import lock, read, write
from vheads.store.schema import WRITER_PAUSE_S, StoreError, check_path, connect, open_store
from vheads.store.write import RunHandle

RunRef = RunHandle | str | int


class Store:
    """An open results store; use as a context manager so the file is closed and unfinished runs are marked."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._open_runs: dict[int, RunHandle] = {}
        self._threads: int | None = None
        self._closed = False
        self._writing = False  # whether `_con` is a writer's connection opened for the write in progress
        self._released = 0.0
        if not read_only:
            check_path(self.path, read_only)
            lock.acquire(self.path)
        try:
            self._con: duckdb.DuckDBPyConnection | None = open_store(self.path, read_only)
        except BaseException:
            if not read_only:
                lock.release(self.path)
            raise
        self._hold = read_only or not lock.SUPPORTED  # one connection for life: a reader's, or where no lock works
        if not self._hold:
            self._release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        crashed = exc_type is not None and not issubclass(exc_type, KeyboardInterrupt | SystemExit)
        self.close(status="failed" if crashed else "interrupted")

    def close(self, status: str = "interrupted") -> None:
        """Mark runs started here but not finished with `status`, then release the file and the writer lock."""
        if self._closed:
            return
        try:
            for run_id in list(self._open_runs):
                self.mark(run_id, status)
        finally:
            self._closed = True
            if self._con is not None:
                self._release()
            if not self.read_only:
                lock.release(self.path)

    def start_run(self, name: str, **settings: Any) -> RunHandle:
        """Create run `name`, or with `resume=True` reopen it so the pipeline skips the samples already stored.

        The settings are the keywords of `write.start_run`: model, family, dataset, split, layers, heads, readout,
        ablation, config, and optionally resume, curve, shard and tags.
        """
        self._require_writable()
        with self._connection(write=True) as con:
            run = write.start_run(con, name, **settings)
        self._open_runs[run.run_id] = run
        return run

    def add_batch(self, run: RunHandle, samples: Sequence[Mapping[str, Any]], *arrays: np.ndarray | None,
                  **named: np.ndarray | None) -> int:
        """Store one batch in one transaction (all rows or none), skipping stored samples; returns how many were new.

        The figures are the stored ones of `vheads.figures.FIGURES`, by name (`pointing=...`) or, in their declared
        order, by position (visual_weight, concentration, region_weight, text_weight, sink_weight, ...). Each is
        `[batch, layers, heads]`, row i belonging to `samples[i]`; NaN is stored as NULL, and a figure given as None
        or not given (not measured) is all NULL.
        """
        self._require_writable()
        if run.run_id not in self._open_runs:
            raise StoreError(f"run {run.name} is not open for writing here; start_run(..., resume=True) first")
        with self._connection(write=True) as con:
            return write.add_batch(con, run, samples, write.figure_arrays(arrays, named))

    def finish_run(
        self,
        run: RunRef,
        status: str = "done",
        accuracy: float | None = None,
        skipped: Mapping[str, Any] | None = None,
    ) -> None:
        """Close a run with its final status, accuracy and the samples it had to skip (reason counts or ids)."""
        self._require_writable()
        write.check_status(status)
        with self._connection(write=True) as con:
            run_id = self._resolve(run)
            write.finish_run(con, run_id, status, accuracy, skipped)
        self._open_runs.pop(run_id, None)

    def set_threads(self, threads: int | None) -> None:
        """Limit the threads DuckDB uses on this store's connections (None: back to its default, one per core)."""
        self._threads = threads
        if self._con is not None:
            self._con.execute("RESET threads" if threads is None else f"SET threads = {int(threads)}")

    def mark(self, run_name: str | int, status: str) -> None:
        """Set a run's status by hand, e.g. to flag one as failed after the fact."""
        self._require_writable()
        write.check_status(status)
        with self._connection(write=True) as con:
            run_id = self._resolve(run_name)
            write.mark(con, run_id, status)
        if status != "running":
            self._open_runs.pop(run_id, None)

    def runs(self) -> pd.DataFrame:
        """Every run, oldest first, with config / skipped / tags decoded from JSON."""
        with self._connection() as con:
            return read.runs(con)

    def run(self, name_or_id: RunRef) -> dict[str, Any]:
        """One run's row as a dict, by name, id, `name:TEXT` or `id:N`; an unknown or ambiguous reference raises
        StoreError (see `read.run_id`)."""
        with self._connection() as con:
            row = read.run_row_by_id(con, self._resolve(name_or_id))
        row.pop("writer_pid")
        return row

    def samples(self, run: RunRef) -> pd.DataFrame:
        """A run's samples (prediction, answer, correct, token counts), ordered by sample id."""
        with self._connection() as con:
            return read.samples(con, self._resolve(run))

    def head_stats(self, run: RunRef) -> pd.DataFrame:
        """A run's per-sample, per-head figures (layers x heads rows per sample); NULL reads as NaN."""
        with self._connection() as con:
            return read.head_stats(con, self._resolve(run))

    def head_means(self, run: RunRef, where: str | None = None) -> pd.DataFrame:
        """Per (layer, head): every declared figure reduced over a run's samples (its mean; NULLs such as undefined C
        or no box left out), n and n_concentration; `where` (SQL over head_stats h, samples s) keeps some samples."""
        with self._connection() as con:
            return read.head_means(con, self._resolve(run), where)

    def add_groundings(self, run: RunRef, selector: str, heads: Sequence[str],
                       rows: Sequence[Mapping[str, Any]], source: RunRef | None = None) -> None:
        """Keep the boxes one head set drew on a run's samples, its heads chosen on run `source` (default: the run
        itself); see `write.add_groundings`."""
        self._require_writable()
        run_id = self._resolve(run)
        source_id = self._resolve(run if source is None else source)
        with self._connection(write=True) as con:
            name = read.run_row_by_id(con, source_id)["name"]
            write.add_groundings(con, run_id, selector, heads, rows, name)

    def groundings(self, run: RunRef) -> pd.DataFrame:
        """The boxes kept for a run by `add_groundings`, newest selector first."""
        with self._connection() as con:
            return read.groundings(con, self._resolve(run))

    def add_predictions(self, rows: Sequence[Mapping[str, Any]], heads: str | None, fit: Sequence[RunRef]) -> None:
        """Keep per-sample error predictions (rows: run, predictor, sample_id, p_error, fold; run by handle, name or
        id), replacing the earlier ones of each (run, predictor); `fit` names the runs cross-validated together."""
        self._require_writable()
        ids = {run: self._resolve(run) for run in {r["run"] for r in rows}}
        rows = [{**r, "run_id": ids[r["run"]]} for r in rows]
        fit_ids = [self._resolve(run) for run in fit]
        with self._connection(write=True) as con:
            names = [read.run_row_by_id(con, run_id)["name"] for run_id in fit_ids]
            write.add_predictions(con, rows, heads, names)

    def predictions(self, run: RunRef | None = None) -> pd.DataFrame:
        """Stored error predictions with their samples' question, answer, prediction and correctness."""
        run_id = None if run is None else self._resolve(run)
        with self._connection() as con:
            return read.predictions(con, run_id)

    def add_accuracy_estimates(self, rows: Sequence[Mapping[str, Any]], features: str,
                               train: Sequence[RunRef]) -> None:
        """Keep runs' accuracy estimates (rows: run, role, estimator, estimate), replacing earlier ones of the same
        run, role and estimator; `train` names the runs the estimates were fitted on."""
        self._require_writable()
        rows = [{**r, "run_id": self._resolve(r["run"])} for r in rows]
        train_ids = [self._resolve(run) for run in train]
        with self._connection(write=True) as con:
            names = [read.run_row_by_id(con, run_id)["name"] for run_id in train_ids]
            write.add_accuracy_estimates(con, rows, features, names)

    def accuracy_estimates(self) -> pd.DataFrame:
        """Stored accuracy estimates with each run's name and stored accuracy."""
        with self._connection() as con:
            return read.accuracy_estimates(con)

    def query(self, sql: str, params: Sequence[Any] | None = None, exact: bool = False) -> pd.DataFrame:
        """Run any SQL on the store; a DuckDB error becomes a one-line StoreError.

        `exact` keeps DuckDB's values as they are (what `vheads query` prints): object columns, NULL as None apart
        from NaN, integers beyond 2^53 exact, JSON columns parsed (`read.query_exact`).
        """
        with self._connection(write=self._writes(sql)) as con:
            return (read.query_exact if exact else read.query)(con, sql, params)

    def export(self, run: RunRef | None, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
        """Write every table of the store as Parquet files, restricted to one run's rows unless `run` is None.

        Raises StoreError naming the files already there unless `overwrite`.
        """
        with self._connection() as con:
            run_id = None if run is None else self._resolve(run)
            return read.export(con, run_id, Path(out_dir), overwrite)

    @contextmanager
    def keep_open(self) -> Iterator[None]:
        """Open the file for writing once for every verb inside (a writer otherwise opens and closes it per write):
        for back-to-back batches, which readers then wait for as for one."""
        with self._connection(write=True):
            yield

    def _require_writable(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        if self.read_only:
            raise StoreError(f"store {self.path} was opened read-only")

    def _resolve(self, ref: RunRef) -> int:
        """The run_id of a handle, name, id, `name:TEXT` or `id:N`; unknown or ambiguous -> StoreError."""
        if isinstance(ref, RunHandle):
            return ref.run_id
        with self._connection() as con:
            return read.run_id(con, ref, self.path)

    def _writes(self, sql: str) -> bool:
        """Whether `sql` may change a writable store (holds any statement but a SELECT); a reader's never does."""
        if self.read_only:
            return False
        try:
            with self._connection() as con:
                statements = con.extract_statements(sql)
        except duckdb.Error:  # not SQL: `read.query` reports it
            return False
        return any(statement.type != duckdb.StatementType.SELECT for statement in statements)

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """The connection for one verb. A reader keeps its own for its life. A writer reads through a read-only
        connection, which other processes' readers can share and which it keeps until its next write; for a write it
        opens the file for writing (waiting as long as another process reads it) and closes it after the verb, so
        that other processes can read the store between two batches."""
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        if self._con is not None and (self._hold or self._writing or not write):
            yield self._con  # a reader's, a read-only one for a read, or the one of the write in progress
            return
        if self._con is not None:
            self._release()  # the read-only connection: a process writes through one connection alone
        if not write:
            self._con = self._connect(read_only=True)
            yield self._con
            return
        pause = self._released + WRITER_PAUSE_S - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        self._con = self._connect(read_only=False)
        self._writing = True
        try:
            yield self._con
        finally:
            self._release()

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A writer's new connection, with the thread limit it was given."""
        con = connect(self.path, read_only=read_only, wait_forever=not read_only)
        if self._threads is not None:
            con.execute(f"SET threads = {int(self._threads)}")
        return con

    def _release(self) -> None:
        """Close the connection (a writer's commits are in the file then); after a write, note when, so that the
        next one waits `WRITER_PAUSE_S` for readers."""
        con, self._con = self._con, None
        con.close()
        if self._writing:
            self._writing = False
            self._released = time.monotonic()

def check_writable(path: str | Path) -> None:
    """Fail now, before a model is loaded, if the store cannot be opened for writing; creates it if absent."""
    Store(path).close()
