"""`build_report`: read runs from the store, draw every figure as PNG, and assemble `index.html` beside them."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vheads.analysis.ranking import head_table
from vheads.figures import legend, listed
from vheads.report import figures
from vheads.report import html as h
from vheads.store import Store

log = logging.getLogger("vheads.report")

OWN_PNGS = ("heatmap-", "overlay-", "pruning-", "wc-scatter", "correlation", "prediction-")
DEFINITIONS = (
    "W: share of the readout row's attention on image tokens. C = 1 - H / log N: how concentrated the image "
    "attention is (1 = one token, 0 = spread evenly). Head score: share of the samples with the readout row in "
    "which the head is among the top K heads by W (undefined when none has the row). Visual heads: score >= 0.5. "
    "Pointing: share of the samples with a target box whose most-attended image token lies on a target. "
    "Stages: early, mid, late at the run's --stages boundaries, else layers in thirds."
)


@dataclass
class RunView:
    """One reported run: its store row, head ranking and the file-name stem of its figures."""

    info: dict[str, Any]
    table: pd.DataFrame
    stem: str
    sections: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The run's name."""
        return str(self.info["name"])

    @property
    def accuracy(self) -> float | None:
        """The run's accuracy (None when unscored)."""
        value = self.info.get("accuracy")
        return None if value is None or pd.isna(value) else float(value)

    def grid(self, column: str) -> np.ndarray:
        """A head_table column as a [layers, heads] array (NaN where missing)."""
        out = np.full((self.table.attrs["layers"], self.table.attrs["heads"]), np.nan)
        out[self.table["layer"].to_numpy(), self.table["head"].to_numpy()] = self.table[column].to_numpy(dtype=float)
        return out


def report_runs(store: Store, names: Sequence[str] | None = None) -> list[str]:
    """The runs a report covers: those named, else every finished run that is not a curve point."""
    if names:
        return [str(store.run(name)["name"]) for name in names]
    runs = store.runs()
    if runs.empty:
        return []
    keep = (runs["status"] == "done") & runs["curve"].isna() & (runs["n_samples"] > 0)
    return [str(n) for n in runs.loc[keep, "name"]]


