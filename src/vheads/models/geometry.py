"""Where each image token comes from: its patch in the processed image and its box in the original image.

Each family's processor resizes, pads and crops differently; these functions replay those steps as affine
maps, so a box given in original pixels becomes the set of image tokens whose patch it overlaps, and an
attention map over image tokens can be drawn back onto the original image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from transformers.image_processing_utils import select_best_resolution


class GeometryError(ValueError):
    """The image tokens of a model cannot be mapped back to patches."""


@dataclass
class TokenGrid:
    """Geometry of the image tokens of one image, in token order.

    `boxes` [n, 4] are the (x1, y1, x2, y2) of each token's patch in original image pixels (NaN for tokens
    with no patch: CLS, row newlines); `tile` is 0 for the base image, 1.. for anyres tiles, -1 for none;
    `row` / `col` index the patch inside its tile's grid of pixel_values (-1 for none).
    """

    boxes: np.ndarray
    tile: np.ndarray
    row: np.ndarray
    col: np.ndarray

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
        return TokenGrid(*(np.concatenate([getattr(g, f) for g in grids]) for f in ("boxes", "tile", "row", "col")))


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


def _size(size: object, key: str) -> int | None:
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
        if _size(size, "shortest_edge"):
            short = _size(size, "shortest_edge")
            if w <= h:
                nw, nh = short, int(short * h / w)
            else:
                nw, nh = int(short * w / h), short
        else:
            nw, nh = _size(size, "width"), _size(size, "height")
        t = t.then(Affine(nw / w, 0.0, nh / h, 0.0))
        w, h = nw, nh
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None:
        cw, ch = _size(crop, "width"), _size(crop, "height")
        t = t.then(Affine(1.0, -((w - cw) // 2), 1.0, -((h - ch) // 2)))
        w, h = cw, ch
    return t, w, h


def clip_grid(width: int, height: int, image_processor: object, patch: int, cls_token: bool) -> TokenGrid:
    """LLaVA-1.5 / ViP-LLaVA: one grid of patches over the processed image, plus the CLS token if kept."""
    t, w, h = clip_transform(width, height, image_processor)
    rows, cols = h // patch, w // patch
    boxes = t.invert_boxes(grid_boxes(rows, cols, patch, patch))
    r, c = np.divmod(np.arange(rows * cols), cols)
    grid = TokenGrid(boxes, np.zeros(rows * cols, dtype=np.int64), r, c)
    if cls_token:
        grid = TokenGrid.concat([_empty(1), grid])
    return grid


def _empty(n: int) -> TokenGrid:
    return TokenGrid(np.full((n, 4), np.nan), np.full(n, -1), np.full(n, -1), np.full(n, -1))


def llava_next_grid(width: int, height: int, image_processor: object, pinpoints: list, tile: int, patch: int,
                    cls_token: bool, newline: bool) -> TokenGrid:
    """LLaVA-NeXT anyres: the base image's grid, then the tiles' joint grid with padding rows / cols removed
    and a newline token after each row, in the order `pack_image_features` lays them out."""
    size = getattr(image_processor, "size", None)
    side = _size(size, "shortest_edge") or _size(size, "height")
    side_w = _size(size, "shortest_edge") or _size(size, "width")
    crop = getattr(image_processor, "crop_size", None)
    base_t = Affine(side_w / width, 0.0, side / height, 0.0)
    bw, bh = side_w, side
    if getattr(image_processor, "do_center_crop", False) and crop is not None:
        cw, ch = _size(crop, "width"), _size(crop, "height")
        base_t = base_t.then(Affine(1.0, -((bw - cw) // 2), 1.0, -((bh - ch) // 2)))
        bw, bh = cw, ch
    g = tile // patch
    base = TokenGrid(base_t.invert_boxes(grid_boxes(g, g, patch, patch)), np.zeros(g * g, dtype=np.int64),
                     *np.divmod(np.arange(g * g), g))
    if cls_token:
        base = TokenGrid.concat([_empty(1), base])

    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    scale_w, scale_h = best_w / width, best_h / height
    if scale_w < scale_h:
        new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
    tile_t = Affine(new_w / width, (best_w - new_w) // 2, new_h / height, (best_h - new_h) // 2)
    n_ph, n_pw = best_h // tile, best_w // tile
    rows_all, cols_all = n_ph * g, n_pw * g
    r0, r1, c0, c1 = 0, rows_all, 0, cols_all
    if width / height > cols_all / rows_all:
        kept = int(round(height * (cols_all / width), 7))
        pad = (rows_all - kept) // 2
        r0, r1 = pad, rows_all - pad
    else:
        kept = int(round(width * (rows_all / height), 7))
        pad = (cols_all - kept) // 2
        c0, c1 = pad, cols_all - pad
    parts = []
    for rr in range(r0, r1):
        cc = np.arange(c0, c1)
        boxes = np.stack([cc * patch, np.full(cc.shape, rr * patch), (cc + 1) * patch,
                          np.full(cc.shape, (rr + 1) * patch)], axis=1).astype(np.float64)
        tiles = 1 + (rr // g) * n_pw + cc // g
        parts.append(TokenGrid(tile_t.invert_boxes(boxes), tiles, np.full(cc.shape, rr % g), cc % g))
        if newline:
            parts.append(_empty(1))
    return TokenGrid.concat([base, *parts])


def merged_grid(width: int, height: int, grid_thw: tuple[int, int, int], patch: int, merge: int) -> TokenGrid:
    """Qwen2-VL style: the image resized (no crop) to a patch grid, each token one merge x merge block."""
    t, gh, gw = (int(v) for v in grid_thw)
    rows, cols = gh // merge, gw // merge
    cell = patch * merge
    resized = Affine(gw * patch / width, 0.0, gh * patch / height, 0.0)
    boxes = resized.invert_boxes(grid_boxes(rows, cols, cell, cell))
    r, c = np.divmod(np.arange(rows * cols), cols)
    one = TokenGrid(boxes, np.zeros(rows * cols, dtype=np.int64), r, c)
    return TokenGrid.concat([one] * t)


def pooled_grid(width: int, height: int, tokens: int) -> TokenGrid:
    """Gemma 3 style: the image squashed to a square and pooled to a sqrt(tokens) x sqrt(tokens) grid."""
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens:
        raise GeometryError(f"{tokens} image tokens do not form a square grid")
    boxes = grid_boxes(side, side, height / side, width / side)
    r, c = np.divmod(np.arange(tokens), side)
    return TokenGrid(boxes, np.zeros(tokens, dtype=np.int64), r, c)
