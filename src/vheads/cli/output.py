"""What the command line prints: tables, CSV and JSON from one DataFrame, literal user text, and progress.

User text (run names, paths, questions, error messages) is never read as Rich markup or emoji codes.
Missing values read `—` in tables, empty in CSV and null in JSON.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(emoji=False, highlight=False)
err = Console(stderr=True, emoji=False, highlight=False)

FORMATS = ("table", "csv", "json")
MISSING = "—"


def check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    """`fmt` when it is one of `allowed`; ValueError naming --format otherwise."""
    if fmt not in allowed:
        raise ValueError(f"unknown --format {fmt!r}; expected {', '.join(allowed)}")
    return fmt


def is_missing(value: Any) -> bool:
    """None, NaN, pandas NA or NaT."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def cell(value: Any, floats: str = "{:.3f}") -> str:
    """One table cell as text: floats formatted, missing values as `—`."""
    if is_missing(value):
        return MISSING
    if isinstance(value, float):
        return floats.format(value)
    return str(value)


def frame_table(frame: pd.DataFrame, title: str | None = None, floats: str = "{:.3f}",
                headers: Mapping[str, str] | None = None, legend: str | None = None) -> Table:
    """A rich table of a DataFrame that wraps rather than cuts: long text folds, numbers never wrap.

    `headers` renames columns for the terminal only; `legend` is printed under the table.
    """
    table = Table(title=Text(title) if title else None, header_style="bold",
                  caption=Text(legend) if legend else None, caption_justify="left")
    rows = [[cell(v, floats) for v in row] for row in frame.itertuples(index=False)]
    for i, column in enumerate(frame.columns):
        numeric = frame[column].dtype.kind in "iuf"
        label = (headers or {}).get(str(column), str(column).replace("_", " "))
        widest = max([len(row[i]) for row in rows] + [1])
        word = max(len(w) for w in label.split()) if label.strip() else 1
        table.add_column(Text(label), justify="right" if numeric else "left", overflow="fold",
                         min_width=max(widest, min(word, 8)) if numeric else min(widest, word, 12))
    for row in rows:
        table.add_row(*[Text(value) for value in row])
    return table


def json_value(value: Any) -> Any:
    """A value JSON can hold: missing as None, numpy scalars and arrays as Python numbers and lists."""
    if isinstance(value, list | tuple | dict):
        return value
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:
        return value.tolist()
    if is_missing(value):
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a DataFrame as JSON-ready dicts."""
    return [{str(k): json_value(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def emit(frame: pd.DataFrame, fmt: str, title: str | None = None, headers: Mapping[str, str] | None = None,
         legend: str | None = None) -> None:
    """Print a DataFrame as a table (to the terminal's width), CSV or JSON records."""
    check_format(fmt)
    if fmt == "csv":
        sys.stdout.write(frame.to_csv(index=False, na_rep=""))
    elif fmt == "json":
        sys.stdout.write(json.dumps(records(frame), indent=2, default=str) + "\n")
    else:
        console.print(frame_table(frame, title, headers=headers, legend=legend))


def emit_many(frames: Mapping[str, pd.DataFrame], fmt: str) -> None:
    """Several tables at once: JSON as one object of record lists, CSV as `# name` sections."""
    check_format(fmt, ("csv", "json"))
    if fmt == "json":
        sys.stdout.write(json.dumps({k: records(f) for k, f in frames.items()}, indent=2, default=str) + "\n")
        return
    for name, frame in frames.items():
        sys.stdout.write(f"# {name}\n" + frame.to_csv(index=False, na_rep="") + "\n")


def say(text: str, to: Console | None = None) -> None:
    """Print one line of plain text (no markup, emoji or highlighting), soft-wrapped."""
    (to or console).print(text, markup=False, emoji=False, highlight=False, soft_wrap=True)


def duration(seconds: float) -> str:
    """`42 s`, `3m05s` or `1h02m`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressView:
    """Progress of one or more labelled tasks: a live bar with ETA on a terminal, else a plain line every
    `every` seconds (and at the end of each task), so logs stay short; `status` says what is being prepared."""

    def __init__(self, to: Console | None = None, every: float = 10.0):
        self.console = to or err
        self.every = every
        self.live = self.console.is_terminal
        self.tasks: dict[str, Any] = {}
        self.printed: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.first: dict[str, int] = {}
        self.status_task: Any = None
        self.bar: Any = None
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[note]}", markup=False),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=self.console, transient=False)

    def __enter__(self) -> ProgressView:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear_status()
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def status(self, text: str) -> None:
        """Show what is happening before the counting starts (loading a model, reading data)."""
        if self.bar is None:
            say(text, self.console)
            return
        self.clear_status()
        self.status_task = self.bar.add_task(text, total=None, note="")

    def clear_status(self) -> None:
        """Remove the status line (the first update does this)."""
        if self.bar is not None and self.status_task is not None:
            self.bar.remove_task(self.status_task)
            self.status_task = None

    def update(self, label: str, done: int, total: int, note: str = "", unit: str = "samples") -> None:
        """`done` of `total` items of the task `label`, with a short note (rate, running accuracy); the ETA counts the
        items done since the task's first update (a resumed run starts part done)."""
        now = time.monotonic()
        self.started.setdefault(label, now)
        first = self.first.setdefault(label, done)
        if self.bar is not None:
            self.clear_status()
            if label not in self.tasks:
                self.tasks[label] = self.bar.add_task(label, total=total, completed=done, note=note)
            self.bar.update(self.tasks[label], completed=done, total=total, note=note)
            return
        last = self.printed.get(label)
        if last is not None and done < total and now - last < self.every:
            return
        self.printed[label] = now
        elapsed = now - self.started[label]
        share = f" ({100 * done / total:.0f}%)" if total else ""
        new = done - first
        eta = f", ETA {duration(elapsed / new * (total - done))}" if 0 < new and done < total and elapsed > 0 else ""
        say(f"{label}: {done}/{total} {unit}{share}" + (f", {note}" if note else "") + eta, self.console)
