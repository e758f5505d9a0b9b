"""The visual prompt: the box drawn on the image the way ViP-LLaVA draws PointQA boxes.

ViP-LLaVA ('constant' style for pointQA_twice) composites a red rectangle outline, alpha 128, with
line width `int(3 * max_side / 336)`. vheads keeps that but never goes below 2 px, so the box still
shows after small images (ShapesQA's 96 px) are resized for the vision tower; for images wider
than 224 px the two rules agree.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

Box = tuple[float, float, float, float]

BOX_RGB = (255, 0, 0)
BOX_ALPHA = 128
SIZE_ANCHOR = 336
MIN_LINE_WIDTH = 2


def box_line_width(size: tuple[int, int]) -> int:
    """Outline width in pixels for an image of this (width, height)."""
    return max(int(3 * max(size) / SIZE_ANCHOR), MIN_LINE_WIDTH)


def draw_box(image: Image.Image, box: Box) -> Image.Image:
    """A copy of `image` (RGB) with the half-transparent red rectangle around `box` (pixels, x1 y1 x2 y2)."""
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    x1, y1, x2, y2 = box
    ImageDraw.Draw(overlay).rectangle(
        [(x1, y1), (x2, y2)], outline=(*BOX_RGB, BOX_ALPHA), width=box_line_width(base.size)
    )
    return Image.alpha_composite(base, overlay).convert("RGB")


def box_inside(box: Box, size: tuple[int, int], tolerance: float = 1.0) -> bool:
    """True when the box lies within the image, allowing `tolerance` pixels of annotation slop."""
    x1, y1, x2, y2 = box
    width, height = size
    return x1 >= -tolerance and y1 >= -tolerance and x2 <= width + tolerance and y2 <= height + tolerance
