"""MMBench: a TSV of multiple-choice questions with base64 images and CircularEval copies."""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from vheads.data import prompts
from vheads.data.dataset import Entry, Loader, Parsed, Request
from vheads.data.images import decode_base64, open_base64, probe_bytes
from vheads.data.records import data_file, is_missing, optional_text, text_field
from vheads.data.sample import DataError, Sample
from vheads.data.skips import BAD_FIELD, BadRecord, Skip

CIRCULAR_OFFSET = 1_000_000
OPTION_COLUMNS = ("A", "B", "C", "D")
REQUIRED = ("index", "question", "image", "A", "B")
META_COLUMNS = ("category", "l2-category", "L2-category", "source", "split", "comment")


def _read(path: Path) -> list[dict[str, Any]]:
    """The TSV rows as dicts (all cells as text, empty cells NaN); `DataError` if pandas cannot read it."""
    import pandas as pd

    try:
        frame = pd.read_table(path, dtype=str)
    except Exception as error:
        raise DataError(f"{path}: cannot read as a TSV table ({error.__class__.__name__})") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: not an MMBench TSV, missing column(s) {', '.join(missing)}")
    return frame.to_dict("records")


def _index(row: Mapping[str, Any]) -> int:
    """The row's integer `index`."""
    raw = text_field(row, "index")
    try:
        value = int(float(raw))
    except (ValueError, OverflowError):
        raise BadRecord(BAD_FIELD, f"index {raw!r}") from None
    if value < 0:
        raise BadRecord(BAD_FIELD, f"index {value}")
    return value


def _options(row: Mapping[str, Any]) -> list[str]:
    """Options A-D up to the first empty one, as LLaVA reads them."""
    options: list[str] = []
    for column in OPTION_COLUMNS:
        if column not in row or is_missing(row[column]):
            break
        options.append(text_field(row, column))
    if len(options) < 2:
        raise BadRecord(BAD_FIELD, "fewer than 2 options")
    return options


def _image_text(row: Mapping[str, Any], images: Mapping[int, str]) -> str:
    """The base64 image; a short numeric cell points at the row whose image it shares (newer releases)."""
    value = text_field(row, "image")
    if len(value) <= 64 and value.isdigit() and int(value) in images:
        return images[int(value)]
    return value


def _make(row: Mapping[str, Any], images: Mapping[int, str], suffix: str) -> Sample:
    """One MMBench sample with LLaVA's single-prediction prompt; circular copies share a group id."""
    index = _index(row)
    question = text_field(row, "question")
    options = _options(row)
    answer = optional_text(row, "answer")
    if answer is not None and answer not in prompts.LETTERS[: len(options)]:
        raise BadRecord(BAD_FIELD, f"answer {answer!r} is not an option letter")
    encoded = _image_text(row, images)
    size = probe_bytes(decode_base64(encoded))
    meta: dict[str, Any] = {"index": index, "circular_group": str(index % CIRCULAR_OFFSET), "image_size": size}
    for column in META_COLUMNS:
        value = optional_text(row, column) if column in row else None
        if value is not None:
            meta[column.lower()] = value
    return Sample(
        id=str(index),
        question=question,
        text=prompts.multiple_choice(question, options, optional_text(row, "hint"), suffix),
        image_fn=partial(open_base64, encoded),
        answer=answer,
        options=options,
        question_type=meta.get("category"),
        dataset="mmbench",
        scoring="letter",
        meta=meta,
    )


def _wanted(row: Mapping[str, Any], column: str, asked: str | None) -> bool:
    """True unless `asked` is given and the row's `column` holds a different value (blank cells match)."""
    value = row.get(column)
    if asked is None or is_missing(value):
        return True
    return str(value).strip().lower() == asked.strip().lower()


def _suffix(path: Path) -> str:
    """The letter instruction: Chinese for the `_cn` files, as LLaVA's `--lang cn`."""
    chinese = re.search(r"(^|[_\-.])cn([_\-.]|$)", path.name.lower())
    return prompts.LETTER_ANSWER_CN if chinese else prompts.LETTER_ANSWER


def _parse(request: Request) -> Parsed:
    """Rows of the asked split (`split` column) and category (`--question-type`), grouped by circular id."""
    path = data_file(request.data, "mmbench")
    rows = _read(path)
    images: dict[int, str] = {}
    for row in rows:
        try:
            images.setdefault(_index(row), text_field(row, "image"))
        except BadRecord:
            continue
    suffix = _suffix(path)
    items: list[Entry | Skip] = []
    for number, row in enumerate(rows, start=2):
        if not _wanted(row, "split", request.split) or not _wanted(row, "category", request.question_type):
            continue
        index = row.get("index")
        label = str(index) if not is_missing(index) else f"line {number}"
        group = None
        with suppress(BadRecord):
            group = str(_index(row) % CIRCULAR_OFFSET)
        items.append(Entry(str(path), label, partial(_make, row, images, suffix), group))
    return Parsed(items, request.split, str(path))


LOADER = Loader(
    name="mmbench",
    describe=(
        "MMBench multiple choice (TSV with base64 images, e.g. mmbench_dev_20230712.tsv). Options A-D up "
        "to the first empty one; rows with index >= 1,000,000 are CircularEval copies grouped with their "
        "question. --split dev|test filters the `split` column; --question-type a category. Scored by letter."
    ),
    parse=_parse,
)
