"""What the command line prints: tables, CSV and JSON from one DataFrame, literal user text, and progress.

User text (run names, paths, questions, error messages) is never read as Rich markup or emoji codes.
Missing values read `—` in tables, empty in CSV and null in JSON; inf, -inf and NaN (a value, not a missing marker)
read `inf`, `-inf` and `nan` everywhere (JSON strings, so the JSON stays strict). Tables too wide for the terminal
go on in further tables of the remaining columns, never cropped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console, ConsoleOptions
from rich.segment import Segment
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


def cell(value: Any, floats: str = "{:.3f}", nan_is_missing: bool = True) -> str:
    """One table cell as text: floats formatted (`inf`, `-inf`, and `nan` unless NaN marks a missing value),
    lists and objects as JSON, missing values as `—`."""
    if isinstance(value, float | np.floating):
        return MISSING if math.isnan(value) and nan_is_missing else floats.format(value)
    if isinstance(value, list | tuple | dict | np.ndarray):
        return json.dumps(json_value(value), default=str)
    return MISSING if is_missing(value) else str(value)


def _numeric(column: pd.Series) -> bool:
    """Whether a column is right-aligned: a numeric dtype, or objects that are all numbers (missing ones aside)."""
    if column.dtype.kind in "iuf":
        return True
    values = [v for v in column if v is not None and v is not pd.NA]
    return column.dtype == object and bool(values) and all(
        isinstance(v, int | float | Decimal | np.number) and not isinstance(v, bool) for v in values)


def _nan_is_missing(series: pd.Series) -> bool:
    """Whether NaN marks a missing value in this column: so in pandas float columns; a column of objects (as `vheads
    query` builds them) holds None for NULL, and NaN there is a value."""
    return series.dtype.kind == "f"


def frame_table(frame: pd.DataFrame, title: str | None = None, floats: str = "{:.3f}",
                headers: Mapping[str, str] | None = None, legend: str | None = None) -> FrameTable:
    """A DataFrame for the terminal that wraps rather than cuts: long text folds, numbers never wrap, and columns
    that do not fit side by side go on in a further table below (see `FrameTable`).

    `headers` renames columns for the terminal only; `legend` is printed under the (last) table.
    """
    return FrameTable(frame, title, floats, headers, legend)


class FrameTable:
    """A DataFrame as one rich table when it fits the width it is printed at, else as several tables of the columns
    that fit side by side, the first column repeated in each as the key and the title saying which columns each
    shows: a wide result is wrapped, never cropped."""

    def __init__(self, frame: pd.DataFrame, title: str | None = None, floats: str = "{:.3f}",
                 headers: Mapping[str, str] | None = None, legend: str | None = None) -> None:
        self.title, self.legend = title, legend
        self.labels = [(headers or {}).get(str(c), str(c).replace("_", " ")) for c in frame.columns]
        columns = [frame.iloc[:, i] for i in range(frame.shape[1])]
        self.cells = [[cell(v, floats, _nan_is_missing(col)) for v in col] for col in columns]
        self.numeric = [_numeric(col) for col in columns]
        self.probe = _widest_rows(self.cells)

    def table(self, columns: Sequence[int], rows: Sequence[int] | None = None, title: str | None = None,
              legend: str | None = None) -> Table:
        """The rich table of some columns (all rows unless `rows`)."""
        table = Table(title=Text(title) if title else None, header_style="bold",
                      caption=Text(legend) if legend else None, caption_justify="left")
        for i in columns:
            label, cells = self.labels[i], self.cells[i]
            widest = max([len(c) for c in cells] + [1])
            word = max(len(w) for w in label.split()) if label.strip() else 1
            table.add_column(Text(label), justify="right" if self.numeric[i] else "left", overflow="fold",
                             min_width=max(widest, min(word, 8)) if self.numeric[i] else min(widest, word, 12))
        for r in range(len(self.cells[0]) if self.cells else 0) if rows is None else rows:
            table.add_row(*[Text(self.cells[i][r]) for i in columns])
        return table

    def groups(self, console: Console, width: int) -> list[list[int]]:
        """The columns in groups that each print within `width`, in order; later groups start with column 0."""
        def fits(columns: list[int]) -> bool:
            rendered = console.render(self.table(columns, self.probe), console.options.update(max_width=width))
            return max(Segment.get_line_length(line) for line in Segment.split_lines(rendered)) <= width

        everything = list(range(len(self.labels)))
        if len(everything) < 2 or fits(everything):
            return [everything]
        groups, current = [], [0]
        for i in everything[1:]:
            if fits([*current, i]):
                current.append(i)
                continue
            groups.append(current)
            current = [0, i] if fits([0, i]) else [i]
        return [*groups, current]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Table]:
        groups = self.groups(console, options.max_width)
        for n, columns in enumerate(groups):
            last = n == len(groups) - 1
            title = self.title
            if len(groups) > 1:
                shown = f"columns {_spans([i + 1 for i in columns])} of {len(self.labels)}"
                title = f"{self.title} ({shown})" if self.title else shown
            yield self.table(columns, title=title, legend=self.legend if last else None)


def _widest_rows(cells: list[list[str]]) -> list[int]:
    """The rows holding each column's widest cell and longest word: enough to measure how wide columns print."""
    def longest_word(text: str) -> int:
        return max(map(len, text.split()), default=0)

    rows = set()
    for column in cells:
        for size in (len, longest_word):
            if column:
                rows.add(max(range(len(column)), key=lambda r, column=column, size=size: size(column[r])))
    return sorted(rows)


