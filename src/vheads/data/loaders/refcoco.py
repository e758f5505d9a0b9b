"""RefCOCO / RefCOCO+ / RefCOCOg referring expressions: an image, the expression, the box of the object it names.

The question is the referring expression itself and there is no answer to score, only the box: runs record the
per-head figures on it (pointing, region share) and `vheads ground` draws boxes from the heads' attention.

File: JSON lines (one record per line), or one JSON list of records, in the common layouts (lmms-eval's RefCOCO
export, the refer API's refs joined with their annotations, hand-made files). Fields of a record:

- `image` | `file_name` | `image_path` | `img_path`: the image file, relative to `--images` (default: the data
  file's folder) or absolute;
- the expression: `expression` | `sentence` | `sent` | `refexp` | `answer` | `sentences` | `text`, the first
  present; a text, or a list of texts (lmms-eval's `answer`, the refer API's `sentences`, whose items may be
  `{"sent": ...}` objects): each expression of a list is its own sample, its id suffixed `:k` (k from 0);
- the box, in pixels of the image: `bbox` as COCO's [x, y, width, height] (COCO, lmms-eval, the refer API) or
  `box` as [x1, y1, x2, y2];
- optional: `question_id` | `id` | `ref_id` | `ann_id` (the sample id; default the line number), `split`
  (`--split NAME` keeps the records whose split is NAME, e.g. testA), `category` (kept as the question type).

A record without an image, expression or usable box, a box outside the image, a missing or corrupt image or a
line that is not JSON is skipped and counted. Only `--prompt-style none` applies: the box is never shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from vheads.data.dataset import Entry, Loader, Parsed, Request
from vheads.data.images import open_file, probe_file
from vheads.data.records import (
    box_field,
    data_file,
    is_missing,
    json_records,
    label_of,
    optional_text,
    record_object,
    resolve_image,
    text_field,
)
from vheads.data.sample import DataError, Sample
from vheads.data.skips import BAD_FIELD, BOX_OUTSIDE, MISSING_FIELD, BadRecord, Skip, skip_from
from vheads.data.visual_prompt import box_inside

IMAGE_FIELDS = ("image", "file_name", "image_path", "img_path")
EXPRESSION_FIELDS = ("expression", "sentence", "sent", "refexp", "answer", "sentences", "text")
ID_FIELDS = ("question_id", "id", "ref_id", "ann_id")



def expressions(record: Mapping[str, Any]) -> list[str]:
    """The record's referring expressions: the first expression field present, a text or a list of them."""
    key = next((k for k in EXPRESSION_FIELDS if k in record and not is_missing(record[k])), None)
    if key is None:
        raise BadRecord(MISSING_FIELD, "expression")
    value = record[key]
    items = value if isinstance(value, list) else [value]
    found = []
    for item in items:
        if isinstance(item, Mapping):
            item = item.get("sent", item.get("raw"))
        if isinstance(item, str) and item.strip():
            found.append(item.strip())
        elif not (item is None or isinstance(item, str)):
            raise BadRecord(BAD_FIELD, f"{key} holds a {type(item).__name__}")
    if not found:
        raise BadRecord(MISSING_FIELD, key)
    return found


def record_box(record: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """The box as (x1, y1, x2, y2) pixels: `box` as corners, else `bbox` as COCO's x, y, width, height."""
    if "box" in record and not is_missing(record["box"]):
        return box_field(record["box"], "box")
    value = record.get("bbox")
    if value is None:
        raise BadRecord(MISSING_FIELD, "bbox")
    if not (isinstance(value, list | tuple) and len(value) == 4):
        raise BadRecord(BAD_FIELD, "bbox is not [x, y, width, height]")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise BadRecord(BAD_FIELD, "bbox has a non-numeric value")
    try:
        x, y, w, h = (float(v) for v in value)
    except OverflowError:
        raise BadRecord(BAD_FIELD, "bbox has a value too large") from None
    return box_field([x, y, x + w, y + h], "bbox")


def _image_name(record: Mapping[str, Any]) -> str:
    key = next((k for k in IMAGE_FIELDS if k in record and not is_missing(record[k])), None)
    if key is None:
        raise BadRecord(MISSING_FIELD, "image")
    return text_field(record, key)


def _make(record: Mapping[str, Any], base_id: str, index: int, count: int, root: Path) -> Sample:
    """One sample: the index-th expression of a record, after checking its image header and its box."""
    text = expressions(record)[index]
    box = record_box(record)
    image_name = _image_name(record)
    path = resolve_image(root, image_name)
    size = probe_file(path)
    if not box_inside(box, size):
        raise BadRecord(BOX_OUTSIDE, f"{list(box)} in a {size[0]}x{size[1]} image")
    return Sample(
        id=base_id if count == 1 else f"{base_id}:{index}",
        question=text,
        text=text,
        image_fn=partial(open_file, path),
        question_type=optional_text(record, "category"),
        box=box,
        prompt_style="none",
        dataset="refcoco",
        meta={"image": image_name, "image_size": size},
    )


def _entries(record: Any, label: str, root: Path, file: str) -> list[Entry | Skip]:
    """One entry per expression of a record, or the skip of a record whose expressions cannot be read."""
    base_id = label_of(record, ID_FIELDS, label.removeprefix("#").replace("line ", "L"))
    try:
        count = len(expressions(record_object(record)))
    except BadRecord as error:
        return [skip_from(file, label_of(record, ID_FIELDS, label), error)]
    return [Entry(file, base_id if count == 1 else f"{base_id}:{k}", partial(_make, record, base_id, k, count, root))
            for k in range(count)]


def _parse(request: Request) -> Parsed:
    """Every expression of every record (of `--split` when given)."""
    path = data_file(request.data, "refcoco")
    if request.prompt_style not in (None, "none"):
        raise DataError(f"refcoco shows no box: --prompt-style none only (got {request.prompt_style!r})")
    items: list[Entry | Skip] = []
    for label, record in json_records(path):
        if isinstance(record, Skip):
            items.append(record)
            continue
        if request.split and isinstance(record, Mapping) and str(record.get("split", "")) != request.split:
            continue
        items.extend(_entries(record, label, request.image_root(), str(path)))
    return Parsed(items, request.split, str(path))


LOADER = Loader(
    name="refcoco",
    describe=(
        "RefCOCO / RefCOCO+ / RefCOCOg referring expressions (JSON lines or a JSON list; lmms-eval's layout): image "
        "(or file_name), the expression (expression, sentence, sent, refexp, answer, sentences or text; a list "
        "gives one sample each), bbox as [x, y, width, height] or box as [x1, y1, x2, y2] pixels. The question is "
        "the expression; nothing is scored but the box (vheads ground). --split keeps one `split` (e.g. testA)."
    ),
    parse=_parse,
)
