"""Grounding from attention maps: a map over image tokens drawn onto the picture, the box it points at, and its
scores against the true boxes. Pure functions on arrays.

A head set's map is the sum of its heads' attention to each image token; each token's weight is spread over its
patch box in original-image pixels (`attention_density`; anyres tiles, crops and thumbnails add up on the same
picture). The box (after Kang et al., CVPR 2025): the density smoothed with a Gaussian (`sigma_cells` token
cells, default half a cell: on coarse grids the mean threshold below widens the box by about 2σ on each side),
the pixels above its mean, the largest 8-connected region of them (ties: the one holding more attention), and
that region's bounding box. Pointing: a pixel of highest (unsmoothed) density lies in a target box. A sample whose
target boxes all lie outside what the model saw (cut off by a centre crop) is not scored, as the run leaves its
pointing NULL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vheads.models import TokenGrid

Box = tuple[float, float, float, float]
MAX_SIDE = 512
SIGMA_CELLS = 0.5
MAX_SIGMA_CELLS = 32.0  # wider than the grid of every first-class family (LLaVA-1.5: 24 cells): the map is flat


def check_sigma(sigma_cells: float) -> float:
    """The smoothing width in token cells, checked: a finite number from 0 (no smoothing) to `MAX_SIGMA_CELLS`."""
    value = float(sigma_cells)
    if not (math.isfinite(value) and 0.0 <= value <= MAX_SIGMA_CELLS):
        raise ValueError(f"--sigma {sigma_cells}: expected token cells from 0 to {MAX_SIGMA_CELLS:g}")
    return value


def _coverage(lo: float, hi: float, size: int) -> tuple[int, np.ndarray]:
    """The first pixel index and the covered fraction of each pixel from `lo` to `hi` along one axis, clipped."""
    first, last = max(0, math.floor(lo)), min(size, math.ceil(hi))
    edges = np.arange(first, max(first, last), dtype=np.float64)
    return first, np.clip(np.minimum(edges + 1, hi) - np.maximum(edges, lo), 0.0, 1.0)


def attention_density(grid: TokenGrid, weights: np.ndarray, width: int, height: int) -> np.ndarray:
    """[height, width] attention mass per pixel: each token's weight spread evenly over its patch box (pixels a
    box covers in part get their share, so boxes with fractional edges keep their mass)."""
    canvas = np.zeros((height, width), dtype=np.float64)
    boxes = grid.boxes[: len(weights)]
    for (x1, y1, x2, y2), weight in zip(boxes, weights, strict=True):
        if not (np.isfinite(weight) and np.isfinite(x1)) or weight <= 0:
            continue
        area = max((x2 - x1) * (y2 - y1), 1e-9)
        c1, cx = _coverage(x1, x2, width)
        r1, cy = _coverage(y1, y2, height)
        if cx.size and cy.size:
            canvas[r1:r1 + cy.size, c1:c1 + cx.size] += (weight / area) * np.outer(cy, cx)
    return canvas


@dataclass
class Raster:
    """A map drawn on the picture at `scale` pixels per original pixel (large images are drawn smaller), and the
    side of a typical token cell in raster pixels (the median over tokens with a patch)."""

    density: np.ndarray
    scale: float
    cell: float


def raster(grid: TokenGrid, weights: np.ndarray, width: int, height: int, max_side: int = MAX_SIDE) -> Raster:
    """The token map `weights` [tokens] of one image drawn on it, at most `max_side` pixels on its longer side."""
    scale = min(1.0, max_side / max(width, height))
    scaled = TokenGrid(grid.boxes * scale, grid.tile, grid.row, grid.col)
    density = attention_density(scaled, np.asarray(weights, dtype=np.float64), max(1, round(width * scale)),
                                max(1, round(height * scale)))
    sides = np.sqrt(np.abs((scaled.boxes[:, 2] - scaled.boxes[:, 0]) * (scaled.boxes[:, 3] - scaled.boxes[:, 1])))
    sides = sides[np.isfinite(sides) & (sides > 0)]
    return Raster(density, scale, float(np.median(sides)) if sides.size else 1.0)


def smooth(density: np.ndarray, sigma: float) -> np.ndarray:
    """The density convolved with a Gaussian of `sigma` pixels (zero outside the picture), up to a constant factor.

    The kernel is cut at 4 sigma, and at the picture's side: taps farther out never meet a pixel, so the work is
    bounded by the picture's size whatever `sigma` is (only the kernel's normalisation, a constant, changes)."""
    density = np.asarray(density, dtype=np.float64)
    if sigma <= 0 or not density.size:
        return density
    reach = int(min(4.0 * sigma + 0.5, max(density.shape)))
    radius = [min(reach, side - 1) for side in density.shape]
    return ndimage.gaussian_filter(density, sigma, mode="constant", radius=radius)


def box_from_map(density: np.ndarray, sigma: float) -> Box | None:
    """The box of the largest 8-connected region above the mean of the density smoothed with `sigma` pixels, as
    (x1, y1, x2, y2) pixel edges; None for a map with no attention."""
    smoothed = smooth(density, sigma)
    if not smoothed.size or smoothed.max() <= 0:
        return None
    labels, count = ndimage.label(smoothed > smoothed.mean(), structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    masses = np.bincount(labels.ravel(), weights=smoothed.ravel())[1:]
    best = int(np.lexsort((-masses, -sizes))[0]) + 1
    rows, cols = np.nonzero(labels == best)
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def peak_on_target(density: np.ndarray, targets: Sequence[Box]) -> bool:
    """Whether a pixel of highest density (any of them, when several tie) lies in one of the target boxes."""
    density = np.asarray(density, dtype=np.float64)
    if not density.size or density.max() <= 0:
        return False
    rows, cols = np.nonzero(density >= density.max() * (1 - 1e-9))
    for x1, y1, x2, y2 in targets:
        if np.any((cols < x2) & (cols + 1 > x1) & (rows < y2) & (rows + 1 > y1)):
            return True
    return False


def iou(a: Box | None, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when `a` is None or they do not meet."""
    if a is None:
        return 0.0
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def best_iou(box: Box | None, targets: Sequence[Box]) -> float:
    """IoU of `box` with the target box it matches best (0 without targets)."""
    return max((iou(box, t) for t in targets), default=0.0)