def _spans(numbers: list[int]) -> str:
    """`1, 5–8` for [1, 5, 6, 7, 8]."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][-1] + 1:
            spans[-1].append(n)
        else:
            spans.append([n])
    return ", ".join(str(s[0]) if len(s) == 1 else f"{s[0]}–{s[-1]}" for s in spans)


def json_value(value: Any, nan_is_missing: bool = True) -> Any:
    """A value JSON can hold exactly: missing as None; inf, -inf and a NaN that is a value (not a missing marker) as
    the strings "inf", "-inf", "nan"; integers of any size as integers; numpy values and nested lists and objects
    converted all the way down (NaN inside them is a value)."""
    if isinstance(value, dict):
        return {str(k): json_value(v, False) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v, False) for v in value]
    if isinstance(value, np.ndarray):
        return json_value(value.tolist(), False)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Decimal) and value.is_finite():
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None if nan_is_missing else "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, bool | int | str):
        return value
    return None if is_missing(value) else value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a DataFrame as JSON-ready dicts (`json_value`; NaN is missing only in float columns)."""
    flags = [_nan_is_missing(frame.iloc[:, i]) for i in range(frame.shape[1])]
    names = [str(c) for c in frame.columns]
    return [{name: json_value(v, flag) for name, v, flag in zip(names, row, flags, strict=True)}
            for row in frame.itertuples(index=False, name=None)]


def json_text(value: Any) -> str:
    """JSON text of `records`' output (strict JSON: no NaN or Infinity tokens; dates and the like as strings)."""
    return json.dumps(value, indent=2, default=str, allow_nan=False)


def csv_text(frame: pd.DataFrame) -> str:
    """A DataFrame as CSV: missing values empty, NaN that is a value `nan`, lists and objects as JSON text,
    integers exact."""
    frame = frame.copy()
    for i in range(frame.shape[1]):
        column = frame.iloc[:, i]
        if column.dtype == object:
            frame.iloc[:, i] = column.map(_csv_value)
    return frame.to_csv(index=False, na_rep="")


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, list | tuple | dict | np.ndarray):
        return json.dumps(json_value(value), default=str)
    return value


def emit(frame: pd.DataFrame, fmt: str, title: str | None = None, headers: Mapping[str, str] | None = None,
         legend: str | None = None) -> None:
    """Print a DataFrame as a table (to the terminal's width, wrapped into column groups if need be), CSV or JSON
    records."""
    check_format(fmt)
    if fmt == "csv":
        sys.stdout.write(csv_text(frame))
    elif fmt == "json":
        sys.stdout.write(json_text(records(frame)) + "\n")
    else:
        console.print(frame_table(frame, title, headers=headers, legend=legend))


def emit_many(frames: Mapping[str, pd.DataFrame], fmt: str) -> None:
    """Several tables at once: JSON as one object of record lists, CSV as `# name` sections."""
    check_format(fmt, ("csv", "json"))
    if fmt == "json":
        sys.stdout.write(json_text({k: records(f) for k, f in frames.items()}) + "\n")
        return
    for name, frame in frames.items():
        sys.stdout.write(f"# {name}\n" + csv_text(frame) + "\n")


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
