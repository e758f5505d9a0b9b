"""`BatchWriter`: stores a run's batches on a background thread while the next batch computes.

DuckDB releases the GIL while it inserts and commits, so writing batch k overlaps generating batch k+1
instead of adding to it. Batches are stored in order, each in its own transaction (`Store.add_batch`); at
most `depth` computed batches wait in memory. Closing waits until every submitted batch is stored, on an
interrupt too, so nothing computed is lost; a write error stops the writer and is raised in the caller.
While it runs, DuckDB works on one thread: inserting a batch gains nothing from more, and the model
needs the cores. One writer may store the batches of several runs of its store (`submit(..., run=)`), and
`call` runs any other store work (starting, finishing a run) on the same thread, in order. The store file is
open only while there is work: other processes read the store between batches, and batches that queue up while
one is stored are stored in one opening of the file (for up to `HOLD_S`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from vheads.capture import HeadFigures
from vheads.store import RunHandle, Store

log = logging.getLogger("vheads.run")

_STOP = object()
# The longest the writer keeps the store file open for batches queued back to back, so that readers waiting for it
# (`schema.OPEN_WAIT_S`) get in even while the writer is behind.
HOLD_S = 1.0


class BatchWriter:
    """Context manager owning the store's connection for the run's batches until it is closed.

    While it is open, nothing else may use `store`. `on_stored(rows)` is called on the writer thread after
    each batch commits.
    """

    def __init__(self, store: Store, run: RunHandle | None, depth: int = 2,
                 on_stored: Callable[[Sequence[Mapping[str, Any]]], None] | None = None):
        self.store = store
        self.run = run
        self.on_stored = on_stored
        self.error: BaseException | None = None
        self._abandon = False
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        store.set_threads(1)
        name = run.name if run else store.path.name
        self._thread = threading.Thread(target=self._work, name=f"vheads-writer-{name}", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, rows: Sequence[Mapping[str, Any]], figures: HeadFigures, run: RunHandle | None = None) -> None:
        """Queue one batch (sample rows and their head figures) of `run` (default: the writer's run).

        Raises the writer's error if a write failed.
        """
        if self._closed:
            raise RuntimeError("BatchWriter is closed")
        self._raise_error()
        self._queue.put((run or self.run, list(rows), figures))

    def call(self, work: Callable[[Store], Any]) -> Future:
        """Run `work(store)` on the writer thread after the batches queued before it; its result as a future."""
        if self._closed:
            raise RuntimeError("BatchWriter is closed")
        self._raise_error()
        future: Future = Future()
        self._queue.put((work, future))
        return future

    def close(self) -> None:
        """Wait until every submitted batch is stored, then raise the first write error if there was one.

        A second interrupt while waiting stops the writer after the transaction in progress (that batch is
        stored whole or not at all; the ones after it are dropped) and is re-raised.
        """
        if not self._closed:
            self._closed = True
            try:
                self._queue.put(_STOP)
                self._thread.join()
            except KeyboardInterrupt:
                self._abandon = True
                self._queue.put(_STOP)
                self._thread.join()
                raise
            finally:
                self.store.set_threads(None)
        self._raise_error()

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as error:  # noqa: BLE001 - the exception already in flight is the one to report
            log.error("could not store a finished batch: %s", error)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        item = self._queue.get()
        while item is not _STOP:
            if self.error is not None or self._abandon:
                self._do(item)  # skipped, or its future failed: no need for the file
                item = self._queue.get()
                continue
            try:
                with self.store.keep_open():  # one open of the store file for the work queued back to back
                    opened = time.monotonic()
                    while item is not None and item is not _STOP:
                        self._do(item)
                        item = self._next() if time.monotonic() - opened < HOLD_S else None
            except BaseException as error:  # noqa: BLE001 - the file could not be opened or closed: to the caller
                self.error = error
            if item is None:
                item = self._queue.get()

    def _next(self) -> Any:
        """The next queued item if there is one already, else None."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _do(self, item: tuple) -> None:
        """Store one queued batch, or run one queued `call`."""
        if len(item) == 2:
            self._call(*item)
            return
        if self.error is None and not self._abandon:
            self._store(*item)

    def _store(self, run: RunHandle, rows: list[Mapping[str, Any]], figures: HeadFigures) -> None:
        try:
            self.store.add_batch(run, rows, **figures.values)
            if self.on_stored is not None:
                self.on_stored(rows)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            self.error = error

    def _call(self, work: Callable[[Store], Any], future: Future) -> None:
        if self.error is not None or self._abandon:
            future.set_exception(self.error or RuntimeError("BatchWriter was stopped"))
            return
        try:
            future.set_result(work(self.store))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(error)
