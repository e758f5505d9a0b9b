"""A local Hugging Face `datasets` folder (written with `save_to_disk`), read through a column mapping."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from vheads.data import prompts
from vheads.data.answers import letter_answer, scoring_for
from vheads.data.dataset import Entry, Loader, Parsed, Request
from vheads.data.images import open_bytes, open_file, probe_bytes, probe_file
from vheads.data.records import is_missing, optional_text, resolve_image, text_field
from vheads.data.sample import DataError, Sample
from vheads.data.skips import BAD_FIELD, MISSING_IMAGE, BadRecord, Skip

DEFAULT_COLUMNS = {"question": "question", "answer": "answer", "image": "image", "id": "id",
                   "options": "options", "question_type": "question_type"}
REQUIRED = ("question", "image")


def _load(path: Path, split: str | None) -> tuple[Any, str | None]:
    """The saved table (one split of a DatasetDict: the asked one, else 'test', else the only one)."""
    try:
        import datasets
    except ImportError:
        raise DataError("the hf loader needs the 'datasets' package: pip install 'vheads[hf]'") from None
    if not path.is_dir():
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise DataError(f"{path}: cannot load with datasets.load_from_disk ({error.__class__.__name__})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("test" if "test" in names else names[0] if len(names) == 1 else None)
        if chosen not in names:
            raise DataError(f"{path}: choose a split with --split; it has {', '.join(names) or 'none'}")
        return loaded[chosen], chosen
    return loaded, split


def _columns(request: Request, present: list[str], path: Path) -> dict[str, str]:
    """The column mapping (defaults overridden by `columns=`), checked against the table."""
    given = request.options.get("columns") or {}
    if not isinstance(given, Mapping):
        raise DataError("hf option columns must be a mapping like {'question': 'prompt'}")
    unknown = sorted(set(given) - set(DEFAULT_COLUMNS))
    if unknown:
        raise DataError(f"hf columns: unknown role(s) {', '.join(unknown)}; roles: {', '.join(DEFAULT_COLUMNS)}")
    columns = {**DEFAULT_COLUMNS, **given}
    missing = [columns[role] for role in REQUIRED if columns[role] not in present]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(present)}")
    return {role: name for role, name in columns.items() if name in present}


def _image(value: Any, root: Path) -> tuple[Any, tuple[int, int]]:
    """(image_fn factory argument, size) for an undecoded Image cell ({bytes, path}) or a path string."""
    if isinstance(value, Mapping) and value.get("bytes"):
        data = bytes(value["bytes"])
        return partial(open_bytes, data), probe_bytes(data)
    if isinstance(value, Mapping) and value.get("path"):
        value = value["path"]
    if isinstance(value, str) and value.strip():
        path = resolve_image(root, value.strip())
        return partial(open_file, path), probe_file(path)
    raise BadRecord(MISSING_IMAGE, "empty image cell")


def _options(value: Any) -> list[str] | None:
    """A list-of-text options cell, or None."""
    if value is None or (not isinstance(value, list | tuple) and is_missing(value)):
        return None
    if not isinstance(value, list | tuple) or not 2 <= len(value) <= len(prompts.LETTERS):
        raise BadRecord(BAD_FIELD, "options is not a list of 2-10 choices")
    return [text_field({"option": v}, "option") for v in value]


def _make(row: Mapping[str, Any], index: int, columns: Mapping[str, str], root: Path) -> Sample:
    """One sample from one row; with options the question gets LLaVA's multiple-choice prompt."""
    cell = {role: row.get(name) for role, name in columns.items()}
    question = text_field(cell, "question")
    options = _options(cell.get("options"))
    answer = letter_answer(optional_text(cell, "answer"), options)
    image_fn, size = _image(cell.get("image"), root)
    scoring = scoring_for(answer, options)
    return Sample(
        id=optional_text(cell, "id") or str(index),
        question=question,
        text=prompts.multiple_choice(question, options) if options else question,
        image_fn=image_fn,
        answer=answer,
        options=options,
        question_type=optional_text(cell, "question_type"),
        dataset="hf",
        scoring=scoring,
        meta={"row": index, "image_size": size},
    )


def _parse(request: Request) -> Parsed:
    """Every row of the table (or `--question-type` rows); image cells are read undecoded and checked."""
    if request.data is None:
        raise DataError("dataset 'hf' needs a folder written by save_to_disk (--data)")
    path = request.data
    table, split = _load(path, request.split)
    import datasets

    columns = _columns(request, list(table.column_names), path)
    root = request.images if request.images is not None else path
    asked = request.question_type
    items: list[Entry | Skip] = []
    try:
        if isinstance(table.features.get(columns["image"]), datasets.Image):
            table = table.cast_column(columns["image"], datasets.Image(decode=False))
        for index, row in enumerate(table):
            if asked is not None and str(row.get(columns.get("question_type", ""), "")) != asked:
                continue
            items.append(Entry(str(path), f"row {index}", partial(_make, row, index, columns, root)))
    except Exception as error:
        raise DataError(f"{path}: cannot read the table's rows ({error.__class__.__name__})") from None
    return Parsed(items, split, str(path))


LOADER = Loader(
    name="hf",
    describe=(
        "A local Hugging Face datasets folder (save_to_disk). Columns question, answer, image (PIL images "
        "or paths), optional id, options, question_type; rename with columns={'question': 'prompt', ...}. "
        "--split picks a DatasetDict split (default test). Scored like jsonl."
    ),
    parse=_parse,
    options=("columns",),
)
