"""`vheads ground`: a run's own samples run again, boxes drawn from the chosen heads' attention, scored and stored.

Each head set comes from a selector (`top:K`, `localization:K`, `pointing:K`, `random:K[:seed]`, `L.H,...`)
resolved on the run, or on another run of the same model (`heads_from`, so heads can be chosen on one split and
tested on another). The samples are reloaded with the run's stored dataset options and run one at a time with
the run's ablation, like the report's overlays; the attention of every head of every set is kept in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vheads.analysis.attention import Head, iter_attention_maps, reload_samples, run_ablation, run_model
from vheads.analysis.grounding import SIGMA_CELLS, Grounded, ground_map, scores
from vheads.analysis.selectors import resolve_heads
from vheads.analysis.visual import head_label
from vheads.models import Loaded
from vheads.store import Store


@dataclass
class Grounding:
    """What one head set did on a run: its heads and scores, and per sample the box it drew."""

    selector: str
    heads: list[Head]
    n: int
    pointing: float | None
    iou: float | None
    acc50: float | None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """`{"selector", "heads", "n", "pointing", "iou", "acc50"}` with heads as `L.H` strings."""
        return {"selector": self.selector, "heads": head_label(self.heads), "n": self.n, "pointing": self.pointing,
                "iou": self.iou, "acc50": self.acc50}


def head_sets(store: Store, run: str | int, selectors: Sequence[str], heads_from: str | int | None = None
              ) -> list[tuple[str, list[Head]]]:
    """Each selector with the heads it names on `heads_from` (default: the run), checked against the run's grid."""
    info = store.run(run)
    source = info["name"] if heads_from is None else heads_from
    other = store.run(source)
    grid, other_grid = (int(info["layers"]), int(info["heads"])), (int(other["layers"]), int(other["heads"]))
    if grid != other_grid:
        raise ValueError(f"run {other['name']} has {other_grid[0]} x {other_grid[1]} heads but run {info['name']} "
                         f"has {grid[0]} x {grid[1]}; choose heads on a run of the same model")
    sets = []
    for spec in selectors:
        heads = resolve_heads(spec, store, source)
        if not heads:
            raise ValueError(f"{spec}: names no head")
        sets.append((spec.strip(), heads))
    return sets


def ground(store_path: str | Path, run: str | int, selectors: Sequence[str], heads_from: str | int | None = None,
           device: str = "auto", loaded: Loaded | None = None, sigma_cells: float = SIGMA_CELLS,
           progress: Callable[[int, int], None] | None = None) -> list[Grounding]:
    """Ground a run's samples with each head set, store the boxes (table `groundings`) and return the scores.

    Samples without a target box are left out. Raises ValueError (bad selector, no sample with a box), DataError
    or ModelError (the run's data or model cannot be loaded again) and GeometryError (the family's image tokens
    cannot be placed on the picture).
    """
    with Store(store_path) as store:
        info = store.run(run)
        sets = head_sets(store, run, selectors, heads_from)
        ids = list(store.samples(run)["sample_id"])
        samples = [s for s in reload_samples(info, ids) if s.targets()]
        if not samples:
            raise ValueError(f"run {info['name']} has no sample with a box to ground (of {len(ids)} stored)")
        loaded = loaded if loaded is not None else run_model(info, device)
        union = sorted({head for _, heads in sets for head in heads})
        slots = [[union.index(head) for head in heads] for _, heads in sets]
        ablate_heads, ablation = run_ablation(info)
        results: list[list[tuple[str, Grounded, list]]] = [[] for _ in sets]
        maps = iter_attention_maps(loaded, samples, union, str(info.get("readout") or "prompt"), ablate_heads,
                                   ablation)
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
            store.add_groundings(info["name"], spec, head_label(heads), rows)
            groundings.append(Grounding(spec, heads, **scores([g for _, g, _ in out]), samples=rows))
    return groundings


def _row(sample_id: str, grounded: Grounded, targets: list) -> dict[str, Any]:
    box = grounded.box or (None, None, None, None)
    return {"sample_id": sample_id, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3], "targets": targets,
            "pointing": grounded.pointing, "iou": grounded.iou}
