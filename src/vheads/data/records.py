"""Reading data files and record fields: file-level problems raise `DataError`, record-level ones `BadRecord`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vheads.data.sample import DataError
from vheads.data.skips import BAD_FIELD, BAD_JSON, MISSING_FIELD, OUTSIDE_IMAGES, BadRecord, Skip


def data_file(path: Path | None, name: str) -> Path:
    """The data file the user named; a one-line `DataError` if it is not given, missing or empty."""
    if path is None:
        raise DataError(f"dataset {name!r} needs a data file (--data)")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    return path


def read_text(path: Path) -> str:
    """The whole file as UTF-8 text (a leading BOM is dropped); `DataError` if it is not text or blank."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read as UTF-8 text ({error.__class__.__name__})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def read_json(path: Path) -> Any:
    """A whole-file JSON document; a truncated or invalid file is fatal because no record can be trusted."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None


def read_json_list(path: Path, key: str | None = None) -> list[Any]:
    """A JSON file holding a list of records (directly, or under `key` of a top-level object)."""
    document = read_json(path)
    if key is not None and isinstance(document, dict):
        document = document.get(key)
    if not isinstance(document, list):
        where = f" under {key!r}" if key else ""
        raise DataError(f"{path}: expected a JSON list of records{where}")
    return document


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any | Skip]]:
    """(record label, parsed object) per non-blank line; a line that is not UTF-8 JSON yields a `Skip` instead, so
    one bad byte costs one record, not the file."""
    try:
        blank = not path.read_bytes().lstrip(b"\xef\xbb\xbf").strip()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.__class__.__name__})") from None
    if blank:
        raise DataError(f"{path}: empty file")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            label = f"line {number}"
            try:
                line = raw.decode("utf-8-sig").strip()
            except UnicodeDecodeError as error:
                yield label, Skip(str(path), label, BAD_JSON, f"not UTF-8: byte {raw[error.start]:#04x} at column "
                                  f"{error.start + 1}")
                continue
            if not line:
                continue
            try:
                yield label, json.loads(line)
            except (json.JSONDecodeError, RecursionError) as error:
                yield label, Skip(str(path), label, BAD_JSON, str(error)[:80])


def json_records(path: Path) -> Iterator[tuple[str, Any | Skip]]:
    """(label, record) pairs from a JSON list (labels `#i`) or JSON lines (bad lines as `Skip`s), told apart
    by the file's first character."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        yield from ((f"#{i}", record) for i, record in enumerate(read_json_list(path)))
    else:
        yield from iter_jsonl(path)


def is_missing(value: Any) -> bool:
    """True for None, NaN and the strings pandas or LLaVA treat as absent ('', 'nan', 'none')."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def record_object(value: Any) -> Mapping[str, Any]:
    """The record as a mapping, or `BadRecord` if it is some other JSON value."""
    if not isinstance(value, Mapping):
        raise BadRecord(BAD_FIELD, f"record is a {type(value).__name__}, not an object")
    return value


def text_field(record: Mapping[str, Any], key: str) -> str:
    """A required non-empty text field (numbers are accepted and turned into text)."""
    if key not in record or is_missing(record[key]):
        raise BadRecord(MISSING_FIELD, key)
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRecord(BAD_FIELD, f"{key} is a {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip() if isinstance(value, str) else str(value)


def optional_text(record: Mapping[str, Any], key: str) -> str | None:
    """A text field that may be absent."""
    if key not in record or is_missing(record[key]):
        return None
    return text_field(record, key)


def label_of(record: Any, keys: tuple[str, ...], fallback: str) -> str:
    """The best record label for a warning: the first id-like field present, else `fallback`."""
    if isinstance(record, Mapping):
        for key in keys:
            value = record.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
                return str(value)[:80]
    return fallback


def box_field(value: Any, key: str) -> tuple[float, float, float, float]:
    """A box [x1, y1, x2, y2] in pixels with x1 < x2 and y1 < y2."""
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise BadRecord(BAD_FIELD, f"{key} is not [x1, y1, x2, y2]")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and _finite(v) for v in value):
        raise BadRecord(BAD_FIELD, f"{key} has a non-numeric coordinate")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not (x1 < x2 and y1 < y2):
        raise BadRecord(BAD_FIELD, f"{key} {list(value)} is empty or inverted")
    return x1, y1, x2, y2


def _finite(value: float) -> bool:
    """Whether a number is finite as a float (an integer too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def resolve_image(root: Path, name: str) -> Path:
    """An image path from a record: absolute as given, else relative to the image folder and kept inside it.

    The check is on the written path (`..` may not climb out of `root`), so symlinks inside the folder still work.
    """
    path = Path(name)
    if path.is_absolute():
        return path
    if os.path.normpath(path).split(os.sep)[0] == os.pardir:
        raise BadRecord(OUTSIDE_IMAGES, name)
    return root / path
