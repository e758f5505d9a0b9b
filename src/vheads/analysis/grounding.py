"""`vheads ground`: a run's own samples run again, boxes drawn from the chosen heads' attention, scored and stored.

Each head set comes from a selector (`top:K`, `localization:K`, `pointing:K`, `random:K[:seed]`, `L.H,...`)
resolved on the run, or on another run of the same model (`heads_from`, so heads can be chosen on one split and
tested on another; the boxes are kept apart by that source run). The samples are reloaded with the run's stored
dataset options, checked against those the run stored, and run one at a time with the run's ablation, like the
report's overlays; the attention of every head of every set is kept in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vheads.analysis.boxes import SIGMA_CELLS, Grounded, check_sigma, ground_map, scores
from vheads.analysis.selectors import canonical, resolve_heads
from vheads.analysis.visual import head_label
from vheads.models import Loaded
from vheads.pipeline.replay import (
    Head,
    changed_samples,
    iter_attention_maps,
    reload_samples,
    run_ablation,
    run_model,
)
from vheads.store import Store


@dataclass
class Grounding:
    """What one head set did on a run: its heads, the run they were chosen on, its scores, and per sample the box
    it drew."""

    selector: str
    heads: list[Head]
    run: str
    source: str
    n: int
    unseen: int
    pointing: float | None
    iou: float | None
    acc50: float | None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """`{"selector", "source", "heads", "n", "unseen", "pointing", "iou", "acc50"}`, heads as `L.H` strings."""
        return {"selector": self.selector, "source": self.source, "heads": head_label(self.heads), "n": self.n,
                "unseen": self.unseen, "pointing": self.pointing, "iou": self.iou, "acc50": self.acc50}

    def label(self) -> str:
        """The head set as captions name it (`head_set_label`)."""
        return head_set_label(self.selector, self.source, self.run)


def head_set_label(selector: str, source: str, run: str) -> str:
    """A head set as captions name it: its selector, and the run its heads were chosen on when that is another
    (source '': kept by a vheads that did not record it)."""
    if source == run:
        return selector
    return f"{selector} of run {source}" if source else f"{selector} (chosen on a run not recorded)"


def head_sets(store: Store, run: str | int, selectors: Sequence[str], heads_from: str | int | None = None,
              allow_other_model: bool = False) -> tuple[str, list[tuple[str, list[Head]]]]:
    """The run the heads are chosen on (`heads_from`, default: the run) and each selector, in its canonical
    spelling, with the heads it names there. The source run must have the run's grid and, unless
    `allow_other_model`, its model."""
    info = store.run(run)
    other = store.run(info["name"] if heads_from is None else heads_from)
    grid, other_grid = (int(info["layers"]), int(info["heads"])), (int(other["layers"]), int(other["heads"]))
    if grid != other_grid:
        raise ValueError(f"run {other['name']} has {other_grid[0]} x {other_grid[1]} heads but run {info['name']} "
                         f"has {grid[0]} x {grid[1]}; choose heads on a run of the same model")
    if other["model"] != info["model"] and not allow_other_model:
        raise ValueError(f"--heads-from run {other['name']} is of model {other['model']}, run {info['name']} of "
                         f"{info['model']}; pass --allow-other-model to ground with heads chosen on another model")
    sets: dict[str, list[Head]] = {}
    for spec in selectors:
        text = canonical(spec)
        if text not in sets:
            sets[text] = resolve_heads(text, store, other["name"])
            if not sets[text]:
                raise ValueError(f"{text}: names no head")
    return str(other["name"]), list(sets.items())


def ground(store_path: str | Path, run: str | int, selectors: Sequence[str], heads_from: str | int | None = None,
           device: str = "auto", loaded: Loaded | None = None, sigma_cells: float = SIGMA_CELLS,
           progress: Callable[[int, int], None] | None = None, allow_other_model: bool = False) -> list[Grounding]:
    """Ground a run's samples with each head set, store the boxes (table `groundings`) and return the scores.

    Samples without a target box are left out; those whose targets lie outside what the model saw (a centre
    crop) are grounded but not scored (`unseen`). Raises ValueError (bad selector or sigma, no sample with a box,
    heads chosen on another model, data changed since the run), DataError or ModelError (the run's data or model
    cannot be loaded again) and GeometryError (the family's image tokens cannot be placed on the picture).
    """
    sigma_cells = check_sigma(sigma_cells)
    with Store(store_path) as store:
        info = store.run(run)
        source, sets = head_sets(store, run, selectors, heads_from, allow_other_model)
        stored = store.samples(run)
        reloaded = reload_samples(info, list(stored["sample_id"]))
        changed = changed_samples(stored, reloaded)
        if changed:
            config = info.get("config") or {}
            data = config.get("data") or config.get("dataset") or info["dataset"]
            raise ValueError(f"{changed} of {len(stored)} samples of run {info['name']} are gone from {data} or "
                             "changed (question, answer or box) since the run; run it again to ground this data")
        samples = [s for s in reloaded if s.targets()]
        if not samples:
            raise ValueError(f"run {info['name']} has no sample with a box to ground (of {len(stored)} stored)")
        loaded = loaded if loaded is not None else run_model(info, device)
        union = sorted({head for _, heads in sets for head in heads})
        slots = [[union.index(head) for head in heads] for _, heads in sets]
        ablate_heads, ablation, fastv_point = run_ablation(info)
        results: list[list[tuple[str, Grounded, list]]] = [[] for _ in sets]
        maps = iter_attention_maps(loaded, samples, union, str(info.get("readout") or "prompt"), ablate_heads,
                                   ablation, fastv_point)
        for done, item in enumerate(maps, start=1):
            targets = item.sample.targets()
            width, height = item.image.size
            for out, index in zip(results, slots, strict=True):
                weights = np.nansum(item.maps[index], axis=0)
                out.append((item.sample.id, ground_map(item.grid, weights, width, height, targets, sigma_cells),
                            [list(t) for t in targets]))
            if progress:
                progress(done, len(samples))
        groundings = []
        for (spec, heads), out in zip(sets, results, strict=True):
            rows = [_row(sample_id, grounded, targets) for sample_id, grounded, targets in out]
            store.add_groundings(info["name"], spec, head_label(heads), rows, source=source)
            groundings.append(Grounding(spec, heads, info["name"], source, **scores([g for _, g, _ in out]),
                                        samples=rows))
    return groundings


def _row(sample_id: str, grounded: Grounded, targets: list) -> dict[str, Any]:
    box = grounded.box or (None, None, None, None)
    return {"sample_id": sample_id, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3], "targets": targets,
            "pointing": grounded.pointing, "iou": grounded.iou}
