"""The writer lock: one process at a time writes a store, while the store file itself stays free between commits.

DuckDB lets one process open a file for writing, and while it is open no other process may open it, not even to
read. So a writer (a writable `Store`, a merge) opens the DuckDB file only for each operation (a batch, a run started
or finished) and holds this lock for its whole life instead: an advisory `flock` on `<store>.lock`, holding the
writer's pid, that a second writer cannot take. Readers never touch it. The kernel drops the lock when its process
dies, so a killed run leaves nothing that blocks the next one; the last holder removes the file when it is done.
Writable stores of one process share the lock (as DuckDB shares one open file within a process).

Where `fcntl` is missing (Windows), `SUPPORTED` is False: a writer keeps the DuckDB file open for its whole life
and DuckDB's own lock excludes every other process, readers included.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from vheads.store.schema import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SUPPORTED = fcntl is not None

_held: dict[Path, list[int]] = {}  # store path -> [lock file descriptor, writable stores of this process using it]
_guard = threading.Lock()


def lock_path(path: Path) -> Path:
    """The lock file of the store at `path` (`vheads.duckdb` -> `vheads.duckdb.lock`)."""
    return path.with_name(path.name + ".lock")


def acquire(path: Path) -> None:
    """Take the writer lock of the store at `path` for this process; StoreError naming the pid that holds it."""
    if not SUPPORTED:
        return
    key = Path(os.path.realpath(path))
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return
        lock = lock_path(key)
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise StoreError(f"cannot write store {path}: {error.strerror}") from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = _read_pid(fd)
                os.close(fd)
                raise StoreError(
                    f"store {path} is in use by another process ({pid}), "
                    "which is writing it; one process writes a store at a time: wait for it to finish, or use "
                    "another store"
                ) from None
            if _same_file(fd, lock):
                break
            os.close(fd)  # its last holder removed that file after we opened it: lock the one at the path now
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = [fd, 1]


def release(path: Path) -> None:
    """Give back one use of this process's writer lock on `path`; the last one removes the lock file and unlocks."""
    if not SUPPORTED:
        return
    key = Path(os.path.realpath(path))
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            lock_path(key).unlink(missing_ok=True)  # while still locked, so no one can lock a file about to vanish
            os.close(entry[0])


def holder(path: Path) -> str | None:
    """The process writing the store at `path` (`pid 123`), or None when none is."""
    if not SUPPORTED:
        return None
    key = Path(os.path.realpath(path))
    with _guard:
        if key in _held:
            return f"pid {os.getpid()}"
    try:
        fd = os.open(lock_path(key), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_pid(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> str:
    """The pid a lock file holds, as `pid 123` (`pid unknown` if it holds none yet)."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path` (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False
