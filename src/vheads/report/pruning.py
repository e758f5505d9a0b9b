"""The report's "Pruning" section: the efficiency frontier, accuracy against the share of the image's keys and
values kept, one line per selector of the keep-only curves (image-blind solid, flow-blind dashed) and one for
FastV, with 95% interval bands; and the heads costliest to lose, from each-head curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vheads.analysis.pruning import FASTV, keep_summary
from vheads.heads import parse_heads
from vheads.pipeline.pruning import PRUNING_MODES
from vheads.report import figures
from vheads.report import html as h
from vheads.store import Store

FRONTIER_MODES = (*PRUNING_MODES, FASTV)
LINE_STYLES = {"image-blind": "-", "flow-blind": "--", FASTV: ":"}
FASTV_COLOR = "#333333"


def is_pruning(points: pd.DataFrame) -> pd.Series:
    """Which `curve_points` rows belong to the frontier: keep-only and FastV points (the ablation curves' others)."""
    return points["mode"].isin(FRONTIER_MODES) & points["image_kv_share"].notna()


def is_fixed_set(selector: str) -> bool:
    """Whether a keep-only selector is a fixed head set (`stage:late`, `3.13,2.14`) rather than a ranking."""
    if selector.startswith("stage:"):
        return True
    try:
        parse_heads(selector)
    except ValueError:
        return False
    return True


def frontier_figure(points: pd.DataFrame, title: str) -> figures.Figure:
    """Accuracy against the image KV kept: a line per (mode, selector) through its points (random: the mean over
    seeds, single seeds as dots), FastV as a dotted line per layer K through its shares R, each with its 95%
    interval band; a fixed head set as one diamond with its interval."""
    fig, ax = figures.plt.subplots(figsize=(8.6, 4.6), layout="constrained")
    seeded = points["seed"].map(lambda s: s is not None and not pd.isna(s))
    lines = points.assign(line=[f"FastV K={int(r.fastv_layer)}" if r.mode == FASTV else f"{r.selector} ({r.mode})"
                                for r in points.itertuples()])
    fastv_shades = dict(zip(sorted(points.loc[points["mode"] == FASTV, "fastv_layer"].dropna().unique()),
                            ("#333333", "#777777", "#aaaaaa", "#555555", "#999999"), strict=False))
    for (mode, selector, label), rows in lines[~seeded].groupby(["mode", "selector", "line"], sort=False):
        rows = rows.sort_values("image_kv_share")
        color = fastv_shades.get(rows["fastv_layer"].iloc[0], FASTV_COLOR) if mode == FASTV else \
            figures.selector_color(selector)
        if mode != FASTV and is_fixed_set(str(selector)):  # one point, not a line through the shared ends
            inner = rows[(rows["image_kv_share"] > 0) & (rows["image_kv_share"] < 1)]
            inner = inner if len(inner) else rows
            accuracy = inner["accuracy"].to_numpy(dtype=float)
            spread = [accuracy - inner["low"].to_numpy(dtype=float), inner["high"].to_numpy(dtype=float) - accuracy]
            ax.errorbar(inner["image_kv_share"], accuracy, yerr=spread, fmt="D", markersize=5, capsize=3,
                        label=label, color=color, zorder=4)
            continue
        line = ax.plot(rows["image_kv_share"], rows["accuracy"], marker="o", markersize=4, label=label, color=color,
                       linestyle=LINE_STYLES.get(str(mode), "-"))[0]
        ax.fill_between(rows["image_kv_share"].to_numpy(dtype=float), rows["low"].to_numpy(dtype=float),
                        rows["high"].to_numpy(dtype=float), color=line.get_color(), alpha=0.12, linewidth=0)
        dots = points[seeded & (points["selector"] == selector) & (points["mode"] == mode)]
        if len(dots):
            ax.scatter(dots["image_kv_share"], dots["accuracy"], s=10, color=line.get_color(), alpha=0.5, zorder=3)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    figures._text(ax, title, "share of the image's keys and values kept", "accuracy")
    legend = ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for text in legend.get_texts():
        text.set_parse_math(False)
    return fig


def pruning_section(store: Store, views: Sequence[Any], out: Path) -> h.Section | None:
    """The section, or None when no reported run has keep-only, FastV or each-head points."""
    from vheads.analysis.ablation import curve_points

    section = h.Section("pruning", "Pruning")
    for view in views:
        points = curve_points(store, from_run=view.name)
        points = points[is_pruning(points)] if len(points) else points
        costs = cost_sections(store, view.name)
        if points.empty:
            section.body += costs
            continue
        path = figures.save(frontier_figure(points, f"efficiency frontier of {view.name}"),
                            out / f"pruning-frontier-{view.stem}.png")
        section.body.append(f"<h3>{h.esc(view.name)}: the efficiency frontier</h3>")
        section.body.append(h.figure(path, f"efficiency frontier of {view.name}", (
            "Accuracy against the share of the image's keys and values the cache keeps. Keep-only: only K heads "
            "(chosen by each selector) see the image, every other head is image-blind (solid) or flow-blind "
            "(dashed: only text rows lose the image), and a key/value head drops the image when all its query "
            "heads are blind; the ends are every head blind (0) and the plain run (1). FastV (dotted): after layer "
            "K only the R share of image tokens stays, (K + (L - K) R) / L. Bands: 95% intervals; dots: single "
            "random seeds.")))
        summary = keep_summary(points)
        if len(summary):
            section.body.append(h.paragraph(
                "How few heads need the image: full is the plain run's accuracy; k_90 the least K whose accuracy "
                "reaches 90% of it, k_full the least K whose 95% interval reaches it (with their image KV "
                "shares); gap_random the mean (and largest) accuracy lead over random heads at the same K."))
            section.body.append(h.table(summary.drop(columns="curve"), {
                "full": _pct, "share_90": _share, "share_full": _share, "gap_random": _signed,
                "max_gap_random": _signed, "k_90": _int, "k_full": _int}))
        section.body.append(h.table(frontier_table(points), {"accuracy": _pct, "low": _pct, "high": _pct,
                                                            "image KV": _share}))
        section.body += costs
    return section if section.body else None


def cost_sections(store: Store, run: str, shown: int = 12) -> list[str]:
    """Per mode with an each-head curve of `run`: the heads costliest to lose, beside their rank by the paper's
    score and by pointing (what the `cost` selector keeps)."""
    from vheads.analysis.costs import cost_modes, cost_table, head_costs
    from vheads.analysis.ranking import head_table

    body = []
    modes = cost_modes(store, run)
    ranking = head_table(store, run) if modes else None
    for mode in modes:
        try:
            costs = head_costs(store, run, mode)
        except ValueError:  # an unfinished each-head curve: nothing to show yet
            continue
        table = cost_table(costs, ranking)
        free = int((costs["cost"].abs() < 1e-12).sum())
        body.append(f"<h3>{h.esc(run)}: heads costliest to lose ({h.esc(mode)})</h3>")
        body.append(h.paragraph(
            f"Each head {mode} alone, on {costs.attrs['n']} questions of {costs.attrs['data']} (accuracy "
            f"{_pct(costs.attrs['accuracy'])} "
            f"with none): the accuracy lost (cost) and the mean probability of the right first answer lost "
            f"(confidence cost), beside the head's rank by the paper's score and by pointing. {free} of {len(costs)} "
            "heads cost no answer on their own. The cost selector keeps or ablates the heads in this order."))
        body.append(h.table(table.head(shown), {"accuracy": _pct, "cost": _signed, "confidence cost": _signed}))
    return body


def frontier_table(points: pd.DataFrame) -> pd.DataFrame:
    """The frontier's points as a table: the mean rows (random: over seeds), the kept heads abbreviated."""
    rows = points[points["seed"].map(lambda s: s is None or pd.isna(s))]
    rows = rows.drop_duplicates(subset=["mode", "selector", "k", "fastv_keep", "run"])
    frame = pd.DataFrame({
        "mode": rows["mode"], "selector": [_selector(r) for r in rows.itertuples()], "k": rows["k"],
        "image KV": rows["image_kv_share"], "accuracy": rows["accuracy"], "low": rows["low"], "high": rows["high"],
        "n": rows["n"], "seeds": rows["seeds"], "kept": rows["kept"].map(_heads)})
    return frame.sort_values(["mode", "selector", "image KV"]).reset_index(drop=True)


def _selector(row: Any) -> str:
    if row.mode == FASTV:
        return f"FastV K={int(row.fastv_layer)} R={float(row.fastv_keep):g}"
    return str(row.selector)


def _heads(heads: Any) -> str:
    if not isinstance(heads, list):
        return ""
    return " ".join(heads[:12]) + (f" (+{len(heads) - 12})" if len(heads) > 12 else "")


def _pct(value: Any) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):.1%}"


def _share(value: Any) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):.2f}"


def _signed(value: Any) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):+.3f}"


def _int(value: Any) -> str:
    return "not reached" if value is None or pd.isna(value) else str(int(value))