@dataclass
class Grounded:
    """One sample grounded by one head set: the predicted box and its scores, in original-image pixels (scores
    None when no target box lies on what the model saw)."""

    box: Box | None
    pointing: bool | None
    iou: float | None


def ground_map(grid: TokenGrid, weights: np.ndarray, width: int, height: int, targets: Sequence[Box],
               sigma_cells: float = SIGMA_CELLS) -> Grounded:
    """The box a token map points at on a width x height image, and its pointing and best IoU against `targets`;
    no scores when no target overlaps an image token's patch (the model never saw it, e.g. cut by a centre crop)."""
    drawn = raster(grid, weights, width, height)
    s = drawn.scale
    box = box_from_map(drawn.density, sigma_cells * drawn.cell)
    if box is not None:
        box = (box[0] / s, box[1] / s, min(box[2] / s, float(width)), min(box[3] / s, float(height)))
    if not any(grid.overlaps(t).any() for t in targets):
        return Grounded(box, None, None)
    scaled = [tuple(v * s for v in t) for t in targets]
    return Grounded(box, peak_on_target(drawn.density, scaled), best_iou(box, targets))


def scores(results: Sequence[Grounded]) -> dict[str, float | int | None]:
    """n (samples scored), unseen (samples left out: no target on what the model saw), pointing (share whose peak
    is on a target), iou (mean best IoU) and acc50 (share with IoU >= 0.5)."""
    scored = [r for r in results if r.iou is not None]
    n, unseen = len(scored), len(results) - len(scored)
    if not n:
        return {"n": 0, "unseen": unseen, "pointing": None, "iou": None, "acc50": None}
    ious = np.array([r.iou for r in scored])
    return {"n": n, "unseen": unseen, "pointing": float(np.mean([bool(r.pointing) for r in scored])),
            "iou": float(ious.mean()), "acc50": float((ious >= 0.5).mean())}
