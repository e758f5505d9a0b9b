"""The one record every loader produces: a question about an image, with its answer and optional box."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

PROMPT_STYLES = ("visual", "plain", "none")


class DataError(Exception):
    """A data file or option that makes the whole dataset unusable (the run cannot go on)."""


class BadSample(Exception):
    """One record that cannot be used; the loader skips it and counts it."""


@dataclass
class Sample:
    """One VQA item. The image is loaded lazily through `image_fn` so a dataset of thousands costs nothing up front.

    `box` is in original image pixels `(x1, y1, x2, y2)`. `prompt_style` says how the box reaches the model:
    `visual` (drawn on the image), `plain` (normalised coordinates in the question text) or `none`.
    `text` is the full user message without the image placeholder (question, options, instruction suffix);
    the model adapter wraps it in the model's chat template.
    """

    id: str
    question: str
    text: str
    image_fn: Callable[[], Image.Image]
    answer: str | None = None
    options: list[str] | None = None
    question_type: str | None = None
    box: tuple[float, float, float, float] | None = None
    prompt_style: str = "none"
    dataset: str = ""
    scoring: str = "exact"
    meta: dict[str, Any] = field(default_factory=dict)

    def image(self) -> Image.Image:
        """The RGB image the model sees (with the box drawn on it for the `visual` prompt style)."""
        return self.image_fn()

    def targets(self) -> list[tuple[float, float, float, float]]:
        """Every box the question is about, in original pixels: the target instances the loader lists under
        `meta["target_boxes"]` (ShapesQA lists each copy of the counted class), else the box; empty without one."""
        listed = self.meta.get("target_boxes")
        if isinstance(listed, list | tuple) and listed:
            boxes = [tuple(float(v) for v in box) for box in listed
                     if isinstance(box, list | tuple) and len(box) == 4
                     and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)]
            if boxes:
                return boxes
        return [] if self.box is None else [tuple(float(v) for v in self.box)]

    def digest(self) -> str:
        """Sixteen hex digits of the question, answer, box and target boxes, stored with the run so that the data
        reloaded later (`vheads ground`) can be checked to be what was run."""
        fields = [self.question, self.answer, None if self.box is None else [float(v) for v in self.box],
                  [list(t) for t in self.targets()]]
        return hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:16]
