"""ShapesQA: deterministic, split-disjoint, ambiguous without the box, identical through the pointqa loader."""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vheads.data import load_dataset, shapes_samples, shapes_vocabulary, write_shapes
from vheads.data.shapes import (
    COLORS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    SUPERCATEGORIES,
    make_scene,
    scene_for,
    shapes_sample,
    split_words,
    supercategory,
)
from vheads.models.geometry import TokenGrid


def png(image: Image.Image) -> bytes:
    """PNG bytes of an image (the byte-identity check)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def digest(image: Image.Image) -> str:
    """Short hash of an image's PNG bytes."""
    return hashlib.sha256(png(image)).hexdigest()


def test_same_arguments_give_byte_identical_samples() -> None:
    first = shapes_samples(6, seed=7, split="train", prompt_style="plain")
    again = shapes_samples(6, seed=7, split="train", prompt_style="plain")
    assert [(s.id, s.text, s.answer, s.box) for s in first] == [(s.id, s.text, s.answer, s.box) for s in again]
    assert [png(s.image()) for s in first] == [png(s.image()) for s in again]
    alone = shapes_sample(4, seed=7, split="train", prompt_style="plain")
    assert (alone.text, png(alone.image())) == (first[4].text, png(first[4].image()))


def test_splits_and_seeds_never_share_images() -> None:
    train = {digest(s.image()) for s in shapes_samples(150, seed=0, split="train", prompt_style="none")}
    test = {digest(s.image()) for s in shapes_samples(150, seed=0, split="test", prompt_style="none")}
    other_seed = {digest(s.image()) for s in shapes_samples(150, seed=1, split="train", prompt_style="none")}
    assert len(train) == len(test) == 150
    assert not train & test
    assert not train & other_seed


def test_question_types_cycle_and_name_the_right_words() -> None:
    samples = shapes_samples(9, seed=3)
    assert [s.question_type for s in samples] == ["general", "obj", "super"] * 3
    for s in samples:
        color, shape, supercategory = s.meta["color"], s.meta["shape"], s.meta["supercategory"]
        assert shape in SUPERCATEGORIES[supercategory]
        expected = {"general": "How many of these are there?",
                    "obj": f"How many {color} {shape}s are there?",
                    "super": f"How many of these {supercategory} things are there?"}[s.question_type]
        assert s.question == expected
        assert s.text == (f"{expected} The exemplary object is within the rectangle.\n"
                          "Answer the question using a single word or phrase.")
        assert (s.scoring, s.dataset, s.answer) == ("count", "shapes", str(s.meta["count"]))


def test_plain_style_puts_the_box_in_the_text() -> None:
    s = shapes_sample(0, seed=5, question_type="object", prompt_style="plain")
    x1, y1, x2, y2 = (v / IMAGE_SIZE for v in s.box)
    assert f"The exemplary object is at [{x1:.2f}, {y1:.2f}, {x2:.2f}, {y2:.2f}].\n" in s.text
    assert s.question_type == "obj"


scenes = st.builds(
    lambda seed, max_count, size: make_scene(np.random.default_rng(seed), size, max_count),
    st.integers(0, 2**32 - 1), st.integers(2, 7), st.sampled_from([64, IMAGE_SIZE, 128]),
)


def classes(scene) -> Counter:
    """How many copies of each (colour, shape) the scene holds."""
    return Counter((t.color, t.shape) for t in scene.things)


@settings(max_examples=300, deadline=None)
@given(scenes)
def test_without_the_box_two_candidates_differ_in_count(scene) -> None:
    counts = classes(scene)
    target = (scene.color, scene.shape)
    assert counts[target] == scene.count and counts[scene.other] == scene.other_count
    assert scene.other != target and scene.count != scene.other_count
    assert supercategory(scene.other[1]) == supercategory(scene.shape)
    exemplar = scene.things[scene.exemplar]
    assert (exemplar.color, exemplar.shape) == target


@settings(max_examples=300, deadline=None)
@given(scenes)
def test_distractors_are_few_and_of_other_classes(scene) -> None:
    counts = classes(scene)
    extra = {k: n for k, n in counts.items() if k not in {(scene.color, scene.shape), scene.other}}
    assert sum(extra.values()) == len(scene.things) - scene.count - scene.other_count <= 3


def test_distractors_never_single_out_the_target() -> None:
    scenes = [scene_for(i, seed=1, split="train") for i in range(2000)]

    def linked(scene, cls: tuple[str, str]) -> int:
        """Distractor objects sharing colour or shape with `cls`."""
        pair = {(scene.color, scene.shape), scene.other}
        others = [t for t in scene.things if (t.color, t.shape) not in pair]
        return sum(1 for t in others if t.color == cls[0] or t.shape == cls[1])

    to_target = sum(linked(s, (s.color, s.shape)) for s in scenes)
    to_other = sum(linked(s, s.other) for s in scenes)
    assert abs(to_target - to_other) / (to_target + to_other) < 0.05


