"""Where each image token comes from: its patch in the processed image and its box in the original image.

Each family's processor resizes, pads and crops differently; these functions replay those steps as affine
maps, so a box given in original pixels becomes the set of image tokens whose patch it overlaps, and an
attention map over image tokens can be drawn back onto the original image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class GeometryError(ValueError):
    """The image tokens of a model cannot be mapped back to patches."""


@dataclass
class TokenGrid:
    """Geometry of the image tokens of one image, in token order.

    `boxes` [n, 4] are the (x1, y1, x2, y2) of each token's patch in original image pixels (NaN for tokens
    with no patch: CLS, row newlines); `tile` is the index of the frame of the image's pixel_values the token
    reads (0 for the base image, 1.. for anyres tiles; crops and thumbnails in processor order), -1 for none;
    `row` / `col` index the patch inside its tile's grid (-1 for none); `pixels` [n, 4], where the layout sets
    it, is the token's box in its frame's processed pixels (NaN for none).
    """

    boxes: np.ndarray
    tile: np.ndarray
    row: np.ndarray
    col: np.ndarray
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def overlaps(self, box: tuple[float, float, float, float] | None) -> np.ndarray:
        """Bool [n]: tokens whose patch overlaps `box` (x1, y1, x2, y2 in original pixels) with positive area."""
        if box is None:
            return np.zeros(len(self), dtype=bool)
        x1, y1, x2, y2 = box
        b = self.boxes
        with np.errstate(invalid="ignore"):
            return (b[:, 0] < x2) & (b[:, 2] > x1) & (b[:, 1] < y2) & (b[:, 3] > y1)

    @staticmethod
    def concat(grids: list[TokenGrid]) -> TokenGrid:
        """The geometry of several images' tokens laid one after another."""
        parts = [np.concatenate([getattr(g, f) for g in grids]) for f in ("boxes", "tile", "row", "col")]
        pixels = None
        if any(g.pixels is not None for g in grids):
            pixels = np.concatenate([g.pixels if g.pixels is not None else np.full((len(g), 4), np.nan)
                                     for g in grids])
        return TokenGrid(*parts, pixels=pixels)


