"""A generic LLaVA question file (JSON lines: question_id, image, text, category) with optional answers."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from vheads.data.answers import letter_answer, options_in_text, scoring_for
from vheads.data.dataset import Entry, Loader, Parsed, Request
from vheads.data.images import open_file, probe_file
from vheads.data.records import data_file, iter_jsonl, label_of, optional_text, record_object, resolve_image, text_field
from vheads.data.sample import Sample
from vheads.data.skips import BadRecord, Skip

ANSWER_FIELDS = ("answer", "label", "gt", "gt_answer")


def _answer(record: Mapping[str, Any]) -> str | None:
    """The reference answer from the first answer-like field present."""
    for key in ANSWER_FIELDS:
        value = optional_text(record, key)
        if value is not None:
            return value
    return None


def _answers_file(path: Path | None) -> dict[str, str]:
    """question_id -> answer from a separate JSON-lines answer file (bad lines are ignored there)."""
    if path is None:
        return {}
    found: dict[str, str] = {}
    for _, record in iter_jsonl(data_file(Path(path).expanduser(), "jsonl answers")):
        qid = label_of(record, ("question_id",), "")
        if not qid or isinstance(record, Skip):
            continue
        with suppress(BadRecord):
            answer = _answer(record)
            if answer is not None:
                found[qid] = answer
    return found


def _make(record: Any, label: str, root: Path, answers: Mapping[str, str]) -> Sample:
    """One sample; `text` is used as written (it must already carry its instruction)."""
    record = record_object(record)
    text = text_field(record, "text")
    qid = label_of(record, ("question_id", "id"), label)
    image_name = text_field(record, "image")
    path = resolve_image(root, image_name)
    size = probe_file(path)
    options = options_in_text(text)
    answer = letter_answer(_answer(record) or answers.get(qid), options)
    return Sample(
        id=qid,
        question=text,
        text=text,
        image_fn=partial(open_file, path),
        answer=answer,
        options=options if scoring_for(answer, options) == "letter" else None,
        question_type=optional_text(record, "category"),
        dataset="jsonl",
        scoring=scoring_for(answer, options),
        meta={"image": image_name, "image_size": size},
    )


def _parse(request: Request) -> Parsed:
    """Every line of the question file; `--question-type` keeps one `category`."""
    path = data_file(request.data, "jsonl")
    answers = _answers_file(request.options.get("answers"))
    asked = request.question_type.strip().lower() if request.question_type else None
    items: list[Entry | Skip] = []
    for label, record in iter_jsonl(path):
        if isinstance(record, Skip):
            items.append(record)
            continue
        if asked is not None and isinstance(record, Mapping) and str(record.get("category", "")).lower() != asked:
            continue
        make = partial(_make, record, label, request.image_root(), answers)
        items.append(Entry(str(path), label_of(record, ("question_id", "id"), label), make))
    return Parsed(items, request.split, str(path))


LOADER = Loader(
    name="jsonl",
    describe=(
        "A LLaVA-style question file (JSON lines: question_id, image, text, category). The reference answer "
        "comes from a field answer/label/gt in the record or from answers=FILE (JSON lines keyed by "
        "question_id). Scored yes/no, by letter ('A. x' lines in the text), by count, else exact match."
    ),
    parse=_parse,
    options=("answers",),
)
