"""Localization heads: the few heads whose attention marks where the asked-about object is.

After Kang et al., CVPR 2025, "Your large vision-language model only needs a few attention heads for visual
grounding". What vheads implements, on a stored run (every figure comes from the run's readout row):

1. Image attention: each head's mean visual weight W over the run's samples, sorted from high to low. The elbow
   of that curve is the point farthest from the chord joining its first and last points (the chord method);
   the heads up to and including the elbow are kept (the next heads by W are added if fewer than K are kept).
2. Spatial entropy (`metrics.spatial_entropy`, recorded per sample and head by `vheads run`): the tokens above
   the map's mean form connected regions on the patch grid, H = −Σ P log P over the regions' shares of that
   attention; low H means one compact region.
3. For each sample, the kept heads with the `per_sample` (10) lowest entropies get a vote; heads are ranked by
   votes (Kang et al.'s selection frequency), ties by lower mean entropy, then by higher mean W; take K.

Differences from the paper: the attention maps are over the tokens of each frame of the family's geometry
(tiles and thumbnails each their own grid), the readout row is vheads's (`--readout`), and the rule runs on the
run's own samples rather than on 1,000 RefCOCO training samples; no bottom-row filter is applied.
"""

from __future__ import annotations

import numpy as np

from vheads.heads import Head

PER_SAMPLE = 10


def elbow(values: np.ndarray) -> int:
    """Index of the elbow of a curve already sorted from high to low: the point farthest from the chord from the
    first point to the last (the chord method); 0 for curves of one or two points."""
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    if n <= 2:
        return 0
    chord = y[0] + (y[-1] - y[0]) * np.arange(n) / (n - 1)
    return int(np.argmax(np.abs(y - chord)))


def candidates(mean_w: np.ndarray, measured: np.ndarray, k: int) -> list[Head]:
    """Step 1: the heads at or above the elbow of mean W (at least `k` of them), highest W first.

    `mean_w` and `measured` are [layers, heads]; heads not measured (or with no W) are never candidates."""
    heads = mean_w.shape[1]
    pool = [(int(i // heads), int(i % heads)) for i in np.flatnonzero(measured.ravel() & np.isfinite(mean_w.ravel()))]
    pool.sort(key=lambda h: (-mean_w[h], h))
    if not pool:
        return []
    cut = elbow(np.array([mean_w[h] for h in pool])) + 1
    return pool[: max(cut, k)]


def rank(entropy: np.ndarray, mean_w: np.ndarray, pool: list[Head], per_sample: int = PER_SAMPLE) -> list[Head]:
    """Steps 2-3: `pool` ranked by votes (a vote per sample where the head is among the `per_sample` lowest
    entropies of the pool), then lower mean entropy, then higher mean W. `entropy` is [samples, layers, heads]."""
    if not pool:
        return []
    index = tuple(np.array(pool).T)
    values = np.asarray(entropy, dtype=np.float64)[(slice(None), *index)]
    finite = np.isfinite(values)
    order = np.argsort(np.where(finite, values, np.inf), axis=1, kind="stable")[:, :per_sample]
    votes = np.zeros(len(pool))
    for row, picked in enumerate(order):
        votes[picked[finite[row, picked]]] += 1
    with np.errstate(invalid="ignore"):
        mean_e = np.where(finite.any(axis=0), np.nansum(values, axis=0) / np.maximum(finite.sum(axis=0), 1), np.inf)
    keys = sorted(range(len(pool)), key=lambda i: (-votes[i], mean_e[i], -mean_w[pool[i]], pool[i]))
    return [pool[i] for i in keys]


def localization_heads(mean_w: np.ndarray, entropy: np.ndarray, measured: np.ndarray, k: int,
                       per_sample: int = PER_SAMPLE) -> list[Head]:
    """The K localization heads of a run: `candidates`, then `rank`, the first K (fewer if fewer have a W)."""
    return rank(entropy, mean_w, candidates(mean_w, measured, k), per_sample)[:k]
