"""Small statistics the analyses share: bootstrap and t intervals, NaN-safe correlations, depth resampling."""

from __future__ import annotations

import numpy as np
from scipy import stats as sps


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over axis 0 (samples), NaN ignored, for every trailing cell.

    Vectorised: each replicate is a multinomial count per sample, so memory is replicates x samples plus
    replicates x cells, never replicates x samples x cells. Cells with no value get NaN bounds.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    cells = x.reshape(n, -1)
    if n == 0:
        nan = np.full(x.shape[1:], np.nan)
        return nan, nan.copy()
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    valid = ~np.isnan(cells)
    totals = counts @ np.where(valid, cells, 0.0)
    seen = counts @ valid.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(seen > 0, totals / np.maximum(seen, 1), np.nan)
    tail = (1.0 - level) / 2 * 100
    empty = ~valid.any(axis=0)
    means[:, empty] = 0.0
    low, high = np.nanpercentile(means, [tail, 100 - tail], axis=0)
    low[empty], high[empty] = np.nan, np.nan
    return low.reshape(x.shape[1:]), high.reshape(x.shape[1:])


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of a few values (e.g. one accuracy per random seed); NaN bounds for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = float(sps.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the positions where both are finite; NaN if fewer than 3 or either is constant."""
    x, y = _paired(a, b)
    if len(x) < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties), with `pearson`'s NaN rules."""
    x, y = _paired(a, b)
    return pearson(sps.rankdata(x), sps.rankdata(y))


def depth_profile(per_layer: np.ndarray, points: int) -> np.ndarray:
    """A per-layer profile resampled to `points` evenly spaced relative depths on [0, 1] (linear interpolation)."""
    y = np.asarray(per_layer, dtype=np.float64)
    if len(y) == 1:
        return np.full(points, y[0])
    return np.interp(np.linspace(0.0, 1.0, points), np.linspace(0.0, 1.0, len(y)), y)


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"cannot correlate arrays of {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]
