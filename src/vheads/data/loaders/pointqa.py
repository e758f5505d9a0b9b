"""PointQA / LookTwice-QA: ViP-LLaVA's JSON list or Shikra's JSONL, counting questions about a boxed object."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from vheads.data import prompts
from vheads.data.dataset import Entry, Loader, Parsed, Request, choice
from vheads.data.images import open_file, probe_file
from vheads.data.records import (
    box_field,
    data_file,
    json_records,
    label_of,
    record_object,
    resolve_image,
    text_field,
)
from vheads.data.sample import PROMPT_STYLES, Sample
from vheads.data.skips import BAD_FIELD, BOX_OUTSIDE, MISSING_FIELD, BadRecord, Skip
from vheads.data.visual_prompt import box_inside

QUESTION_TYPES = ("general", "obj", "super")
QUESTION_ALIASES = {"object": "obj", "gq": "general", "oq": "obj", "sq": "super"}
QUESTION_FIELDS = {"general": "general_question", "obj": "obj_question", "super": "super_question"}



def _question_type(record: Mapping[str, Any], asked: str | None) -> str:
    """The asked question type, else the record's own `question_type` (ShapesQA files), else general."""
    if asked is not None:
        return asked
    own = record.get("question_type")
    if isinstance(own, str):
        own = QUESTION_ALIASES.get(own.strip().lower(), own.strip().lower())
        if own in QUESTION_TYPES:
            return own
    return "general"


def _image_and_box(record: Mapping[str, Any]) -> tuple[str, str, tuple[float, float, float, float]]:
    """(layout, image path, box) from a ViP-LLaVA record (`image`, `bboxes`) or a Shikra one (`file_path`, `bbox`)."""
    if "file_path" in record:
        return "shikra", text_field(record, "file_path"), box_field(record.get("bbox"), "bbox")
    boxes = record.get("bboxes")
    if not isinstance(boxes, list) or not boxes:
        raise BadRecord(BAD_FIELD if "bboxes" in record else MISSING_FIELD, "bboxes")
    return "vip", text_field(record, "image"), box_field(boxes[0], "bboxes[0]")


def _make(record: Any, fallback_id: str, root: Path, asked: str | None, style: str, dataset: str) -> Sample:
    """One PointQA sample; checks the image header and that the box lies inside the image."""
    record = record_object(record)
    qtype = _question_type(record, asked)
    question = text_field(record, QUESTION_FIELDS[qtype])
    answer = text_field(record, "answer")
    layout, image_name, box = _image_and_box(record)
    path = resolve_image(root, image_name)
    size = probe_file(path)
    if not box_inside(box, size):
        raise BadRecord(BOX_OUTSIDE, f"{list(box)} in a {size[0]}x{size[1]} image")
    meta: dict[str, Any] = {"image": image_name, "image_size": size, "layout": layout}
    if isinstance(record.get("meta"), Mapping):
        meta.update(record["meta"])
    return Sample(
        id=label_of(record, ("id", "question_id"), fallback_id),
        question=question,
        text=prompts.pointqa(question, style, box, size),
        image_fn=partial(open_file, path, box if style == "visual" else None),
        answer=answer,
        question_type=qtype,
        box=box,
        prompt_style=style,
        dataset=dataset,
        scoring="count",
        meta=meta,
    )


def parse_as(request: Request, dataset: str) -> Parsed:
    """Parse a PointQA-layout file, naming the samples' dataset `dataset` (ShapesQA files reuse this)."""
    path = data_file(request.data, dataset)
    asked = choice(request.question_type, QUESTION_TYPES, "question type", None, QUESTION_ALIASES)
    style = choice(request.prompt_style, PROMPT_STYLES, "prompt style", None) or "visual"
    root = request.image_root()
    items: list[Entry | Skip] = []
    for label, record in json_records(path):
        if isinstance(record, Skip):
            items.append(record)
            continue
        fallback = label.removeprefix("#").replace("line ", "L")
        make = partial(_make, record, fallback, root, asked, style, dataset)
        items.append(Entry(str(path), label_of(record, ("id", "question_id"), label), make))
    return Parsed(items, request.split, str(path))


def _parse(request: Request) -> Parsed:
    """Parse a PointQA file as the `pointqa` dataset."""
    return parse_as(request, "pointqa")


LOADER = Loader(
    name="pointqa",
    describe=(
        "PointQA / LookTwice-QA counting questions about a boxed object. --data: ViP-LLaVA's "
        "pointQA_twice_test.json (JSON list) or Shikra's pointQA_twice_*.jsonl. --question-type "
        "general|obj|super (default general); --prompt-style visual (red box drawn, default) | "
        "plain (box as [x1, y1, x2, y2] in 0-1 in the text) | none. Scored by the count."
    ),
    parse=_parse,
)