def build_report(store_path: str | Path, out_dir: str | Path = "vheads-report", runs: Sequence[str] | None = None,
                 overlays: int = 3, device: str = "auto", stages: tuple[int, int] | None = None,
                 progress: Callable[[int, int, str], None] | None = None,
                 styles: Mapping[str, str] | None = None) -> Path:
    """Write `out_dir/index.html` and a PNG per figure for the chosen runs; returns the page's path.

    Stages: `stages` for every run, else each run's stored `--stages`, else thirds.
    `progress(done, total, what)` is called as each run's section is written, and once for the shared figures.
    `overlays` is how many correct and how many wrong samples to draw per run (0: none); drawing them loads
    the run's model and data again, and a run whose model or data cannot be loaded just gets a note.
    `styles` (prompt style -> run name, reference first) adds the prompt-style comparison after the overview.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        if old.name.startswith(OWN_PNGS):
            old.unlink()
    with Store(store_path, read_only=True) as store:
        names = report_runs(store, runs)
        if not names:
            raise ValueError(f"{store_path} has no finished run to report; run `vheads run` first")
        views = [_view(store, name, i, stages) for i, name in enumerate(names)]
        sections = [_overview(views)]
        if styles:
            from vheads.report.styles import style_section

            sections.append(style_section(store, styles, out))
        models: dict[tuple[str, str], Any] = {}
        steps = len(views) + 1
        for i, view in enumerate(views):
            if progress:
                progress(i, steps, f"run {view.name}")
            sections.append(_run_section(store, view, out, overlays, device, models))
        models.clear()
        if progress:
            progress(len(views), steps, "scatter, correlations and pruning curves")
        sections.append(_scatter_section(views, out))
        if len(views) > 1:
            sections.append(_correlation_section(store, views, out))
        from vheads.report.pruning import pruning_section

        for extra in (_ablation_section(store, views, out), pruning_section(store, views, out)):
            if extra is not None:
                sections.append(extra)
        from vheads.report.prediction import prediction_section

        prediction = prediction_section(store, out)
        if prediction is not None:
            sections.append(prediction)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = h.page("vheads report", f"{len(views)} run(s) from {Path(store_path).name}, written {stamp}", sections)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    if progress:
        progress(steps, steps, "done")
    return index


def _view(store: Store, name: str, index: int, stages: tuple[int, int] | None = None) -> RunView:
    info = store.run(name)
    table = head_table(store, name, stages=stages)
    stem = f"{index:02d}-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "run")
    return RunView(info=info, table=table, stem=stem)


def _overview(views: Sequence[RunView]) -> h.Section:
    rows = []
    for view in views:
        info, table = view.info, view.table
        rows.append({"run": view.name, "model": Path(str(info["model"])).name, "dataset": info["dataset"],
                     "split": info["split"] or "", "readout": info["readout"], "ablation": info["ablation"],
                     "samples": int(table.attrs["samples"]), "accuracy": view.accuracy,
                     "layers x heads": f"{table.attrs['layers']} x {table.attrs['heads']}",
                     "K": int(table.attrs["k"]), "scored samples": int(table.attrs["scored"]),
                     "stages": "mid from {}, late from {}".format(*table.attrs["stages"]),
                     "visual heads": int(table["visual"].sum())})
    frame = pd.DataFrame(rows)
    section = h.Section("runs", "Runs")
    section.body.append(h.table(frame, {"accuracy": _pct}))
    section.body.append(h.paragraph(DEFINITIONS))
    return section


def _pct(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def _num(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)


def _heatmap(view: RunView, out: Path) -> str:
    layers, heads = view.table.attrs["layers"], view.table.attrs["heads"]
    w, c, score, pointing = view.grid("mean_w"), view.grid("mean_c"), view.grid("score"), view.grid("pointing")
    visual = view.grid("visual") > 0
    panels = [("mean visual weight W", w, "mean W", None), ("head score", score, "score", (0.0, 1.0))]
    if np.isfinite(pointing).any():
        panels.append(("pointing", pointing, "pointing", (0.0, 1.0)))
    fig, drawn = figures.head_heatmaps(layers, heads, panels, visual,
                                       f"{view.name}: {layers} layers x {heads} heads, K = {view.table.attrs['k']}")
    path = figures.save(fig, out / f"heatmap-{view.stem}.png")
    data = {"layers": layers, "heads": heads,
            "panels": [{"label": p.label, "extent": list(p.extent)} for p in drawn],
            "w": [_num(v) for v in w.ravel()], "c": [_num(v) for v in c.ravel()],
            "score": [_num(v) for v in score.ravel()], "pointing": [_num(v) for v in pointing.ravel()],
            "rank": _ranks(view, layers, heads), "visual": [int(v) for v in visual.ravel()]}
    shown = "Mean W, head score and pointing" if len(panels) == 3 else "Mean W and head score"
    caption = (f"{shown} of every (layer, head); white dots mark visual heads. Hover a cell for its "
               "figures; click it (or a row of the table below) to mark that head in every heatmap.")
    return h.heatmap_figure(path, f"heatmaps of {view.name}", f"hm-{view.stem}", data, caption)


def _ranks(view: RunView, layers: int, heads: int) -> list[int]:
    ranks = np.zeros((layers, heads), dtype=int)
    ranks[view.table["layer"].to_numpy(), view.table["head"].to_numpy()] = view.table["rank"].to_numpy()
    return [int(r) for r in ranks.ravel()]


def _heads_table(view: RunView) -> list[str]:
    table = view.table
    shown = table[table["visual"]]
    note = f"{len(shown)} visual head(s) (score >= 0.5) of {len(table)}."
    if shown.empty:
        shown = table.head(10)
        note = "No head reaches score 0.5; the 10 best-ranked heads are shown."
    headers = _head_headers()
    frame = shown[list(headers)].rename(columns=headers)
    rows = h.table(frame, row_attrs=lambda r: {"class": "head-row", "data-head": f"{r.layer}.{r.head}"})
    return [h.paragraph(f"{note} {legend()}."), rows]


def _head_headers() -> dict[str, str]:
    """The columns of the report's head table and their headers: each listed figure (`vheads.figures`) under its
    label."""
    return {"rank": "rank", "layer": "layer", "head": "head", "score": "score",
            **{f.listed: f.label for f in listed()}, "stage": "stage"}


def _run_section(store: Store, view: RunView, out: Path, overlays: int, device: str,
                 models: dict[tuple[str, str], Any]) -> h.Section:
    section = h.Section(f"run-{view.stem}", f"Run {view.name}")
    section.body.append(_heatmap(view, out))
    section.body.append("<h3>Visual heads</h3>")
    section.body.extend(_heads_table(view))
    grounding = _grounding_table(store, view)
    if grounding is not None:
        section.body.append("<h3>Grounding</h3>")
        section.body.extend(grounding)
    if overlays > 0 and view.table.attrs["samples"] > 0:
        from vheads.report.gallery import overlay_block

        section.body.append("<h3>Where the top heads look</h3>")
        section.body.extend(overlay_block(store, view, out, overlays, device, models))
    return section


def _grounding_table(store: Store, view: RunView) -> list[str] | None:
    """The head sets `vheads ground` scored on this run: n, pointing, IoU and acc50 of each (None if never grounded)."""
    kept = store.groundings(view.name)
    if kept.empty:
        return None
    from vheads.analysis.grounding import head_set_label

    kept["hit"] = kept["pointing"].astype(float)
    kept["iou"] = kept["iou"].astype(float)
    kept["acc50"] = (kept["iou"] >= 0.5).astype(float).where(kept["iou"].notna())
    frame = kept.groupby(["source", "selector"], sort=False).agg(
        heads=("heads", "first"), n=("iou", "count"), unseen=("iou", lambda v: int(v.isna().sum())),
        pointing=("hit", "mean"), iou=("iou", "mean"), acc50=("acc50", "mean")).reset_index()
    frame["selector"] = [head_set_label(str(r.selector), str(r.source), view.name) for r in frame.itertuples()]
    frame = frame.drop(columns="source")
    frame["heads"] = frame["heads"].map(lambda v: " ".join(v) if isinstance(v, list) else "")
    note = ("Boxes drawn from the combined attention of each head set (vheads ground; \"of run R\": heads chosen "
            "on run R): n counts the samples scored, unseen those whose target boxes lie outside what the model "
            "saw (cut by a centre crop; left out); pointing is the share of samples whose combined map peaks on a "
            "target, IoU the mean overlap of the box with the best-matching target, acc50 the share with IoU >= "
            "0.5.")
    return [h.paragraph(note), h.table(frame)]


def _scatter_section(views: Sequence[RunView], out: Path) -> h.Section:
    fig = figures.wc_scatter([(v.name, v.accuracy, v.table) for v in views])
    path = figures.save(fig, out / "wc-scatter.png")
    section = h.Section("scatter", "W against C")
    section.body.append(h.figure(path, "mean W against mean C of every head",
                                 "Each dot is a head: mean share of attention on the image (W) against how "
                                 "concentrated that attention is (C), coloured by stage; visual heads outlined."))
    return section


def _correlation_section(store: Store, views: Sequence[RunView], out: Path) -> h.Section:
    from vheads.analysis.compare import head_maps, pairwise

    maps = [head_maps(store, v.name) for v in views]
    pairs = pairwise(maps)
    names = [m.name for m in maps]
    matrices = []
    for figure, title in (("mean_w", "mean W maps"), ("score", "head score maps")):
        matrix = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
        for row in pairs[pairs["figure"] == figure].itertuples():
            matrix.loc[row.run_a, row.run_b] = matrix.loc[row.run_b, row.run_a] = row.pearson
        matrices.append((title, matrix))
    path = figures.save(figures.correlation_matrices(matrices), out / "correlation.png")
    section = h.Section("correlation", "Across runs")
    caption = ("Pearson correlation between runs of their per-head maps (runs of one size head by head, runs of "
               "different sizes by their per-layer profiles over relative depth); grey: undefined.")
    section.body.append(h.figure(path, "correlation between runs", caption))
    depth = pairs[pairs["basis"] == "depth"]
    if len(depth):
        section.body.append(h.paragraph(f"{len(depth) // 2} pair(s) compared by depth profile (different sizes)."))
    return section


def _seed_label(seed: Any, seeds: Any) -> str:
    if seed is not None and not pd.isna(seed):
        return str(int(seed))
    return f"mean of {int(seeds)}" if int(seeds) > 1 else "-"


def _ablation_section(store: Store, views: Sequence[RunView], out: Path) -> h.Section | None:
    from vheads.analysis.ablation import curve_points
    from vheads.report.pruning import is_pruning

    runs = store.runs()
    if runs.empty or not runs["curve"].notna().any():
        return None
    section = h.Section("ablation", "Ablation")
    for view in views:
        points = curve_points(store, from_run=view.name)
        points = points[~is_pruning(points)] if len(points) else points
        if points.empty:
            continue
        for tag, group in points.groupby("curve", sort=True):
            stem = f"{view.stem}-{len(section.body):02d}"
            fig = figures.pruning_curves(group, f"pruning curve of {view.name}")
            path = figures.save(fig, out / f"pruning-{stem}.png")
            section.body.append(f"<h3>{h.esc(view.name)}: curve {h.esc(tag)}</h3>")
            section.body.append(h.figure(path, f"pruning curves of {view.name}",
                                         "Accuracy as K heads are ablated: the top visual heads, random heads "
                                         "(mean over seeds, dots: single seeds) and the weakest late heads; "
                                         "bands: 95% intervals."))
            shown = group[["selector", "k", "seed", "accuracy", "low", "high", "n", "heads"]].copy()
            shown["seed"] = [_seed_label(s, n) for s, n in zip(group["seed"], group["seeds"], strict=True)]
            shown["heads"] = shown["heads"].map(lambda v: " ".join(v) if isinstance(v, list) else "")
            section.body.append(h.table(shown, {"accuracy": _pct, "low": _pct, "high": _pct}))
    return section if section.body else None
