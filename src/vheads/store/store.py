"""`Store`: one open store file and its verbs, each done by the module that holds its job (`write`, `read`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vheads.store import read, write
from vheads.store.schema import StoreError, open_store
from vheads.store.write import RunHandle

RunRef = RunHandle | str | int


class Store:
    """An open results store; use as a context manager so the file is closed and unfinished runs are marked."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._open_runs: dict[int, RunHandle] = {}
        self._con = open_store(self.path, read_only)

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

    def start_run(self, name: str, **settings: Any) -> RunHandle:
        """Create run `name`, or with `resume=True` reopen it so the pipeline skips the samples already stored.

        The settings are the keywords of `write.start_run`: model, family, dataset, split, layers, heads, readout,
        ablation, config, and optionally resume, curve, shard and tags.
        """
        self._require_writable()
        run = write.start_run(self._con, name, **settings)
        self._open_runs[run.run_id] = run
        return run

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
        figures = (visual_weight, concentration, region_weight, text_weight, sink_weight, pointing, spatial_entropy)
        return write.add_batch(self._con, run, samples, figures)

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
        run_id = self._resolve(run)
        write.finish_run(self._con, run_id, status, accuracy, skipped)
        self._open_runs.pop(run_id, None)

    def set_threads(self, threads: int | None) -> None:
        """Limit the threads DuckDB uses on this connection (None: back to its default, one per core)."""
        if self._con is not None:
            self._con.execute("RESET threads" if threads is None else f"SET threads = {int(threads)}")

    def mark(self, run_name: str | int, status: str) -> None:
        """Set a run's status by hand, e.g. to flag one as failed after the fact."""
        self._require_writable()
        write.check_status(status)
        run_id = self._resolve(run_name)
        write.mark(self._con, run_id, status)
        if status != "running":
            self._open_runs.pop(run_id, None)

    def runs(self) -> pd.DataFrame:
        """Every run, oldest first, with config / skipped / tags decoded from JSON."""
        return read.runs(self._con)

    def run(self, name_or_id: RunRef) -> dict[str, Any]:
        """One run's row as a dict, by name, id, `name:TEXT` or `id:N`; an unknown or ambiguous reference raises
        StoreError (see `read.run_id`)."""
        row = read.run_row_by_id(self._con, self._resolve(name_or_id))
        row.pop("writer_pid")
        return row

    def samples(self, run: RunRef) -> pd.DataFrame:
        """A run's samples (prediction, answer, correct, token counts), ordered by sample id."""
        return read.samples(self._con, self._resolve(run))

    def head_stats(self, run: RunRef) -> pd.DataFrame:
        """A run's per-sample, per-head figures (layers x heads rows per sample); NULL reads as NaN."""
        return read.head_stats(self._con, self._resolve(run))

    def head_means(self, run: RunRef) -> pd.DataFrame:
        """Per (layer, head) means over a run's samples; NULLs (undefined C, no box) are left out of each mean."""
        return read.head_means(self._con, self._resolve(run))

    def add_groundings(self, run: RunRef, selector: str, heads: Sequence[str],
                       rows: Sequence[Mapping[str, Any]], source: RunRef | None = None) -> None:
        """Keep the boxes one head set drew on a run's samples, its heads chosen on run `source` (default: the run
        itself); see `write.add_groundings`."""
        self._require_writable()
        run_id = self._resolve(run)
        name = read.run_row_by_id(self._con, self._resolve(run if source is None else source))["name"]
        write.add_groundings(self._con, run_id, selector, heads, rows, name)

    def groundings(self, run: RunRef) -> pd.DataFrame:
        """The boxes kept for a run by `add_groundings`, newest selector first."""
        return read.groundings(self._con, self._resolve(run))

    def add_predictions(self, rows: Sequence[Mapping[str, Any]], heads: str | None, fit: Sequence[RunRef]) -> None:
        """Keep per-sample error predictions (rows: run, predictor, sample_id, p_error, fold; run by handle, name or
        id), replacing the earlier ones of each (run, predictor); `fit` names the runs cross-validated together."""
        self._require_writable()
        ids = {run: self._resolve(run) for run in {r["run"] for r in rows}}
        rows = [{**r, "run_id": ids[r["run"]]} for r in rows]
        names = [read.run_row_by_id(self._con, self._resolve(run))["name"] for run in fit]
        write.add_predictions(self._con, rows, heads, names)

    def predictions(self, run: RunRef | None = None) -> pd.DataFrame:
        """Stored error predictions with their samples' question, answer, prediction and correctness."""
        return read.predictions(self._con, None if run is None else self._resolve(run))

    def add_accuracy_estimates(self, rows: Sequence[Mapping[str, Any]], features: str,
                               train: Sequence[RunRef]) -> None:
        """Keep runs' accuracy estimates (rows: run, role, estimator, estimate), replacing earlier ones of the same
        run, role and estimator; `train` names the runs the estimates were fitted on."""
        self._require_writable()
        rows = [{**r, "run_id": self._resolve(r["run"])} for r in rows]
        names = [read.run_row_by_id(self._con, self._resolve(run))["name"] for run in train]
        write.add_accuracy_estimates(self._con, rows, features, names)

    def accuracy_estimates(self) -> pd.DataFrame:
        """Stored accuracy estimates with each run's name and stored accuracy."""
        return read.accuracy_estimates(self._con)

    def query(self, sql: str, params: Sequence[Any] | None = None, exact: bool = False) -> pd.DataFrame:
        """Run any SQL on the store; a DuckDB error becomes a one-line StoreError.

        `exact` keeps DuckDB's values as they are (what `vheads query` prints): object columns, NULL as None apart
        from NaN, integers beyond 2^53 exact, JSON columns parsed (`read.query_exact`).
        """
        return (read.query_exact if exact else read.query)(self._con, sql, params)

    def export(self, run: RunRef | None, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
        """Write every table of the store as Parquet files, restricted to one run's rows unless `run` is None.

        Raises StoreError naming the files already there unless `overwrite`.
        """
        run_id = None if run is None else self._resolve(run)
        return read.export(self._con, run_id, Path(out_dir), overwrite)

    def _require_writable(self) -> None:
        if self._con is None:
            raise StoreError(f"store {self.path} is closed")
        if self.read_only:
            raise StoreError(f"store {self.path} was opened read-only")

    def _resolve(self, ref: RunRef) -> int:
        """The run_id of a handle, name, id, `name:TEXT` or `id:N`; unknown or ambiguous -> StoreError."""
        return ref.run_id if isinstance(ref, RunHandle) else read.run_id(self._con, ref, self.path)
