"""ShapesQA: the built-in synthetic counting set, PointQA's three question levels over coloured shapes.

A scene is a light background with objects on a 4x4 grid (one per cell, small jitter, never
overlapping). Two candidate classes (colour, shape) of the same supercategory appear with different
counts (each 1..max_count); the target, whose count is the answer, is one of the two at random, and
the box surrounds one of its copies. Up to three distractors of other classes, drawn without regard to
which candidate is the target, fill further cells. So without the box a general or super question is a
guess between the candidates, while an object question (which names the class) stays answerable: the
control. Supercategories: round = {circle, oval}, pointy = {triangle, diamond}. Sample i of
(seed, split) comes from its own generator `numpy.random.default_rng([seed, SPLIT_IDS[split], i])`, so
splits never share a stream and any sample can be made alone; the same arguments give byte-identical
images and text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vheads.data import prompts
from vheads.data.sample import PROMPT_STYLES, Sample
from vheads.data.visual_prompt import Box, draw_box

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 165, 40),
    "blue": (25, 70, 230),
    "yellow": (245, 200, 0),
}
SHAPES = ("circle", "oval", "triangle", "diamond")
SUPERCATEGORIES: dict[str, tuple[str, ...]] = {"round": ("circle", "oval"), "pointy": ("triangle", "diamond")}
SPLIT_IDS = {"train": 0, "test": 1, "val": 2}
QUESTION_TYPES = ("general", "obj", "super")
BACKGROUND = (240, 240, 236)
GRID = 4
IMAGE_SIZE = 96
SUPERSAMPLE = 4
MAX_DISTRACTORS = 3
MAX_COUNT = 7
WORD_PATTERN = r"\w+|[^\w\s]"

# Half-extent of each shape (x, y) as a fraction of half its size.
_EXTENT = {"circle": (1.0, 1.0), "oval": (1.0, 0.55), "triangle": (1.0, 1.0), "diamond": (0.7, 1.0)}


@dataclass(frozen=True)
class Thing:
    """One drawn object: its class and its centre and size in pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one ShapesQA image and ask about it.

    `color`/`shape`/`count` are the target's, `other`/`other_count` the competing candidate's;
    `exemplar` indexes the boxed copy in `things`.
    """

    image_size: int
    things: tuple[Thing, ...]
    color: str
    shape: str
    count: int
    exemplar: int
    other: tuple[str, str] = ("", "")
    other_count: int = 0

    @property
    def box(self) -> Box:
        """Integer pixel box around the exemplar, with a small margin."""
        return thing_box(self.things[self.exemplar], self.image_size)

    def target_boxes(self) -> list[Box]:
        """The box of every copy of the target class, in drawing order."""
        return [thing_box(t, self.image_size) for t in self.things if (t.color, t.shape) == (self.color, self.shape)]


def thing_box(thing: Thing, image_size: int) -> Box:
    """Integer pixel box around one object, with a small margin, clipped to the image."""
    ex, ey = _EXTENT[thing.shape]
    half, pad = thing.size / 2, _pad(image_size)
    x1, y1 = np.floor([thing.cx - ex * half - pad, thing.cy - ey * half - pad])
    x2, y2 = np.ceil([thing.cx + ex * half + pad, thing.cy + ey * half + pad])
    limit = float(image_size)
    return (max(float(x1), 0.0), max(float(y1), 0.0), min(float(x2), limit), min(float(y2), limit))


def supercategory(shape: str) -> str:
    """The supercategory a shape belongs to."""
    return next(name for name, members in SUPERCATEGORIES.items() if shape in members)


def _pad(image_size: int) -> int:
    """Margin in pixels between an exemplar and its box."""
    return max(2, image_size // 64)


def _pick(rng: np.random.Generator, options: list) -> Any:
    """One of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def candidate_pair(rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two different classes of one supercategory (e.g. red circle and red oval, or red and blue circles)."""
    first = (_pick(rng, list(COLORS)), _pick(rng, list(SHAPES)))
    members = list(SUPERCATEGORIES[supercategory(first[1])])
    second = first
    while second == first:
        second = (_pick(rng, list(COLORS)), _pick(rng, members))
    return first, second


def make_scene(rng: np.random.Generator, image_size: int = IMAGE_SIZE, max_count: int = 5) -> Scene:
    """Draw one scene's layout from `rng`: candidates and their counts, target, distractors, cells, sizes, jitter."""
    pair = candidate_pair(rng)
    first_count = int(rng.integers(1, max_count + 1))
    second_count = _pick(rng, [c for c in range(1, max_count + 1) if c != first_count])
    free = GRID * GRID - first_count - second_count
    others = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pair]
    extra = [_pick(rng, others) for _ in range(min(int(rng.integers(MAX_DISTRACTORS + 1)), free))]
    classes = [pair[0]] * first_count + [pair[1]] * second_count + extra
    pick = int(rng.integers(2))
    target, count = (pair[pick], (first_count, second_count)[pick])
    other, other_count = (pair[1 - pick], (first_count, second_count)[1 - pick])
    cells = rng.permutation(GRID * GRID)[: len(classes)]
    cell = image_size / GRID
    things = []
    for (c, s), index in zip(classes, cells, strict=True):
        size = cell * float(rng.uniform(0.6, 0.8))
        slack = max(0.0, (cell - size) / 2 - _pad(image_size))
        row, col = divmod(int(index), GRID)
        cx = (col + 0.5) * cell + float(rng.uniform(-slack, slack))
        cy = (row + 0.5) * cell + float(rng.uniform(-slack, slack))
        things.append(Thing(c, s, cx, cy, size))
    copies = [k for k, (c, s) in enumerate(classes) if (c, s) == target]
    exemplar = copies[int(rng.integers(count))]
    return Scene(image_size, tuple(things), target[0], target[1], count, exemplar, other, other_count)


