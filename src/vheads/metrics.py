"""The figures of DESIGN.md as pure functions on arrays.

Every function takes numpy arrays (or torch tensors for the per-row figures, so the capture engine runs
the very same code on the device) and returns arrays; nothing here does I/O or touches a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

STAGES = ("early", "mid", "late")


def _xp(a: Any) -> Any:
    """The array namespace of `a`: torch for tensors, numpy otherwise."""
    if type(a).__module__.startswith("torch"):
        import torch

        return torch
    return np


def visual_weight(attn: Any, image_mask: Any) -> Any:
    """W = sum of attention on image tokens. `attn` [..., keys], `image_mask` [..., keys] bool (broadcast)."""
    return (attn * image_mask).sum(-1)


def concentration(attn: Any, image_mask: Any) -> Any:
    """C = 1 - H(p) / log N with p the attention renormalised over the N image tokens.

    1 means all image attention sits on one token, 0 means it is spread evenly. NaN where W = 0 or N < 2.
    """
    xp = _xp(attn)
    masked = attn * image_mask
    w = masked.sum(-1)
    n = (image_mask * xp.ones_like(attn)).sum(-1)
    safe_w = xp.where(w > 0, w, xp.ones_like(w))
    p = masked / safe_w[..., None]
    plogp = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, xp.ones_like(p))), xp.zeros_like(p))
    entropy = -plogp.sum(-1)
    log_n = xp.log(xp.where(n >= 2, n, 2 * xp.ones_like(n)))
    c = 1.0 - entropy / log_n
    nan = xp.full_like(c, float("nan"))
    return xp.where((w > 0) & (n >= 2), c, nan)


def region_share(region_weight: Any, visual_weight: Any) -> Any:
    """Rw / W: the share of the image attention that falls on the asked-about region (NaN where W = 0)."""
    xp = _xp(region_weight)
    safe = xp.where(visual_weight > 0, visual_weight, xp.ones_like(visual_weight))
    return xp.where(visual_weight > 0, region_weight / safe, xp.full_like(region_weight, float("nan")))


def attention_figures(
    attn: Any,
    image_mask: Any,
    region_mask: Any | None = None,
    text_mask: Any | None = None,
    sink_mask: Any | None = None,
) -> dict[str, Any]:
    """All per-row figures of one attention distribution: W, C, region weight, text weight, sink weight.

    `attn` is [..., keys]; each mask is bool [..., keys] and broadcasts against it. A missing region mask
    gives NaN region weight (the sample has no box); missing text / sink masks give NaN too.
    """
    xp = _xp(attn)
    w = visual_weight(attn, image_mask)
    nan = xp.full_like(w, float("nan"))
    return {
        "visual_weight": w,
        "concentration": concentration(attn, image_mask),
        "region_weight": nan if region_mask is None else (attn * region_mask).sum(-1),
        "text_weight": nan if text_mask is None else (attn * text_mask).sum(-1),
        "sink_weight": nan if sink_mask is None else (attn * sink_mask).sum(-1),
    }


# The figures `figures_from_sums` returns, in the order of its last axis (their declarations: `vheads.figures`).
SUM_FIGURES = ("visual_weight", "concentration", "region_weight", "text_weight", "sink_weight")


def pointing(attn: Any, image_mask: Any, target_mask: Any) -> Any:
    """1 where the most-attended image token is a target token, else 0; NaN where no image token has attention.

    `attn` [..., keys]; the bool masks [..., keys] broadcast against it. The most-attended token is the first one
    of highest attention (argmax order). Where the sample has no target, the caller marks the result NaN.
    """
    xp = _xp(attn)
    masked = xp.where(image_mask, attn, -1.0 * xp.ones_like(attn))
    if xp is np:
        top = np.argmax(masked, axis=-1)[..., None]
        peak = np.take_along_axis(masked, top, -1)[..., 0]
        hit = np.take_along_axis(np.broadcast_to(target_mask, masked.shape), top, -1)[..., 0]
    else:
        top = masked.argmax(-1, keepdim=True)
        peak = masked.gather(-1, top)[..., 0]
        hit = target_mask.expand(masked.shape).gather(-1, top)[..., 0]
    value = hit * xp.ones_like(peak)
    return xp.where(peak > 0, value, xp.full_like(peak, float("nan")))


def spatial_entropy(maps: np.ndarray, tile: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Spatial entropy of attention maps over image tokens (Kang et al., CVPR 2025): lower = one compact region.

    The tokens whose attention is above the map's mean form connected regions (8-neighbours on the patch grid of
    the token's own frame: `tile`, `row`, `col` per token, tile -1 for tokens without a patch, left out); with
    P_r = Σ_{i∈r}(a_i − mean) / Σ_{i above the mean}(a_i − mean), H = −Σ_r P_r log P_r. `maps` [..., n]; returns
    [...], NaN where no token is above the mean (an even or empty map). Frames are labelled separately, so a
    region that crosses a tile border counts once per tile.
    """
    from scipy import ndimage

    maps = np.asarray(maps, dtype=np.float64)
    shape = maps.shape[:-1]
    keep = np.asarray(tile) >= 0
    flat = maps.reshape(-1, maps.shape[-1])[:, keep]
    tile, row, col = (np.asarray(v)[keep].astype(np.int64) for v in (tile, row, col))
    m = flat.shape[0]
    if m == 0 or flat.shape[1] == 0:
        return np.full(shape, np.nan)
    excess = flat - flat.mean(axis=1, keepdims=True)
    above = excess > 0
    labels = np.zeros(flat.shape, dtype=np.int64)
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = True
    offset = 0
    for frame in np.unique(tile):
        idx = np.flatnonzero(tile == frame)
        canvas = np.zeros((m, int(row[idx].max()) + 1, int(col[idx].max()) + 1), dtype=bool)
        canvas[:, row[idx], col[idx]] = above[:, idx]
        found, count = ndimage.label(canvas, structure=plane)
        labels[:, idx] = np.where(found[:, row[idx], col[idx]] > 0, found[:, row[idx], col[idx]] + offset, 0)
        offset += count
    mass = np.bincount(labels.ravel(), weights=np.where(above, excess, 0.0).ravel(), minlength=offset + 1)
    owner = np.zeros(offset + 1, dtype=np.int64)
    owner[labels] = np.arange(m)[:, None]
    total = np.bincount(owner[1:], weights=mass[1:], minlength=m)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = mass[1:] / total[owner[1:]]
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = np.bincount(owner[1:], weights=terms, minlength=m)
    return np.where(total > 0, entropy, np.nan).reshape(shape)


