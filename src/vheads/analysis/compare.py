"""Comparisons across runs: how alike their head maps are, how consistent one model is across datasets, and
whether accuracy follows the attention its top heads pay to the image.

Runs with the same layers x heads are compared head by head; runs of different sizes by their per-layer profiles
resampled to relative depth on [0, 1]. Results can be kept in the store's `comparisons` table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from vheads import metrics
from vheads.analysis.ranking import head_table
from vheads.analysis.stats import depth_profile, pearson, spearman
from vheads.heads import Head
from vheads.store import Store

FIGURES = ("mean_w", "score")
PAIR_COLUMNS = ["run_a", "run_b", "basis", "figure", "pearson", "spearman", "n"]
CONSISTENCY_COLUMNS = ["model", "runs", "datasets", "mean_w_pearson", "mean_w_spearman", "score_pearson",
                       "score_spearman", "top_k_overlap", "k"]
PER_RUN_COLUMNS = ["run", "model", "dataset", "accuracy", "k", "top_k_mean_w", "top_k_mean_c"]
ACCURACY_COLUMNS = ["figure", "spearman", "n"]
MIN_RUNS = 3
FEW_RUNS = 5


@dataclass
class HeadMaps:
    """A run's per-head maps ([layers, heads]) and ranking, the inputs every comparison needs."""

    name: str
    model: str
    dataset: str
    accuracy: float | None
    mean_w: np.ndarray
    mean_c: np.ndarray
    score: np.ndarray
    ranking: list[Head]

    @property
    def grid(self) -> tuple[int, int]:
        """(layers, heads)."""
        return self.mean_w.shape

    def top(self, k: int | None = None) -> list[Head]:
        """The first K heads of the ranking (default K of DESIGN.md for this grid)."""
        return self.ranking[:k or metrics.default_top_k(*self.grid)]


@dataclass
class Comparison:
    """Every table `vheads compare` prints, and the warnings to print with them."""

    runs: list[str]
    pairs: pd.DataFrame
    consistency: pd.DataFrame
    per_run: pd.DataFrame
    accuracy: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


def head_maps(store: Store, run: str | int) -> HeadMaps:
    """Read one run's maps from the store (through `head_table`, so the ranking is the one `vheads heads` shows)."""
    info = store.run(run)
    table = head_table(store, run)
    if table.attrs["samples"] == 0:
        raise ValueError(f"run {info['name']} has no samples to compare")
    shape = (table.attrs["layers"], table.attrs["heads"])
    maps = {}
    for column in ("mean_w", "mean_c", "score"):
        grid = np.full(shape, np.nan)
        grid[table["layer"].to_numpy(), table["head"].to_numpy()] = table[column].to_numpy(dtype=float)
        maps[column] = grid
    accuracy = info["accuracy"]
    return HeadMaps(name=info["name"], model=info["model"], dataset=info["dataset"],
                    accuracy=None if accuracy is None or pd.isna(accuracy) else float(accuracy),
                    ranking=[(int(r.layer), int(r.head)) for r in table.itertuples()], **maps)


def map_correlations(a: HeadMaps, b: HeadMaps) -> list[dict[str, Any]]:
    """Pearson and Spearman between two runs' mean-W maps and score maps (per-layer depth profiles across sizes)."""
    same = a.grid == b.grid
    rows = []
    for figure in FIGURES:
        x, y = getattr(a, figure), getattr(b, figure)
        if not same:
            points = max(a.grid[0], b.grid[0])
            x, y = depth_profile(metrics.nanmean(x, axis=1), points), depth_profile(metrics.nanmean(y, axis=1), points)
        rows.append({"run_a": a.name, "run_b": b.name, "basis": "heads" if same else "depth", "figure": figure,
                     "pearson": pearson(x, y), "spearman": spearman(x, y), "n": int(np.size(x))})
    return rows


def top_overlap(a: HeadMaps, b: HeadMaps, k: int | None = None) -> float:
    """Share of the top-K heads two same-sized runs have in common (NaN across sizes)."""
    if a.grid != b.grid:
        return float("nan")
    top_a, top_b = set(a.top(k)), set(b.top(k))
    return len(top_a & top_b) / max(len(top_a), 1)


