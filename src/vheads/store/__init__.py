"""The results store: one embedded DuckDB file holding every run, its samples and per-head attention figures.

Each batch is committed in one transaction as it finishes, so a run killed at any moment resumes with no
duplicate and no lost row. Shards of one run write their own files (`shard_path`) and `merge` folds them in.

Concurrency: DuckDB locks a file open for writing to that one process, not even readers may open it beside.
So one process at a time writes a store, holding the writer lock (`lock`, `<store>.lock`) for its whole life
and the DuckDB file open for writing only while it stores a batch (or starts, finishes, marks a run; it reads
through a read-only connection); other processes read the committed batches in between, each reader keeping
the file for its whole command (one consistent state). An opener that finds the file held waits for it
(`schema.OPEN_WAIT_S`), a writer mid-run as long as it takes. A second writer gets a `StoreError` naming the
first's pid. A run left `running` by a killed process is marked `interrupted` the next time a process opens
the store for writing, because the writer lock proves nobody is writing it. Times are UTC.

The modules, one job each: `schema` (tables, opening a file), `lock` (the writer lock), `write` (runs and their
batches, resume), `merge`, `read` (runs, samples, figures, SQL, Parquet export) and `store` (the `Store` object).
"""

from vheads.store.merge import MergeSummary, merge
from vheads.store.schema import (
    COMPAT_FIELDS,
    HEAD_FIELDS,
    PREDICTORS,
    SAMPLE_FIELDS,
    SCHEMA_VERSION,
    STATUSES,
    StoreError,
    create_schema,
)
from vheads.store.store import RunRef, Store, check_writable
from vheads.store.write import RunHandle, shard_path

__all__ = [
    "COMPAT_FIELDS",
    "HEAD_FIELDS",
    "SAMPLE_FIELDS",
    "SCHEMA_VERSION",
    "STATUSES",
    "PREDICTORS",
    "MergeSummary",
    "RunHandle",
    "RunRef",
    "Store",
    "StoreError",
    "check_writable",
    "create_schema",
    "merge",
    "shard_path",
]
