"""The report's figures, drawn with matplotlib (Agg) and saved as PNG: heatmaps, scatter, correlations, pruning curves.

Every function returns a `Figure`; `save` writes it. Text that comes from the data (run names, selectors) is
drawn with math parsing off, so a `$` in a name is printed as is. Heatmaps also return where each panel's
cells lie in the saved image (fractions of its width and height from the top left), so the page can map
the mouse to a (layer, head) cell.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 110
STAGE_COLORS = {"early": "#4C72B0", "mid": "#55A868", "late": "#C44E52"}
SELECTOR_COLORS = {"top": "#C44E52", "random": "#4C72B0", "late": "#8172B2", "stage": "#937860", "pointing": "#55A868",
                   "region": "#DD8452", "cost": "#DA8BC3"}
VISUAL_EDGE = "black"


def selector_color(selector: object) -> str | None:
    """The colour of a selector's line: `stage:late` as stage, `cost (shapes train, ...)` as cost; None for the
    rest (matplotlib's cycle)."""
    return SELECTOR_COLORS.get(str(selector).split(":")[0].split(" (")[0])


@dataclass
class Panel:
    """One heatmap panel of a saved figure: its label and its cells' extent as image fractions (x0, y0, x1, y1)."""

    label: str
    extent: tuple[float, float, float, float]


def save(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG at the report's resolution and free it."""
    path = Path(path)
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return path


def _text(ax: Axes, title: str, xlabel: str | None = None, ylabel: str | None = None, width: int = 56) -> None:
    """Title (long names wrapped, at most three lines each) and axis labels."""
    wrapped = "\n".join(textwrap.fill(line, width, max_lines=3, placeholder="…") for line in title.splitlines())
    ax.set_title(wrapped, parse_math=False, fontsize=11)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)


def grid_axis(ax: Axes, layers: int, heads: int) -> None:
    """Integer ticks (at most about ten per axis) and labels for a layer x head grid, layer 0 on top."""
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=10, integer=True, steps=[1, 2, 4, 5, 10]))
    ax.set_xlim(-0.5, heads - 0.5)
    ax.set_ylim(layers - 0.5, -0.5)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")


def _extent(fig: Figure, ax: Axes) -> tuple[float, float, float, float]:
    """Where an axes' data area lies in the saved image, as fractions from the top left."""
    box = ax.get_position()
    return (round(box.x0, 5), round(1 - box.y1, 5), round(box.x1, 5), round(1 - box.y0, 5))


def head_heatmaps(layers: int, heads: int, panels: Sequence[tuple[str, np.ndarray, str, tuple[float, float] | None]],
                  visual: np.ndarray, title: str) -> tuple[Figure, list[Panel]]:
    """Layer x head heatmaps side by side, visual heads marked with a dot; returns the figure and its panels.

    Each panel is (title, values [layers, heads], colour-bar label, (vmin, vmax) or None for 0..max).
    """
    side = min(6.2, max(3.6, 0.15 * max(layers, heads) + 2.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels) + 1.2, side * layers / heads + 0.9),
                             layout="constrained", squeeze=False)
    fig.suptitle(textwrap.fill(title, 110, max_lines=2, placeholder="…"), parse_math=False, fontsize=12)
    cell_pt = side * 72 / max(layers, heads) * 0.7
    rows, cols = np.nonzero(visual)
    for ax, (label, values, bar_label, limits) in zip(axes[0], panels, strict=True):
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
        finite = values[np.isfinite(values)]
        vmin, vmax = limits if limits else (0.0, float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal",
                          interpolation="nearest")
        ax.scatter(cols, rows, s=min(8.0, max(2.0, 0.45 * cell_pt)) ** 2, facecolor="white", edgecolor=VISUAL_EDGE,
                   linewidth=max(0.4, min(1.0, cell_pt / 12)), zorder=3)
        grid_axis(ax, layers, heads)
        _text(ax, label)
        fig.colorbar(image, ax=ax, shrink=0.85, label=bar_label)
    if len(rows):
        fig.legend(handles=[Line2D([], [], marker="o", linestyle="", markerfacecolor="white",
                                   markeredgecolor=VISUAL_EDGE, label="visual head (score ≥ 0.5)")],
                   loc="outside lower center", frameon=False, fontsize=9)
    fig.canvas.draw()
    return fig, [Panel(p[0], _extent(fig, ax)) for ax, p in zip(axes[0], panels, strict=True)]


