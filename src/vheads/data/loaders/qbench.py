"""Q-Bench A1 (LLVisionQA): low-level perception questions with 2-4 candidate answers."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from vheads.data import prompts
from vheads.data.dataset import Entry, Loader, Parsed, Request
from vheads.data.images import open_file, probe_file
from vheads.data.records import (
    data_file,
    label_of,
    optional_text,
    read_json_list,
    record_object,
    resolve_image,
    text_field,
)
from vheads.data.sample import Sample
from vheads.data.skips import BAD_FIELD, MISSING_FIELD, BadRecord, Skip

TYPES = {0: "yes-or-no", 1: "how", 2: "what"}
CONCERNS = {0: "global distortion", 1: "global others", 2: "local distortion", 3: "local others"}


def _named(value: Any, names: Mapping[int, str]) -> str | None:
    """A Q-Bench code (0-based int) as its name; text values pass through."""
    if isinstance(value, int) and not isinstance(value, bool):
        return names.get(value, str(value))
    return value.strip().lower() if isinstance(value, str) and value.strip() else None


def _candidates(record: Mapping[str, Any]) -> list[str]:
    """The 2-10 candidate answers as text."""
    value = record.get("candidates")
    if value is None:
        raise BadRecord(MISSING_FIELD, "candidates")
    if not isinstance(value, list) or not 2 <= len(value) <= len(prompts.LETTERS):
        raise BadRecord(BAD_FIELD, "candidates is not a list of 2-10 answers")
    return [text_field({"candidate": c}, "candidate") for c in value]


def _make(record: Any, index: int, root: Path) -> Sample:
    """One Q-Bench sample: LLaVA's prompt, the correct answer text turned into its letter."""
    record = record_object(record)
    question = text_field(record, "question")
    options = _candidates(record)
    correct = optional_text(record, "correct_ans")
    answer = None
    if correct is not None:
        if correct not in options:
            raise BadRecord(BAD_FIELD, f"correct_ans {correct!r} is not a candidate")
        answer = prompts.LETTERS[options.index(correct)]
    image_name = text_field(record, "img_path")
    path = resolve_image(root, image_name)
    size = probe_file(path)
    kind = _named(record.get("type"), TYPES)
    return Sample(
        id=label_of(record, ("id", "question_id"), str(index)),
        question=question,
        text=prompts.qbench(question, options),
        image_fn=partial(open_file, path),
        answer=answer,
        options=options,
        question_type=kind,
        dataset="qbench",
        scoring="letter",
        meta={"image": image_name, "image_size": size, "type": kind,
              "concern": _named(record.get("concern"), CONCERNS), "correct_ans": correct},
    )


def _parse(request: Request) -> Parsed:
    """All records of the A1 JSON list, or those of one type (`--question-type yes-or-no|how|what`)."""
    path = data_file(request.data, "qbench")
    asked = request.question_type.strip().lower() if request.question_type else None
    items: list[Entry | Skip] = []
    for i, record in enumerate(read_json_list(path)):
        if asked is not None and isinstance(record, Mapping) and _named(record.get("type"), TYPES) != asked:
            continue
        label = label_of(record, ("id", "img_path"), f"#{i}")
        items.append(Entry(str(path), label, partial(_make, record, i, request.image_root())))
    return Parsed(items, request.split, str(path))


LOADER = Loader(
    name="qbench",
    describe=(
        "Q-Bench A1 / LLVisionQA low-level perception. --data llvisionqa_dev.json (JSON list: img_path, "
        "question, candidates, correct_ans); --images the images_llvisionqa folder. --question-type "
        "yes-or-no|how|what. Scored by letter (the candidate's text echoed back also counts)."
    ),
    parse=_parse,
)
