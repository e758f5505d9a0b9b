"""SEED-Bench (v1), image part: dimensions 1-9, four choices, images found by `data_id`."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from vheads.data import prompts
from vheads.data.dataset import Entry, Loader, Parsed, Request
from vheads.data.images import open_file, probe_file
from vheads.data.records import data_file, label_of, optional_text, read_json, record_object, resolve_image, text_field
from vheads.data.sample import DataError, Sample
from vheads.data.skips import BAD_FIELD, BadRecord, Skip

DIMENSIONS = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
}
CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")
IMAGE_FOLDER = "SEED-Bench-image"


def _dimension(record: Mapping[str, Any]) -> int | None:
    """The record's `question_type_id` as an int, None when it has none that reads as one."""
    value = record.get("question_type_id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _is_image_question(record: Any) -> bool:
    """True for image questions of dimensions 1-9; video ones (and unreadable types) are left to `_make`."""
    if not isinstance(record, Mapping):
        return True
    if record.get("data_type", "image") != "image":
        return False
    dimension = _dimension(record)
    return dimension is None or dimension in DIMENSIONS


def _make(record: Any, label: str, root: Path, names: Mapping[int, str]) -> Sample:
    """One SEED-Bench sample with LLaVA's prompt; the dimension name is the question type."""
    record = record_object(record)
    dimension = _dimension(record)
    if dimension is None:
        raise BadRecord(BAD_FIELD, "question_type_id")
    question = text_field(record, "question")
    options = [text_field(record, key) for key in CHOICES]
    answer = optional_text(record, "answer")
    if answer is not None and answer not in prompts.LETTERS[:4]:
        raise BadRecord(BAD_FIELD, f"answer {answer!r} is not A-D")
    image_name = text_field(record, "data_id")
    path = resolve_image(root, image_name)
    size = probe_file(path)
    return Sample(
        id=label_of(record, ("question_id",), label),
        question=question,
        text=prompts.multiple_choice(question, options),
        image_fn=partial(open_file, path),
        answer=answer,
        options=options,
        question_type=names.get(dimension, DIMENSIONS[dimension]),
        dataset="seedbench",
        scoring="letter",
        meta={"image": image_name, "image_size": size, "dimension": dimension},
    )


def _names(document: Any) -> dict[int, str]:
    """Dimension id -> name from the file's `question_type` table, falling back to the published names."""
    names = dict(DIMENSIONS)
    table = document.get("question_type") if isinstance(document, Mapping) else None
    if isinstance(table, Mapping):
        for name, number in table.items():
            if isinstance(number, int) and number in DIMENSIONS and isinstance(name, str):
                names[number] = name
    return names


def _image_root(request: Request) -> Path:
    """`--images`, else the SEED-Bench-image folder beside the JSON (the release layout), else its folder."""
    root = request.image_root()
    beside = root / IMAGE_FOLDER
    return beside if request.images is None and beside.is_dir() else root


def _parse(request: Request) -> Parsed:
    """Image questions of the asked dimension (`--question-type`: a name or its number; default all)."""
    path = data_file(request.data, "seedbench")
    document = read_json(path)
    questions = document.get("questions") if isinstance(document, Mapping) else document
    if not isinstance(questions, list):
        raise DataError(f"{path}: expected {{'questions': [...]}} (SEED-Bench.json)")
    names = _names(document)
    root = _image_root(request)
    asked = request.question_type.strip().lower() if request.question_type else None
    items: list[Entry | Skip] = []
    for i, record in enumerate(questions):
        if not _is_image_question(record):
            continue
        if asked is not None:
            dimension = _dimension(record) if isinstance(record, Mapping) else None
            if dimension is None or asked not in (str(dimension), names[dimension].lower()):
                continue
        label = label_of(record, ("question_id",), f"#{i}")
        items.append(Entry(str(path), label, partial(_make, record, f"#{i}", root, names)))
    return Parsed(items, request.split or "test", str(path))


LOADER = Loader(
    name="seedbench",
    describe=(
        "SEED-Bench v1, image questions (dimensions 1-9). --data SEED-Bench.json; images are found by "
        "data_id in --images, else in SEED-Bench-image/ beside the JSON. --question-type a dimension name or number. "
        "Scored by letter."
    ),
    parse=_parse,
)