def _draw_thing(draw: ImageDraw.ImageDraw, thing: Thing, scale: float) -> None:
    """Fill one object at `scale` times its coordinates."""
    cx, cy, half = thing.cx * scale, thing.cy * scale, thing.size * scale / 2
    ex, ey = (e * half for e in _EXTENT[thing.shape])
    fill = COLORS[thing.color]
    if thing.shape in ("circle", "oval"):
        draw.ellipse([cx - ex, cy - ey, cx + ex, cy + ey], fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([(cx, cy - ey), (cx + ex, cy + ey), (cx - ex, cy + ey)], fill=fill)
    else:
        draw.polygon([(cx, cy - ey), (cx + ex, cy), (cx, cy + ey), (cx - ex, cy)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image without the box (drawn large, then box-averaged down for smooth edges)."""
    big = Image.new("RGB", (scene.image_size * SUPERSAMPLE,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(big)
    for thing in scene.things:
        _draw_thing(draw, thing, SUPERSAMPLE)
    return big.reduce(SUPERSAMPLE)


def scene_image(scene: Scene, box: Box | None = None) -> Image.Image:
    """The image a model sees: the rendered scene, with the visual-prompt box drawn when given."""
    image = render(scene)
    return draw_box(image, box) if box is not None else image


def questions(scene: Scene) -> dict[str, str]:
    """The three PointQA-level questions about the scene's target class."""
    return {
        "general": "How many of these are there?",
        "obj": f"How many {scene.color} {scene.shape}s are there?",
        "super": f"How many of these {supercategory(scene.shape)} things are there?",
    }


def _check(split: str, question_type: str | None, prompt_style: str, seed: int, image_size: int,
           max_count: int) -> str | None:
    """Validate arguments (ValueError naming the bad one); returns the canonical question type."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown ShapesQA split {split!r}; choose one of: {', '.join(SPLIT_IDS)}")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {prompt_style!r}; choose one of: {', '.join(PROMPT_STYLES)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 2 <= max_count <= MAX_COUNT:
        raise ValueError(f"max_count must be 2..{MAX_COUNT} (two candidates with different counts), got {max_count}")
    if question_type is None:
        return None
    canonical = "obj" if question_type == "object" else question_type
    if canonical not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r}; choose one of: {', '.join(QUESTION_TYPES)}")
    return canonical


def scene_for(i: int, seed: int = 0, split: str = "test", image_size: int = IMAGE_SIZE, max_count: int = 5) -> Scene:
    """Scene i of (seed, split), from its own random generator."""
    return make_scene(np.random.default_rng([seed, SPLIT_IDS[split], i]), image_size, max_count)


def sample_id(i: int, seed: int, split: str) -> str:
    """The id of sample i of (seed, split)."""
    return f"shapes-{split}-{seed}-{i}"


def _meta(scene: Scene, i: int, seed: int, split: str) -> dict[str, Any]:
    """Facts about the scene kept with the sample (and written to shapes.json); boxes are x1, y1, x2, y2 pixels."""
    return {"color": scene.color, "shape": scene.shape, "supercategory": supercategory(scene.shape),
            "count": scene.count, "distractors": len(scene.things) - scene.count - scene.other_count,
            "competitor": {"color": scene.other[0], "shape": scene.other[1], "count": scene.other_count},
            "target_boxes": [[int(v) for v in box] for box in scene.target_boxes()],
            "split": split, "seed": seed, "index": i}


def shapes_sample(i: int, seed: int = 0, split: str = "test", question_type: str | None = None,
                  prompt_style: str = "visual", image_size: int = IMAGE_SIZE, max_count: int = 5) -> Sample:
    """Sample i of (seed, split); question type None cycles general, obj, super with i."""
    asked = _check(split, question_type, prompt_style, seed, image_size, max_count)
    scene = scene_for(i, seed, split, image_size, max_count)
    qtype = asked or QUESTION_TYPES[i % len(QUESTION_TYPES)]
    question = questions(scene)[qtype]
    box = scene.box
    size = (image_size, image_size)
    return Sample(
        id=sample_id(i, seed, split),
        question=question,
        text=prompts.pointqa(question, prompt_style, box, size),
        image_fn=partial(scene_image, scene, box if prompt_style == "visual" else None),
        answer=str(scene.count),
        question_type=qtype,
        box=box,
        prompt_style=prompt_style,
        dataset="shapes",
        scoring="count",
        meta={**_meta(scene, i, seed, split), "image_size": size},
    )


def shapes_samples(n: int, seed: int = 0, split: str = "test", question_type: str | None = None,
                   prompt_style: str = "visual", image_size: int = IMAGE_SIZE, max_count: int = 5) -> list[Sample]:
    """The first n samples of (seed, split): "train" to learn from, "test" (held out) to measure."""
    _check(split, question_type, prompt_style, seed, image_size, max_count)
    return [shapes_sample(i, seed, split, question_type, prompt_style, image_size, max_count) for i in range(n)]


def write_shapes(out_dir: str | Path, n: int, seed: int = 0, split: str = "test", image_size: int = IMAGE_SIZE,
                 max_count: int = 5) -> Path:
    """Write n samples as ViP-LLaVA's PointQA JSON list (`shapes.json`) plus PNGs without the box.

    The pointqa loader reads it back to the same text and images as `shapes_samples` (it draws the
    box itself); each record also keeps its cycled `question_type` and the scene facts under `meta`.
    """
    _check(split, None, "visual", seed, image_size, max_count)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        scene = scene_for(i, seed, split, image_size, max_count)
        ident = sample_id(i, seed, split)
        image_name = f"images/{ident}.png"
        render(scene).save(out / image_name, format="PNG")
        asked = questions(scene)
        records.append({
            "id": ident,
            "image": image_name,
            "bboxes": [[int(v) for v in scene.box]],
            "general_question": asked["general"],
            "obj_question": asked["obj"],
            "super_question": asked["super"],
            "answer": str(scene.count),
            "question_type": QUESTION_TYPES[i % len(QUESTION_TYPES)],
            "meta": _meta(scene, i, seed, split),
        })
    target = out / "shapes.json"
    target.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return target


def split_words(text: str) -> list[str]:
    """Words as a word-level tokenizer should cut them: runs of letters/digits, and single punctuation marks."""
    return re.findall(WORD_PATTERN, text)


def shapes_vocabulary() -> list[str]:
    """Every word any ShapesQA text or answer can contain, sorted.

    Words follow `split_words`; the list also holds the punctuation runs (like '].') that a
    `\\w+|[^\\w\\s]+` splitter (tokenizers' `Whitespace`) would keep together, so either works.
    """
    texts = [str(count) for count in range(10)]
    box = (0.0, 0.0, 1.0, 1.0)
    for color in COLORS:
        for shape in SHAPES:
            scene = Scene(128, (), color, shape, 1, 0)
            for question in questions(scene).values():
                texts += [prompts.pointqa(question, style, box, (1, 1)) for style in PROMPT_STYLES]
    texts += [f"{v / 100:.2f}" for v in range(101)]
    words: set[str] = set()
    for text in texts:
        words.update(split_words(text))
        words.update(re.findall(r"\w+|[^\w\s]+", text))
    return sorted(words)
