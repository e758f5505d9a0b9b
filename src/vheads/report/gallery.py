"""A run's overlay gallery: a few correct and wrong samples, re-run through the model, with the top heads' attention
drawn on each image, as PNGs and the HTML that shows them beside the question, answer and prediction."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pandas as pd

from vheads.analysis.grounding import head_set_label
from vheads.capture import CaptureError
from vheads.data import DataError
from vheads.heads import Head, format_heads
from vheads.models import GeometryError, Loaded, ModelError
from vheads.pipeline.replay import attention_maps, reload_samples, run_ablation, run_model
from vheads.report import figures
from vheads.report import html as h
from vheads.report.overlays import MAX_HEAD_PANELS, DrawnBoxes, overlay_figure
from vheads.report.samples import pick_samples

log = logging.getLogger("vheads.report")

READOUT_ROWS = {"prompt": "the last prompt position", "first-generated": "the first generated token",
                "generated": "the first generated token (the run averaged every generated token)"}


def overlay_heads(table: pd.DataFrame, n: int = MAX_HEAD_PANELS) -> tuple[list[Head], set[Head]]:
    """The heads to draw (the `n` best-ranked: visual heads come first) and which of them are visual heads."""
    top = table.head(n)
    heads = [(int(r.layer), int(r.head)) for r in top.itertuples()]
    return heads, {head for head, visual in zip(heads, top["visual"], strict=True) if visual}


def _model(info: dict[str, Any], device: str, cache: MutableMapping[tuple[str, str], Loaded]) -> Loaded:
    config = info.get("config") or {}
    key = (str(info["model"]), str(config.get("dtype", "auto")))
    if key not in cache:
        cache[key] = run_model(info, device)
    return cache[key]


def overlay_block(store: Any, view: Any, out: Path, n: int, device: str,
                  models: MutableMapping[tuple[str, str], Loaded]) -> list[str]:
    """HTML for a run's gallery (PNGs written to `out`); a run whose model or data is gone gets a note instead."""
    chosen = pick_samples(store.samples(view.name), n)
    if chosen.empty:
        return [h.paragraph("No stored samples to draw.")]
    heads, visual = overlay_heads(view.table)
    info = view.info
    readout = str(info.get("readout") or "prompt")
    try:
        samples = reload_samples(info, list(chosen["sample_id"]))
        loaded = _model(info, device, models)
        ablate_heads, ablation, fastv_point = run_ablation(info)
        items = attention_maps(loaded, samples, heads, readout, ablate_heads, ablation, fastv_point)
    except (DataError, ModelError, GeometryError, CaptureError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("no overlays for run %s: %s", view.name, reason)
        return [h.paragraph(f"No overlays for this run: {reason}")]
    rows = chosen.set_index("sample_id")
    boxes = grounded_boxes(store, view.name)
    cards = []
    for i, item in enumerate(items):
        row = rows.loc[item.sample.id]
        correct = None if pd.isna(row["correct"]) else bool(row["correct"])
        box = _meta(row["meta"]).get("box") or item.sample.box
        fig = overlay_figure(item, box, str(row["question"]), _text(row["answer"]), _text(row["prediction"]), correct,
                             visual, boxes.get(item.sample.id), box_shown=row.get("prompt_style") != "none")
        path = figures.save(fig, out / f"overlay-{view.stem}-{i:02d}.png")
        verdict = {True: "correct", False: "wrong", None: "unscored"}[correct]
        cards.append(
            f'<div class="sample {verdict}">'
            + h.figure(path, f"attention of the top heads on sample {item.sample.id}")
            + f'<p class="qa"><b>sample</b> {h.esc(item.sample.id)} ({verdict})</p>'
            + f'<p class="qa"><b>question</b> {h.esc(row["question"])}</p>'
            + f'<p class="qa"><b>answer</b> {h.esc(_text(row["answer"]) or "-")}</p>'
            + f'<p class="qa"><b>prediction</b> {h.esc(_text(row["prediction"]) or "-")}</p></div>'
        )
    label = format_heads(heads, ", ")
    note = (f"Attention of the best-ranked heads {label} from {READOUT_ROWS.get(readout, readout)} to each image "
            "token, spread over the token's patch in the original image (anyres tiles and the base grid add up). "
            "Colour: attention per pixel against an even spread over the image (clear: no more than even; "
            f"brightest: 16 times or more). W: the head's total attention on the image; {_box_note(chosen)}")
    if boxes:
        label = next(iter(boxes.values())).label
        note += (f" Solid green: the box drawn from the combined attention of {label} (vheads ground); dotted white: "
                 "the true target boxes.")
    return [h.paragraph(note), '<div class="samples">' + "".join(cards) + "</div>"]


def grounded_boxes(store: Any, run: str) -> dict[str, DrawnBoxes]:
    """Per sample, the true boxes and the box drawn by the head set grounded last on the run (none if never)."""
    kept = store.groundings(run)
    if kept.empty:
        return {}
    first = kept.iloc[0]
    latest = kept[(kept["selector"] == first["selector"]) & (kept["source"] == first["source"])]
    label = head_set_label(str(first["selector"]), str(first["source"]), run)
    out = {}
    for row in latest.itertuples():
        corners = (row.x1, row.y1, row.x2, row.y2)
        predicted = None if any(v is None or pd.isna(v) for v in corners) else tuple(float(v) for v in corners)
        out[str(row.sample_id)] = DrawnBoxes(label, predicted, list(row.targets or []))
    return out


def _box_note(chosen: pd.DataFrame) -> str:
    """What the dashed box is: the box the question asks about, which samples asked without one (prompt style
    `none`) never showed the model."""
    styles = set(chosen["prompt_style"].dropna()) if "prompt_style" in chosen else set()
    if styles == {"none"}:
        return ("dashed: the true box of the asked-about object, from the data; not shown to the model (the run's "
                "prompt style is none: the question came without a box).")
    if "none" in styles:
        return ("dashed: the asked-about box (from the data; not shown to the model in the samples asked without a "
                "box, prompt style none).")
    return "dashed: the asked-about box."


def _meta(value: Any) -> dict[str, Any]:
    """A sample's meta as a dict (empty when the store has none)."""
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