@dataclass(frozen=True)
class Affine:
    """An axis-aligned map `out = in * scale + offset` per axis, for composing resize / pad / crop steps."""

    sx: float = 1.0
    ox: float = 0.0
    sy: float = 1.0
    oy: float = 0.0

    def then(self, other: Affine) -> Affine:
        """This map followed by `other`."""
        return Affine(self.sx * other.sx, self.ox * other.sx + other.ox,
                      self.sy * other.sy, self.oy * other.sy + other.oy)

    def invert_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes in output space mapped back to input space."""
        out = np.array(boxes, dtype=np.float64)
        out[:, [0, 2]] = (out[:, [0, 2]] - self.ox) / self.sx
        out[:, [1, 3]] = (out[:, [1, 3]] - self.oy) / self.sy
        return out


def size_value(size: object, key: str) -> int | None:
    """An entry of a processor size setting (dict or SizeDict), None when unset."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def grid_boxes(rows: int, cols: int, cell_h: float, cell_w: float) -> np.ndarray:
    """Boxes of a rows x cols grid of cells, row-major, as [rows*cols, 4]."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r, c = r.ravel().astype(np.float64), c.ravel().astype(np.float64)
    return np.stack([c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h], axis=1)


def processor_key(image_processor: object) -> tuple:
    """The image-processor settings the token grids depend on, as a hashable key for caching grids."""
    names = ("do_pad", "do_resize", "size", "do_center_crop", "crop_size")
    return tuple(str(getattr(image_processor, name, None)) for name in names)


def clip_transform(width: int, height: int, image_processor: object) -> tuple[Affine, int, int]:
    """The affine map of a CLIP-style processor (optional pad to square, resize, centre crop) and its output size."""
    t = Affine()
    w, h = width, height
    if getattr(image_processor, "do_pad", False) and w != h:
        side = max(w, h)
        t = t.then(Affine(1.0, (side - w) // 2, 1.0, (side - h) // 2))
        w = h = side
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_resize", True) and size is not None:
        if size_value(size, "shortest_edge"):
            short = size_value(size, "shortest_edge")
            if w <= h:
                nw, nh = short, int(short * h / w)
            else:
                nw, nh = int(short * w / h), short
        else:
            nw, nh = size_value(size, "width"), size_value(size, "height")
        t = t.then(Affine(nw / w, 0.0, nh / h, 0.0))
        w, h = nw, nh
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None:
        cw, ch = size_value(crop, "width"), size_value(crop, "height")
        t = t.then(Affine(1.0, -((w - cw) // 2), 1.0, -((h - ch) // 2)))
        w, h = cw, ch
    return t, w, h


def clip_grid(width: int, height: int, image_processor: object, patch: int, cls_token: bool) -> TokenGrid:
    """LLaVA-1.5 / ViP-LLaVA: one grid of patches over the processed image, plus the CLS token if kept."""
    t, w, h = clip_transform(width, height, image_processor)
    grid = frame_grid(t, h // patch, w // patch, patch, patch, 0)
    if cls_token:
        grid = TokenGrid.concat([empty_grid(1), grid])
    return grid


def empty_grid(n: int) -> TokenGrid:
    """`n` tokens with no patch (CLS, newline and separator tokens)."""
    return TokenGrid(np.full((n, 4), np.nan), np.full(n, -1), np.full(n, -1), np.full(n, -1), np.full((n, 4), np.nan))


def frame_grid(to_frame: Affine, rows: int, cols: int, cell_h: float, cell_w: float, frame: int) -> TokenGrid:
    """A rows x cols grid of tokens, row-major, over one processed frame that `to_frame` maps the original image to."""
    pixels = grid_boxes(rows, cols, cell_h, cell_w)
    r, c = np.divmod(np.arange(rows * cols), cols)
    return TokenGrid(to_frame.invert_boxes(pixels), np.full(rows * cols, frame), r, c, pixels)


def merged_grid(width: int, height: int, grid_thw: tuple[int, int, int], patch: int, merge: int) -> TokenGrid:
    """Qwen2-VL style: the image resized (no crop) to a patch grid, each token one merge x merge block."""
    t, gh, gw = (int(v) for v in grid_thw)
    cell = patch * merge
    resized = Affine(gw * patch / width, 0.0, gh * patch / height, 0.0)
    return TokenGrid.concat([frame_grid(resized, gh // merge, gw // merge, cell, cell, 0)] * t)


def squashed_grid(width: int, height: int, rows: int, cols: int, frame_h: int, frame_w: int) -> TokenGrid:
    """PaliGemma style: the image squashed to frame_h x frame_w, one token per cell of a rows x cols grid."""
    squash = Affine(frame_w / width, 0.0, frame_h / height, 0.0)
    return frame_grid(squash, rows, cols, frame_h / rows, frame_w / cols, 0)


def pixtral_grid(width: int, height: int, resized_h: int, resized_w: int, cell: int) -> TokenGrid:
    """Pixtral / Mistral 3: the image resized (aspect kept) to resized_h x resized_w, one token per cell x cell block.

    The row-break and end tokens the processor puts after each row are not image tokens, so the grid is only the cells.
    """
    resized = Affine(resized_w / width, 0.0, resized_h / height, 0.0)
    return frame_grid(resized, resized_h // cell, resized_w // cell, cell, cell, 0)


def pooled_grid(width: int, height: int, tokens: int, frame_h: int, frame_w: int) -> TokenGrid:
    """Gemma 3 style: the image squashed to frame_h x frame_w and pooled to a sqrt(tokens) x sqrt(tokens) grid."""
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens:
        raise GeometryError(f"{tokens} image tokens do not form a square grid")
    return squashed_grid(width, height, side, side, frame_h, frame_w)
