"""The prompt-style comparison (the paper's Fig. 3 analogue): the same questions with the box drawn (`visual`),
given as text coordinates (`plain`) and left out (`none`); per style the W and region-share maps, how they
correlate with the first style's, accuracy, and how much of their image attention the top visual heads put
on the asked-about region."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from vheads.analysis.ranking import head_table
from vheads.analysis.stats import pearson
from vheads.report import figures
from vheads.report import html as h
from vheads.store import Store

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

MIN_TOP = 4


@dataclass
class StyleView:
    """One style's run: its name, head table and per-question-type accuracy."""

    style: str
    run: str
    table: pd.DataFrame
    accuracy: dict[str, float]

    def grid(self, column: str) -> np.ndarray:
        """A head-table column as [layers, heads] (NaN where missing)."""
        out = np.full((self.table.attrs["layers"], self.table.attrs["heads"]), np.nan)
        out[self.table["layer"].to_numpy(), self.table["head"].to_numpy()] = self.table[column].to_numpy(dtype=float)
        return out

    def top(self) -> list[tuple[int, int]]:
        """Its visual heads (score >= 0.5), at least the first MIN_TOP of the ranking."""
        n = max(int(self.table["visual"].sum()), MIN_TOP)
        return [(int(r.layer), int(r.head)) for r in self.table.head(n).itertuples()]


def style_view(store: Store, style: str, run: str) -> StyleView:
    """Read one style's run from the store."""
    samples = store.samples(run)
    accuracy = {"all": float(samples["correct"].mean())} if len(samples) else {}
    for qtype, group in samples.groupby("question_type", sort=True):
        accuracy[str(qtype)] = float(group["correct"].mean())
    return StyleView(style, run, head_table(store, run), accuracy)


def region_of(view: StyleView, heads: Sequence[tuple[int, int]]) -> float:
    """Mean region share (region weight / W) over `heads` in this style's run (NaN when undefined)."""
    grid = view.grid("mean_region_share")
    values = np.array([grid[layer, head] for layer, head in heads], dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def summary_table(views: Sequence[StyleView]) -> pd.DataFrame:
    """One row per style: accuracy overall and per type, visual heads, correlations with the first style's maps,
    and the region share of its own top visual heads and of the first style's."""
    base = views[0]
    types = sorted({k for v in views for k in v.accuracy if k != "all"})
    rows = []
    for view in views:
        row: dict[str, object] = {"style": view.style, "run": view.run, "accuracy": view.accuracy.get("all")}
        row.update({f"acc {t}": view.accuracy.get(t) for t in types})
        row["visual heads"] = int(view.table["visual"].sum())
        row[f"r(W, {base.style})"] = pearson(view.grid("mean_w"), base.grid("mean_w"))
        row[f"r(region, {base.style})"] = pearson(view.grid("mean_region_share"), base.grid("mean_region_share"))
        row["region share, own top heads"] = region_of(view, view.top())
        row[f"region share, {base.style} top heads"] = region_of(view, base.top())
        rows.append(row)
    return pd.DataFrame(rows)


def style_heatmaps(views: Sequence[StyleView], title: str) -> Figure:
    """Mean W (top row) and mean region share (bottom row) per style, side by side on shared colour scales."""
    layers, heads = views[0].table.attrs["layers"], views[0].table.attrs["heads"]
    side = min(4.6, max(3.0, 0.12 * max(layers, heads) + 1.8))
    fig, axes = plt.subplots(2, len(views), figsize=(side * len(views) + 1.0, 2 * side * layers / heads + 1.2),
                             layout="constrained", squeeze=False)
    fig.suptitle(textwrap.fill(title, 110, max_lines=2, placeholder="…"), parse_math=False, fontsize=12)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    for row, (column, label) in enumerate((("mean_w", "mean W"), ("mean_region_share", "region share"))):
        grids = [v.grid(column) for v in views]
        finite = np.concatenate([g[np.isfinite(g)] for g in grids])
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        for ax, view, grid in zip(axes[row], views, grids, strict=True):
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=vmax, aspect="equal",
                              interpolation="nearest")
            rows, cols = np.nonzero(view.grid("visual") > 0)
            ax.scatter(cols, rows, s=16, facecolor="white", edgecolor=figures.VISUAL_EDGE, linewidth=0.6, zorder=3)
            figures.grid_axis(ax, layers, heads)
            ax.set_title(f"{view.style}: {label}", parse_math=False, fontsize=11)
        fig.colorbar(image, ax=list(axes[row]), shrink=0.85, label=label)
    return fig


def style_section(store: Store, runs: Mapping[str, str], out: Path, stem: str = "styles") -> h.Section:
    """The report section comparing prompt styles; `runs` maps style to run name, the reference style first."""
    views = [style_view(store, style, run) for style, run in runs.items()]
    base = views[0]
    path = figures.save(style_heatmaps(views, "the same questions in each prompt style"), out / f"heatmap-{stem}.png")
    section = h.Section("styles", "Prompt styles")
    section.body.append(h.paragraph(
        f"The same {int(base.table.attrs['samples'])} held-out questions with the box drawn on the image (visual), "
        "given as text coordinates (plain) and left out (none); region share is measured on the asked-about box "
        "in every style, drawn or not."))
    section.body.append(h.figure(path, "W and region-share maps per prompt style",
                                 "Top: mean W of every (layer, head); bottom: mean share of the head's image "
                                 "attention that lands on the box's tokens; white dots: visual heads of that "
                                 "style. Colour scales are shared along each row."))
    table = summary_table(views)
    shares = [c for c in table.columns if c.startswith(("acc", "region share"))]
    ratios = {c: (lambda v: "n/a" if v is None or not np.isfinite(v) else f"{v:.2f}")
              for c in table.columns if c.startswith("r(")}
    section.body.append(h.table(table, {c: _pct for c in shares} | ratios))
    section.body.append(h.paragraph(
        f"r: Pearson correlation with the {base.style} run's map, head by head. Top heads: the style's visual "
        f"heads (score >= 0.5), at least its first {MIN_TOP}."))
    return section


def _pct(value: object) -> str:
    return "n/a" if value is None or not np.isfinite(float(value)) else f"{float(value):.1%}"
