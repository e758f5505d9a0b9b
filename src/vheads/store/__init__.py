"""The results store: one embedded DuckDB file holding every run, its samples and per-head attention figures.

Each batch is committed in one transaction as it finishes, so a run killed at any moment resumes with no
duplicate and no lost row. Shards of one run write their own files (`shard_path`) and `merge` folds them in.

Concurrency, as DuckDB behaves: a file open for writing is locked to that one process, and no other
process can open it at all, not even read-only (`StoreError` naming the holder's pid). Several processes
may read one store at the same time, and while they do none can open it for writing. A run left `running`
by a killed process is marked `interrupted` the next time a process opens the store for writing, because
the lock proves nobody is writing it. Times are UTC.

The modules, one job each: `schema` (tables, opening and locking), `write` (runs and their batches, resume),
`merge`, `read` (runs, samples, figures, SQL, Parquet export) and `store` (the `Store` object).
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
    check_writable,
    create_schema,
)
from vheads.store.store import RunRef, Store
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