def masked_sums(attn: Any, key_masks: Any) -> Any:
    """The linear part of the figures, [..., rows, 5]: W, region, text and sink weight, and sum(a log a) over
    the image tokens. `attn` is [..., rows, keys]; `key_masks` [..., keys, 4] holds the image, region, text
    and sink masks as 0/1 columns. Two matrix products, so the capture engine can run it for every layer."""
    xp = _xp(attn)
    if xp is np:
        positive = attn > 0
        a_log_a = np.where(positive, attn * np.log(np.where(positive, attn, 1.0)), 0.0)
    else:
        a_log_a = xp.special.xlogy(attn, attn)
    return xp.concatenate([attn @ key_masks, a_log_a @ key_masks[..., :1]], -1)


def figures_from_sums(sums: Any, image_tokens: Any) -> Any:
    """The five figures [..., 5] (order of SUM_FIGURES) from `masked_sums` and the image-token count N [...].

    C uses H(p) = log W - sum(a log a) / W with a the attention on image tokens, which equals the entropy
    of a renormalised over them; C is NaN where W = 0 or N < 2, as in `concentration`.
    """
    xp = _xp(sums)
    w, a_log_a = sums[..., 0], sums[..., 4]
    n = image_tokens * xp.ones_like(w)
    safe_w = xp.where(w > 0, w, xp.ones_like(w))
    entropy = xp.log(safe_w) - a_log_a / safe_w
    log_n = xp.log(xp.where(n >= 2, n, 2 * xp.ones_like(n)))
    c = xp.where((w > 0) & (n >= 2), 1.0 - entropy / log_n, xp.full_like(w, float("nan")))
    return xp.stack([w, c, sums[..., 1], sums[..., 2], sums[..., 3]], -1)


def default_top_k(layers: int, heads: int) -> int:
    """DESIGN.md's K: round(0.1 * layers * heads), at least 1 (the paper used 100 of 1,024)."""
    return max(1, int(round(0.1 * layers * heads)))