def wc_scatter(runs: Sequence[tuple[str, float | None, pd.DataFrame]]) -> Figure:
    """Mean W against mean C of every head, one panel per run, coloured by stage, visual heads outlined."""
    n = len(runs)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.0 * rows + 0.4), layout="constrained",
                             squeeze=False)
    for ax, (name, accuracy, table) in zip(axes.flat, runs, strict=False):
        for stage, color in STAGE_COLORS.items():
            part = table[(table["stage"] == stage) & ~table["visual"]]
            ax.scatter(part["mean_w"], part["mean_c"], s=14, color=to_rgba(color, 0.55), linewidth=0)
        vis = table[table["visual"]]
        ax.scatter(vis["mean_w"], vis["mean_c"], s=34, c=[STAGE_COLORS[s] for s in vis["stage"]],
                   edgecolor=VISUAL_EDGE, linewidth=0.9, zorder=3)
        acc = "n/a" if accuracy is None or pd.isna(accuracy) else f"{accuracy:.1%}"
        _text(ax, f"{name}\naccuracy {acc}", "mean visual weight W", "mean concentration C", width=44)
        ax.set_xlim(0, _upper(table["mean_w"]))
        ax.set_ylim(0, _upper(table["mean_c"]))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=f"{s} layers") for s, c in
               STAGE_COLORS.items()]
    handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor=VISUAL_EDGE,
                          label="visual head"))
    fig.legend(handles=handles, loc="outside lower center", ncol=4 if cols > 1 else 2, frameon=False, fontsize=9)
    return fig


def _upper(values: pd.Series) -> float:
    """An axis end a little above the largest finite value (1 when there is none)."""
    finite = values[np.isfinite(values.to_numpy(dtype=float))]
    top = float(finite.max()) if len(finite) else 0.0
    return top * 1.06 if top > 0 else 1.0


def correlation_matrices(matrices: Sequence[tuple[str, pd.DataFrame]], label: str = "Pearson r") -> Figure:
    """Run x run correlation matrices side by side, values written in the cells (grey where undefined)."""
    n = len(matrices[0][1])
    side = min(9.0, 2.6 + 0.55 * n)
    fig, axes = plt.subplots(1, len(matrices), figsize=((side + 1.4) * len(matrices), side),
                             layout="constrained", squeeze=False)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    for ax, (title, matrix) in zip(axes[0], matrices, strict=True):
        values = matrix.to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-1, vmax=1)
        names = [_short(str(c)) for c in matrix.columns]
        ax.set_xticks(range(n), names, rotation=35, ha="right")
        ax.set_yticks(range(n), names)
        for tick in ax.get_xticklabels() + ax.get_yticklabels():
            tick.set_parse_math(False)
        if n <= 14:
            for i in range(n):
                for j in range(n):
                    if np.isfinite(values[i, j]):
                        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=9,
                                color="white" if abs(values[i, j]) > 0.6 else "black")
        _text(ax, title)
        fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    return fig


def pruning_curves(points: pd.DataFrame, title: str) -> Figure:
    """Accuracy against the number of ablated heads, one line per selector with its 95% interval band.

    `points` are `curve_points` rows: a row with seed None is a selector's value at K (for random sets, the
    mean over seeds with its t interval); rows with a seed are single random sets, drawn as dots.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    seeds = points["seed"].map(lambda s: s is not None and not pd.isna(s))
    for selector, line_rows in points[~seeds].groupby("selector", sort=False):
        line_rows = line_rows.sort_values("k")
        line = ax.plot(line_rows["k"], line_rows["accuracy"], marker="o", label=str(selector),
                       color=selector_color(selector))[0]
        ax.fill_between(line_rows["k"].to_numpy(dtype=float), line_rows["low"].to_numpy(dtype=float),
                        line_rows["high"].to_numpy(dtype=float), color=line.get_color(), alpha=0.15, linewidth=0)
        dots = points[seeds & (points["selector"] == selector)]
        if len(dots):
            ax.scatter(dots["k"], dots["accuracy"], s=12, color=line.get_color(), alpha=0.6, zorder=3)
    ks = sorted(points["k"].unique())
    if len(ks) <= 12:
        ax.set_xticks(ks)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    _text(ax, title, "heads ablated (K)", "accuracy")
    legend = ax.legend(title="selector", fontsize=9)
    for text in legend.get_texts():
        text.set_parse_math(False)
    return fig


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"