@settings(max_examples=200, deadline=None)
@given(scenes)
def test_objects_sit_in_their_own_cells_inside_the_image(scene) -> None:
    cell = scene.image_size / GRID
    cells = {(int(t.cx // cell), int(t.cy // cell)) for t in scene.things}
    assert len(cells) == len(scene.things)
    for t in scene.things:
        assert 0.6 * cell <= t.size <= 0.8 * cell
        assert abs(t.cx - (t.cx // cell + 0.5) * cell) + t.size / 2 <= cell / 2
    boxes = scene.target_boxes()
    assert len(boxes) == scene.count and scene.box in boxes
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= scene.image_size and 0 <= y1 < y2 <= scene.image_size


def test_the_box_covers_several_image_tokens_of_the_demo_model() -> None:
    side = IMAGE_SIZE // 16
    edges = np.arange(side) * 16.0
    patches = np.array([[x, y, x + 16, y + 16] for y in edges for x in edges])
    grid = TokenGrid(patches, np.zeros(len(patches)), np.repeat(np.arange(side), side), np.tile(np.arange(side), side))
    covered = [int(grid.overlaps(scene_for(i, seed=5, split="test").box).sum()) for i in range(300)]
    assert min(covered) >= 2 and np.mean(covered) >= 3


def test_the_target_is_either_candidate_and_the_larger_count_only_half_the_time() -> None:
    scenes = [scene_for(i, seed=0, split="train") for i in range(1500)]
    larger = sum(s.count > s.other_count for s in scenes) / len(scenes)
    assert 0.45 < larger < 0.55
    most = sum(max(classes(s).values()) == s.count for s in scenes) / len(scenes)
    assert most < 0.65


def test_meta_keeps_the_competitor_and_every_target_box() -> None:
    s = shapes_sample(3, seed=2, question_type="super")
    scene = scene_for(3, seed=2)
    assert s.meta["competitor"] == {"color": scene.other[0], "shape": scene.other[1], "count": scene.other_count}
    assert s.meta["target_boxes"] == [[int(v) for v in box] for box in scene.target_boxes()]
    assert [int(v) for v in s.box] in s.meta["target_boxes"]
    assert s.meta["distractors"] == len(scene.things) - scene.count - scene.other_count


def test_answers_and_classes_are_spread_evenly() -> None:
    scenes = [scene_for(i, seed=0, split="train") for i in range(1500)]
    for counter, kinds in ((Counter(s.count for s in scenes), 5), (Counter(s.other_count for s in scenes), 5),
                           (Counter(s.color for s in scenes), 4),
                           (Counter(s.shape for s in scenes), 4)):
        assert len(counter) == kinds
        assert max(counter.values()) / min(counter.values()) < 1.35


def test_visual_style_draws_the_box_and_colours_are_used() -> None:
    s = shapes_sample(2, seed=0, question_type="general", prompt_style="visual")
    bare = shapes_sample(2, seed=0, question_type="general", prompt_style="none")
    x1, y1, x2, y2 = (int(v) for v in s.box)
    edge = s.image().getpixel(((x1 + x2) // 2, y1))
    assert edge[0] > 200 and edge[1] < 160
    assert bare.image().getpixel(((x1 + x2) // 2, y1)) != edge
    assert s.image().size == (IMAGE_SIZE, IMAGE_SIZE)
    pixels = set(bare.image().getdata())
    assert COLORS[s.meta["color"]] in pixels


def test_vocabulary_covers_every_text_and_answer() -> None:
    vocabulary = set(shapes_vocabulary())
    assert {"0", "5", "9", "circles", "pointy", "round", "rectangle", "[", "]", "].", "."} <= vocabulary
    for style in ("visual", "plain", "none"):
        for s in shapes_samples(60, seed=2, prompt_style=style):
            assert set(split_words(s.text)) <= vocabulary
            assert set(re.findall(r"\w+|[^\w\s]+", s.text)) <= vocabulary
            assert s.answer in vocabulary
    assert {f"{shape}s" for shape in SHAPES} | set(COLORS) | set(SUPERCATEGORIES) <= vocabulary


@pytest.mark.parametrize("style", ["visual", "plain", "none"])
def test_written_folder_round_trips_through_the_pointqa_loader(tmp_path: Path, style: str) -> None:
    json_path = write_shapes(tmp_path, 12, seed=7, split="test")
    assert json_path == tmp_path / "shapes.json"
    for qtype in ("general", "obj", "super"):
        made = shapes_samples(12, seed=7, question_type=qtype, prompt_style=style)
        read = load_dataset("pointqa", data=json_path, question_type=qtype, prompt_style=style)
        assert [(s.id, s.text, s.answer, s.box, s.question_type) for s in made] == [
            (s.id, s.text, s.answer, s.box, s.question_type) for s in read]
        assert [png(s.image()) for s in made] == [png(s.image()) for s in read]
    cycled = load_dataset("shapes", data=tmp_path, prompt_style=style)
    assert cycled.name == "shapes"
    assert [s.text for s in cycled] == [s.text for s in shapes_samples(12, seed=7, prompt_style=style)]


def test_saved_png_has_no_box(tmp_path: Path) -> None:
    write_shapes(tmp_path, 1, seed=4)
    saved = Image.open(tmp_path / "images" / "shapes-test-4-0.png").convert("RGB")
    assert png(saved) == png(shapes_sample(0, seed=4, prompt_style="none").image())


@pytest.mark.parametrize("kwargs", [{"split": "dev"}, {"question_type": "colour"}, {"prompt_style": "arrow"},
                                    {"seed": -1}, {"max_count": 1}, {"max_count": 8},
                                    {"image_size": 8}])
def test_bad_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        shapes_samples(1, **kwargs)


def test_registry_refuses_bad_shapes_options() -> None:
    from vheads.data import DataError

    with pytest.raises(DataError, match="split"):
        load_dataset("shapes", split="dev")
    with pytest.raises(DataError, match="seed"):
        load_dataset("shapes", seed=-3)