def head_scores(visual_weight: np.ndarray, k: int | None = None) -> np.ndarray:
    """Fraction of the samples that have the readout row in which each head is among the top-K heads by W.

    `visual_weight` is [samples, layers, heads]; returns [layers, heads]. A sample has the readout row when any
    of its heads has a W (e.g. `first-generated` with a one-token answer has none); only those count. NaN weights
    never make the top K; ties are broken by head order (lower layer, then lower head first). The score is NaN
    (undefined) where no sample has the row, and for heads with no W in any sample (layers without attention).
    K must be between 1 and layers x heads.
    """
    w = np.asarray(visual_weight, dtype=np.float64)
    if w.ndim != 3:
        raise ValueError(f"visual_weight must be [samples, layers, heads], got shape {w.shape}")
    n, layers, heads = w.shape
    k = default_top_k(layers, heads) if k is None else k
    if not 1 <= k <= layers * heads:
        raise ValueError(f"top-K must be between 1 and {layers * heads} (layers x heads), got {k}")
    finite = np.isfinite(w).reshape(n, layers * heads)
    answered = finite.any(axis=1)
    if not answered.any():
        return np.full((layers, heads), np.nan)
    flat = np.where(finite, w.reshape(n, layers * heads), -np.inf)[answered]
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    in_top = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(in_top, order, True, axis=1)
    in_top &= finite[answered]
    scores = in_top.mean(axis=0)
    scores[~finite.any(axis=0)] = np.nan
    return scores.reshape(layers, heads)


def readout_samples(visual_weight: np.ndarray) -> int:
    """How many samples of a [samples, layers, heads] W array have the readout row (any finite W): the score's
    denominator."""
    w = np.asarray(visual_weight, dtype=np.float64)
    return int(np.isfinite(w.reshape(w.shape[0], -1)).any(axis=1).sum()) if w.size else 0


Stages = tuple[int, int]
# The reference code's stage boundaries per language-model depth (its released head tables fix them).
PAPER_STAGES = {24: (8, 16), 32: (10, 20), 40: (13, 27)}


def thirds(layers: int) -> Stages:
    """DESIGN.md's default boundaries: floor(L/3) and floor(2L/3)."""
    return layers // 3, (2 * layers) // 3


def paper_stages(layers: int) -> Stages:
    """The reference code's boundaries for a depth it studied (24, 32, 40 layers), thirds otherwise."""
    return PAPER_STAGES.get(layers, thirds(layers))


def parse_stages(text: str) -> Stages:
    """'10,20' -> (10, 20): the first mid layer and the first late layer."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--stages {text!r}: expected two layer numbers A,B (mid starts at A, late at B)")
    return int(parts[0]), int(parts[1])


def check_stages(bounds: Sequence[int], layers: int) -> Stages:
    """The boundaries as a pair, or ValueError unless 0 < A < B < layers (every stage non-empty)."""
    a, b = (int(v) for v in bounds)
    if not 0 < a < b < layers:
        raise ValueError(f"--stages {a},{b}: need 0 < A < B < {layers} (the model's layers) so no stage is empty")
    return a, b


def stage_of(layer: int, layers: int, bounds: Sequence[int] | None = None) -> str:
    """early = [0, A), mid = [A, B), late = [B, L); by default A = floor(L/3), B = floor(2L/3)."""
    if not 0 <= layer < layers:
        raise ValueError(f"layer {layer} is outside 0..{layers - 1}")
    a, b = thirds(layers) if bounds is None else bounds
    if layer < a:
        return "early"
    if layer < b:
        return "mid"
    return "late"


def stage_layers(stage: str, layers: int, bounds: Sequence[int] | None = None) -> list[int]:
    """The layers of one stage, per `stage_of`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return [layer for layer in range(layers) if stage_of(layer, layers, bounds) == stage]


def rank_heads(scores: np.ndarray, mean_w: np.ndarray) -> list[tuple[int, int]]:
    """All (layer, head) pairs ranked by score, then by mean W, both descending (NaN last)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    w = np.nan_to_num(np.asarray(mean_w, dtype=np.float64), nan=-np.inf)
    layers, heads = s.shape
    order = np.lexsort((-w.ravel(), -s.ravel()))
    return [(int(i // heads), int(i % heads)) for i in order]


def visual_head_flags(scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Visual-head flag per head: score >= threshold (DESIGN.md: 0.5)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.nan_to_num(s, nan=-1.0) >= threshold


def nanmean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean over `axis` ignoring NaN, NaN where every value is NaN (no warning)."""
    x = np.asarray(x, dtype=np.float64)
    count = np.sum(~np.isnan(x), axis=axis)
    total = np.nansum(x, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

