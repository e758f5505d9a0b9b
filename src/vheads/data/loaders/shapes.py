"""ShapesQA through the registry: generated in memory, or read back from a folder `write_shapes` wrote."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from vheads.data.dataset import Entry, Loader, Parsed, Request, choice
from vheads.data.loaders.pointqa import QUESTION_ALIASES, parse_as
from vheads.data.sample import PROMPT_STYLES, DataError
from vheads.data.shapes import QUESTION_TYPES, SPLIT_IDS, sample_id, shapes_sample
from vheads.data.skips import Skip

DEFAULT_LIMIT = 1000
# The most questions a generated set holds: every sample is built in memory (about 4 KB and 2 ms each).
MAX_LIMIT = 100_000


def _parse(request: Request) -> Parsed:
    """`limit` (default 1000, at most `MAX_LIMIT`) samples of the split (default test), each generated only when it
    is drawn; with `data`, its shapes.json instead."""
    if request.data is not None:
        path = request.data / "shapes.json" if request.data.is_dir() else request.data
        return parse_as(replace(request, data=path), "shapes")
    split = choice(request.split, SPLIT_IDS, "ShapesQA split", "test") or "test"
    qtype = choice(request.question_type, QUESTION_TYPES, "question type", None, QUESTION_ALIASES)
    style = choice(request.prompt_style, PROMPT_STYLES, "prompt style", "visual") or "visual"
    n = DEFAULT_LIMIT if request.limit is None else request.limit
    if n > MAX_LIMIT:
        raise DataError(f"--limit {n}: ShapesQA is generated in memory and holds at most {MAX_LIMIT:,} questions "
                        "per --seed and --split; run several seeds for more")
    items: list[Entry | Skip] = [
        Entry("shapes", sample_id(i, request.seed, split),
              partial(shapes_sample, i, request.seed, split, qtype, style))
        for i in range(n)
    ]
    return Parsed(items, split, f"ShapesQA {split} (seed {request.seed})")


LOADER = Loader(
    name="shapes",
    describe=(
        "ShapesQA, the built-in synthetic counting set (coloured shapes, PointQA's general/obj/super "
        "questions). Generated in memory: --split train|test|val (default test), --limit N (default 1000, at "
        "most 100,000), --seed; question types cycle unless --question-type is given. --data DIR reads a folder "
        "written by `vheads data shapes`."
    ),
    parse=_parse,
)