def pairwise(maps: list[HeadMaps]) -> pd.DataFrame:
    """Map correlations between every pair of runs."""
    rows = [row for a, b in combinations(maps, 2) for row in map_correlations(a, b)]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def consistency(maps: list[HeadMaps], pairs: pd.DataFrame, k: int | None = None) -> pd.DataFrame:
    """Per model with two or more runs: mean pairwise map correlation and mean top-K overlap of its runs."""
    rows = []
    for model in dict.fromkeys(m.model for m in maps):
        group = [m for m in maps if m.model == model]
        if len(group) < 2:
            continue
        names = {m.name for m in group}
        inside = pairs[pairs["run_a"].isin(names) & pairs["run_b"].isin(names)]
        means = {f"{figure}_{method}": float(inside.loc[inside["figure"] == figure, method].mean())
                 for figure in FIGURES for method in ("pearson", "spearman")}
        overlap = [top_overlap(a, b, k) for a, b in combinations(group, 2)]
        rows.append({"model": model, "runs": len(group), "datasets": ", ".join(dict.fromkeys(m.dataset for m in group)),
                     **means, "top_k_overlap": float(np.mean(overlap)),
                     "k": k or metrics.default_top_k(*group[0].grid)})
    return pd.DataFrame(rows, columns=CONSISTENCY_COLUMNS)


def accuracy_attention(maps: list[HeadMaps], k: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Each run's accuracy beside the mean W and mean C of its top-K heads, and their Spearman correlation.

    The correlation needs at least 3 runs with an accuracy; under 5 it comes with a warning line.
    """
    per_run = pd.DataFrame([_attention_row(m, k) for m in maps], columns=PER_RUN_COLUMNS)
    scored = per_run[per_run["accuracy"].notna()]
    n = len(scored)
    if n < MIN_RUNS:
        note = f"accuracy against attention needs at least {MIN_RUNS} runs with an accuracy; got {n}"
        return per_run, pd.DataFrame(columns=ACCURACY_COLUMNS), [note]
    rows = [{"figure": figure, "spearman": spearman(scored["accuracy"], scored[figure]), "n": n}
            for figure in ("top_k_mean_w", "top_k_mean_c")]
    warnings = [f"n = {n}: too few runs for this correlation to mean much"] if n < FEW_RUNS else []
    return per_run, pd.DataFrame(rows, columns=ACCURACY_COLUMNS), warnings


def compare_runs(store: Store, runs: list[str | int], k: int | None = None) -> Comparison:
    """All comparisons of a set of runs (at least two)."""
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs")
    maps = [head_maps(store, run) for run in runs]
    names = [m.name for m in maps]
    if len(set(names)) < len(names):
        raise ValueError("a run is named twice")
    smallest = min(m.grid[0] * m.grid[1] for m in maps)
    if k is not None and not 1 <= k <= smallest:
        raise ValueError(f"--k {k}: must be between 1 and {smallest} (the heads of the smallest run)")
    pairs = pairwise(maps)
    per_run, accuracy, warnings = accuracy_attention(maps, k)
    warnings = [f"run {m.name}: head scores are undefined (no sample has the readout row); its score map is left "
                "out of the correlations" for m in maps if np.isnan(m.score).all()] + warnings
    return Comparison(runs=names, pairs=pairs, consistency=consistency(maps, pairs, k), per_run=per_run,
                      accuracy=accuracy, warnings=warnings)


def save_comparison(store: Store, comparison: Comparison) -> int:
    """Append a comparison's figures to the store's `comparisons` table; returns how many rows were written."""
    created = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = []
    for r in comparison.pairs.itertuples():
        rows += [(created, [r.run_a, r.run_b], "pair", r.basis, r.figure, method, getattr(r, method), r.n, None)
                 for method in ("pearson", "spearman")]
    runs_of = comparison.per_run.groupby("model")["run"].apply(list)
    for r in comparison.consistency.itertuples():
        runs, detail = runs_of[r.model], {"model": r.model, "k": int(r.k)}
        rows += [(created, runs, "consistency", "heads", figure, method, getattr(r, f"{figure}_{method}"), r.runs,
                  detail) for figure in FIGURES for method in ("pearson", "spearman")]
        rows.append((created, runs, "consistency", "heads", "top_k", "overlap", r.top_k_overlap, r.runs, detail))
    scored = list(comparison.per_run.loc[comparison.per_run["accuracy"].notna(), "run"])
    for r in comparison.accuracy.itertuples():
        rows.append((created, scored, "accuracy", "runs", r.figure, "spearman", r.spearman, r.n,
                     {"warnings": comparison.warnings}))
    with store.keep_open():  # one opening of the file for all the rows
        for row in rows:
            store.query("INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [row[0], json.dumps(row[1]), *row[2:6], _finite(row[6]), int(row[7]),
                         json.dumps(row[8]) if row[8] else None])
    return len(rows)


def _attention_row(maps: HeadMaps, k: int | None) -> dict[str, Any]:
    top = maps.top(k)
    layers, heads = [h[0] for h in top], [h[1] for h in top]
    return {"run": maps.name, "model": maps.model, "dataset": maps.dataset, "accuracy": maps.accuracy,
            "k": len(top), "top_k_mean_w": float(metrics.nanmean(maps.mean_w[layers, heads])),
            "top_k_mean_c": float(metrics.nanmean(maps.mean_c[layers, heads]))}


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None
