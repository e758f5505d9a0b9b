"""POPE: yes/no object-hallucination questions (AoiDragon's per-split JSONL or LLaVA's file with `category`)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from vheads.data import prompts
from vheads.data.dataset import Entry, Loader, Parsed, Request, choice
from vheads.data.images import open_file, probe_file
from vheads.data.records import data_file, iter_jsonl, label_of, optional_text, record_object, resolve_image, text_field
from vheads.data.sample import Sample
from vheads.data.skips import BAD_FIELD, MISSING_FIELD, BadRecord, Skip

SPLITS = ("adversarial", "popular", "random")


def _first(record: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """The first of `keys` present (POPE's `text`/`label`, or the HF copies' `question`/`answer`)."""
    for key in keys:
        value = optional_text(record, key)
        if value is not None:
            return value
    raise BadRecord(MISSING_FIELD, keys[0])


def _make(record: Any, label: str, root: Path, split: str | None) -> Sample:
    """One POPE sample with LLaVA's short-answer suffix; the category (or file split) is the question type."""
    record = record_object(record)
    asked = _first(record, ("text", "question"))
    answer = _first(record, ("label", "answer")).lower()
    if answer not in ("yes", "no"):
        raise BadRecord(BAD_FIELD, f"label {answer!r} is not yes/no")
    image_name = text_field(record, "image")
    path = resolve_image(root, image_name)
    size = probe_file(path)
    category = optional_text(record, "category") or split
    question = asked.replace(prompts.SHORT_ANSWER, "").strip()
    qid = label_of(record, ("question_id", "id"), label)
    return Sample(
        id=f"{category}-{qid}" if category else qid,
        question=question,
        text=prompts.with_short_answer(asked),
        image_fn=partial(open_file, path),
        answer=answer,
        question_type=category,
        dataset="pope",
        scoring="yesno",
        meta={"image": image_name, "image_size": size, "question_id": qid},
    )


def _file_split(path: Path) -> str | None:
    """The split a per-split file is named after (coco_pope_random.json -> random)."""
    found = [name for name in SPLITS if name in path.stem.lower()]
    return found[0] if len(found) == 1 else None


def _parse(request: Request) -> Parsed:
    """Keep the records of the asked split: by `category` when records carry one, else the whole file."""
    path = data_file(request.data, "pope")
    split = choice(request.split, SPLITS, "POPE split", None)
    file_split = _file_split(path)
    root = request.image_root()
    items: list[Entry | Skip] = []
    for label, record in iter_jsonl(path):
        if isinstance(record, Skip):
            items.append(record)
            continue
        category = record.get("category") if isinstance(record, Mapping) else None
        if split is not None and isinstance(category, str) and category.strip().lower() != split:
            continue
        make = partial(_make, record, label, root, None if isinstance(category, str) else file_split)
        items.append(Entry(str(path), label_of(record, ("question_id", "id"), label), make))
    return Parsed(items, split or file_split, str(path))


LOADER = Loader(
    name="pope",
    describe=(
        "POPE yes/no object questions. --data: coco_pope_{adversarial,popular,random}.json (JSON lines) "
        "or LLaVA's llava_pope_test.jsonl with a `category` field; --split adversarial|popular|random "
        "filters by category (default: all). Images: COCO val2014 (--images). Scored yes/no (POPE F1)."
    ),
    parse=_parse,
    metrics=("pope",),
)
