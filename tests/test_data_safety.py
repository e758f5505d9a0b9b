"""What a data file may make vheads open: image paths stay inside --images, huge images are refused from
their header, 16-bit grayscale images keep their contrast, and skipped records are summarised."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from test_data_formats import write_image, write_jsonl

from vheads.data import load_dataset
from vheads.data.images import DEFAULT_MAX_PIXELS, open_file


def question(i: int, image: str) -> dict:
    """A generic LLaVA-style yes/no question about `image`."""
    return {"question_id": i, "image": image, "text": "Is there a square?", "label": "yes"}


def test_relative_paths_that_leave_the_image_folder_are_skipped(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "in.png")
    write_image(tmp_path / "outside.png")
    data = write_jsonl(tmp_path / "q.jsonl", [question(1, "in.png"), question(2, "../outside.png"),
                                              question(3, "sub/../../outside.png"), question(4, "./in.png")])
    dataset = load_dataset("jsonl", data=data, images=images)
    assert [s.id for s in dataset] == ["1", "4"]
    assert dataset.skip_summary() == {"image outside --images": 2}


def test_absolute_image_paths_are_used_as_given(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "a.png"
    write_image(elsewhere)
    (tmp_path / "images").mkdir()
    data = write_jsonl(tmp_path / "q.jsonl", [question(1, str(elsewhere))])
    assert len(load_dataset("jsonl", data=data, images=tmp_path / "images")) == 1


def test_images_over_the_pixel_cap_are_skipped_from_their_header(tmp_path: Path) -> None:
    write_image(tmp_path / "small.png", (40, 30))
    write_image(tmp_path / "big.png", (400, 300))
    data = write_jsonl(tmp_path / "q.jsonl", [question(1, "small.png"), question(2, "big.png")])
    dataset = load_dataset("jsonl", data=data, max_pixels=50_000)
    assert [s.id for s in dataset] == ["1"]
    assert dataset.skip_summary() == {"image too large": 1}
    assert len(load_dataset("jsonl", data=data)) == 2
    assert 4096 * 4096 <= DEFAULT_MAX_PIXELS < 12_000 * 12_000


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_file(path))
    assert rgb.shape == (16, 256, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[0, :, 0], np.linspace(0, 255, 256), atol=1)


def test_float_images_are_scaled_from_their_range(tmp_path: Path) -> None:
    path = tmp_path / "float.tiff"
    Image.fromarray(np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (4, 1))).save(path)
    rgb = np.asarray(open_file(path))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255


def test_many_skips_are_summarised_in_a_few_lines(tmp_path: Path, caplog) -> None:
    write_image(tmp_path / "ok.png")
    records = [question(0, "ok.png")] + [question(i, f"gone-{i}.png") for i in range(1, 1001)]
    data = write_jsonl(tmp_path / "q.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="vheads.data"):
        dataset = load_dataset("jsonl", data=data)
    assert dataset.skip_summary() == {"missing image": 1000}
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) <= 6
    assert "gone-1.png" in lines[0]
    assert any("1,000 records skipped: missing image" in line and "--verbose" in line for line in lines)


def test_verbose_lists_every_skip(tmp_path: Path, caplog) -> None:
    write_image(tmp_path / "ok.png")
    records = [question(0, "ok.png")] + [question(i, f"gone-{i}.png") for i in range(1, 21)]
    data = write_jsonl(tmp_path / "q.jsonl", records)
    with caplog.at_level(logging.INFO, logger="vheads.data"):
        load_dataset("jsonl", data=data)
    listed = [r.getMessage() for r in caplog.records if "gone-" in r.getMessage()]
    assert len(listed) == 20
