"""Tiled image layouts: an image cut into tiles or crops (plus a whole-image frame), each tile its own token grid.

LLaVA-NeXT / OneVision (anyres: base image, then the tiles' joint grid unpadded, with newline tokens),
InternVL (tiles on the best aspect grid, then a thumbnail) and Idefics3 / SmolVLM (row-major crops, then the
global image). Each function replays the processor's resize / pad / crop rules with its settings and returns
the `TokenGrid` of one image in the order the model lays its tokens out.
"""

from __future__ import annotations

import math

import numpy as np

from vheads.compat import select_best_resolution
from vheads.models.geometry import (
    Affine,
    GeometryError,
    TokenGrid,
    empty_grid,
    frame_grid,
    grid_boxes,
    size_value,
)

IDEFICS3_MAX_SIDE = 4096


def square_side(tokens: int, what: str) -> int:
    """The side of a square grid of `tokens` tokens; GeometryError when they do not form one."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise GeometryError(f"{tokens} tokens per {what} do not form a square grid")
    return side


def anyres_tiles(width: int, height: int, pinpoints: list, tile: int, patch: int, newline: bool,
                 max_tiles: int | None = None) -> TokenGrid:
    """The anyres tiles' joint grid with padding rows / cols removed, downsampled to about `max_tiles` tiles'
    worth of tokens when set (OneVision's anyres_max_N), a newline token after each row.

    A token's `tile` is the tile holding its top-left corner; `pixels` are in that tile's frame and may run
    into the neighbouring tile when the grid was downsampled.
    """
    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    scale_w, scale_h = best_w / width, best_h / height
    if scale_w < scale_h:
        new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
    canvas = Affine(new_w / width, (best_w - new_w) // 2, new_h / height, (best_h - new_h) // 2)
    g = tile // patch
    n_pw = best_w // tile
    rows_all, cols_all = (best_h // tile) * g, n_pw * g
    r0, r1, c0, c1 = 0, rows_all, 0, cols_all
    if width / height > cols_all / rows_all:
        pad = (rows_all - int(round(height * (cols_all / width), 7))) // 2
        r0, r1 = pad, rows_all - pad
    else:
        pad = (cols_all - int(round(width * (rows_all / height), 7))) // 2
        c0, c1 = pad, cols_all - pad
    rows, cols = r1 - r0, c1 - c0
    if max_tiles is not None:
        ratio = math.sqrt(rows * cols / (max_tiles * g * g))
        if ratio > 1.1:
            rows, cols = int((r1 - r0) // ratio), int((c1 - c0) // ratio)
    cell_h, cell_w = (r1 - r0) * patch / rows, (c1 - c0) * patch / cols
    boxes = grid_boxes(rows, cols, cell_h, cell_w) + np.array([c0, r0, c0, r0]) * patch
    tr, tc = np.floor(boxes[:, 1] / tile + 1e-9), np.floor(boxes[:, 0] / tile + 1e-9)
    pixels = boxes - np.stack([tc, tr, tc, tr], axis=1) * tile
    tiles = (1 + tr * n_pw + tc).astype(np.int64)
    prow, pcol = np.floor(pixels[:, 1] / patch + 1e-9).astype(np.int64), np.floor(pixels[:, 0] / patch + 1e-9)
    grid = TokenGrid(canvas.invert_boxes(boxes), tiles, prow, pcol.astype(np.int64), pixels)
    if not newline:
        return grid
    parts = []
    for r in range(rows):
        idx = slice(r * cols, (r + 1) * cols)
        parts += [TokenGrid(grid.boxes[idx], grid.tile[idx], grid.row[idx], grid.col[idx], grid.pixels[idx]),
                  empty_grid(1)]
    return TokenGrid.concat(parts)


def base_frame(width: int, height: int, image_processor: object) -> tuple[Affine, int, int]:
    """The anyres base image: squashed to the processor size (shortest_edge square or height x width), then
    centre-cropped when the processor crops; its map and its frame size."""
    size = getattr(image_processor, "size", None)
    side_h = size_value(size, "shortest_edge") or size_value(size, "height")
    side_w = size_value(size, "shortest_edge") or size_value(size, "width")
    t = Affine(side_w / width, 0.0, side_h / height, 0.0)
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None:
        cw, ch = size_value(crop, "width"), size_value(crop, "height")
        t = t.then(Affine(1.0, -((side_w - cw) // 2), 1.0, -((side_h - ch) // 2)))
        side_w, side_h = cw, ch
    return t, side_w, side_h


def llava_next_grid(width: int, height: int, image_processor: object, pinpoints: list, tile: int, patch: int,
                    cls_token: bool, newline: bool, max_tiles: int | None = None) -> TokenGrid:
    """LLaVA-NeXT / OneVision anyres: the base image's grid (CLS first when kept), then the tiles' joint grid,
    in the order `pack_image_features` lays them out."""
    t, _, _ = base_frame(width, height, image_processor)
    g = tile // patch
    base = frame_grid(t, g, g, patch, patch, 0)
    if cls_token:
        base = TokenGrid.concat([empty_grid(1), base])
    return TokenGrid.concat([base, anyres_tiles(width, height, pinpoints, tile, patch, newline, max_tiles)])


def padded_square_grid(width: int, height: int, frame: int, patch: int, newline: bool) -> TokenGrid:
    """OneVision with several images in a prompt: each padded to a centred square, resized to `frame`, one grid
    of patches, then one newline token."""
    side = max(width, height)
    t = Affine(1.0, (side - width) // 2 if width < side else 0, 1.0, (side - height) // 2 if height < side else 0)
    t = t.then(Affine(frame / side, 0.0, frame / side, 0.0))
    g = frame // patch
    grid = frame_grid(t, g, g, patch, patch, 0)
    return TokenGrid.concat([grid, empty_grid(1)]) if newline else grid


def tiled_canvas(height: int, width: int, tile_h: int, tile_w: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """InternVL / GOT-OCR2: the (columns, rows) of tiles whose aspect is closest to the image's; ties go to more
    tiles while the image area exceeds half the tiles' area."""
    grids = sorted(((w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
                    if min_tiles <= w * h <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile_h * tile_w * grid[0] * grid[1]:
            best = grid
    return best


def internvl_grid(width: int, height: int, tile_h: int, tile_w: int, tokens_per_tile: int, crop: bool,
                  min_tiles: int, max_tiles: int) -> TokenGrid:
    """InternVL: the image resized onto a cols x rows canvas of tiles (row-major), then, with more than one tile,
    a thumbnail of the whole image; each tile pixel-shuffled to a square grid of `tokens_per_tile` tokens."""
    side = square_side(tokens_per_tile, "tile")
    cols, rows = tiled_canvas(height, width, tile_h, tile_w, min_tiles, max_tiles) if crop and max_tiles > 1 else (1, 1)
    cell_h, cell_w = tile_h / side, tile_w / side
    canvas = Affine(cols * tile_w / width, 0.0, rows * tile_h / height, 0.0)
    frames = [frame_grid(canvas.then(Affine(1.0, -c * tile_w, 1.0, -r * tile_h)), side, side, cell_h, cell_w,
                         r * cols + c) for r in range(rows) for c in range(cols)]
    if rows * cols > 1:
        thumb = Affine(tile_w / width, 0.0, tile_h / height, 0.0)
        frames.append(frame_grid(thumb, side, side, cell_h, cell_w, rows * cols))
    return TokenGrid.concat(frames)


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """Idefics3's resize: the longest edge set to `longest` (up or down), the other kept in aspect and made even,
    then both capped at 4096."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > IDEFICS3_MAX_SIDE:
        width, height = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE / aspect)
    elif height > width and height > IDEFICS3_MAX_SIDE:
        height, width = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def _multiple_size(height: int, width: int, crop: int) -> tuple[int, int]:
    """Idefics3's resize for the vision encoder: the longer side rounded up to a multiple of `crop`, the other
    side kept in aspect and rounded up too."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / crop) * crop
        height = math.ceil(int(width / aspect) / crop) * crop
    else:
        height = math.ceil(height / crop) * crop
        width = math.ceil(int(height * aspect) / crop) * crop
    return height, width


def idefics3_grid(width: int, height: int, size: object, do_resize: bool, crop: int, split: bool,
                  tokens_per_crop: int) -> TokenGrid:
    """Idefics3 / SmolVLM: resized by the longest edge, rounded up to whole crops and cut into row-major crops,
    then the global image squashed to one crop; each crop pixel-shuffled to `tokens_per_crop` tokens."""
    side = square_side(tokens_per_crop, "crop")
    cell = crop / side
    h, w = height, width
    if do_resize:
        longest = size_value(size, "longest_edge")
        h, w = _longest_edge_size(h, w, longest) if longest else (size_value(size, "height"), size_value(size, "width"))
    squash = Affine(crop / width, 0.0, crop / height, 0.0)
    if not split:
        return frame_grid(squash, side, side, cell, cell, 0)
    h, w = _multiple_size(h, w, crop)
    if h <= crop and w <= crop:
        return frame_grid(squash, side, side, cell, cell, 0)
    rows, cols = h // crop, w // crop
    resized = Affine(w / width, 0.0, h / height, 0.0)
    frames = [frame_grid(resized.then(Affine(1.0, -c * crop, 1.0, -r * crop)), side, side, cell, cell, r * cols + c)
              for r in range(rows) for c in range(cols)]
    return TokenGrid.concat([*frames, frame_grid(squash, side, side, cell, cell, rows * cols)])
