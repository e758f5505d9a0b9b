"""Visual heads of a run: which heads, in which stage, per question type / prompt style, and how two sets differ.

The paper's two checks read directly off these: drawing the box (prompt style visual vs plain) leaves the set of
visual heads nearly unchanged, while naming the object (question type obj vs general) switches on extra heads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vheads import metrics
from vheads.analysis.ranking import head_table, weights_array
from vheads.analysis.stats import bootstrap_mean_ci
from vheads.heads import Head, format_head
from vheads.store import Store

BREAKDOWN_COLUMNS = ("question_type", "prompt_style")


def visual_heads(store: Store, run: str | int, k: int | None = None, threshold: float = 0.5,
                 where: str | None = None) -> pd.DataFrame:
    """The rows of `head_table` flagged visual (score >= threshold), best first."""
    table = head_table(store, run, k=k, threshold=threshold, where=where)
    heads = table[table["visual"]].reset_index(drop=True)
    heads.attrs.update(table.attrs)
    return heads


def head_set(table: pd.DataFrame) -> set[Head]:
    """The (layer, head) pairs of a head table."""
    return {(int(layer), int(head)) for layer, head in zip(table["layer"], table["head"], strict=True)}


def head_label(heads: Iterable[Head]) -> list[str]:
    """Heads as sorted `L.H` strings, the spelling `--ablate` takes."""
    return [format_head(head) for head in sorted(heads)]


def stage_counts(heads: Iterable[Head], layers: int, stages: tuple[int, int] | None = None) -> dict[str, int]:
    """How many of the heads sit in each stage: {'early': n, 'mid': n, 'late': n} (boundaries: thirds or `stages`)."""
    counts = dict.fromkeys(metrics.STAGES, 0)
    for layer, _ in heads:
        counts[metrics.stage_of(layer, layers, stages)] += 1
    return counts


def breakdown(store: Store, run: str | int, by: str = "question_type", k: int | None = None,
              threshold: float = 0.5) -> pd.DataFrame:
    """Visual heads found on each group of samples (each question type or prompt style) of one run.

    Columns: the group value, samples, visual (count), early / mid / late counts, heads (`L.H` list).
    """
    if by not in BREAKDOWN_COLUMNS:
        raise ValueError(f"cannot break down by {by!r}; expected one of {', '.join(BREAKDOWN_COLUMNS)}")
    run_id = int(store.run(run)["run_id"])
    values = store.query(f"SELECT DISTINCT {by} AS v FROM samples WHERE run_id = ? ORDER BY v NULLS LAST", [run_id])
    rows = []
    for value in values["v"]:
        table = visual_heads(store, run, k=k, threshold=threshold, where=group_filter(by, value))
        heads = head_set(table)
        rows.append({by: value, "samples": table.attrs["samples"], "visual": len(heads),
                     **stage_counts(heads, table.attrs["layers"], table.attrs["stages"]), "heads": head_label(heads)})
    return pd.DataFrame(rows, columns=[by, "samples", "visual", *metrics.STAGES, "heads"])


def group_filter(column: str, value: str | None) -> str:
    """The `where=` clause selecting one group of samples (`s.column = 'value'`, or IS NULL)."""
    if column not in BREAKDOWN_COLUMNS:
        raise ValueError(f"cannot filter on {column!r}; expected one of {', '.join(BREAKDOWN_COLUMNS)}")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return f"s.{column} IS NULL"
    return f"s.{column} = '" + str(value).replace("'", "''") + "'"


@dataclass(frozen=True)
class HeadSetDiff:
    """Two head sets side by side: what they share, what only one has, and their Jaccard index."""

    shared: list[Head]
    only_a: list[Head]
    only_b: list[Head]
    jaccard: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form with heads as `L.H` strings."""
        return {"shared": head_label(self.shared), "only_a": head_label(self.only_a),
                "only_b": head_label(self.only_b), "jaccard": self.jaccard}


def diff_heads(a: Iterable[Head], b: Iterable[Head]) -> HeadSetDiff:
    """Shared / only-A / only-B heads and |A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    set_a, set_b = set(a), set(b)
    union = set_a | set_b
    return HeadSetDiff(shared=sorted(set_a & set_b), only_a=sorted(set_a - set_b), only_b=sorted(set_b - set_a),
                       jaccard=len(set_a & set_b) / len(union) if union else 1.0)


def compare_visual(store: Store, run_a: str | int, run_b: str | int, k: int | None = None, threshold: float = 0.5,
                   where_a: str | None = None, where_b: str | None = None) -> HeadSetDiff:
    """How the visual heads of two runs (or two sample groups of one run, via `where_*`) differ."""
    a = head_set(visual_heads(store, run_a, k=k, threshold=threshold, where=where_a))
    b = head_set(visual_heads(store, run_b, k=k, threshold=threshold, where=where_b))
    return diff_heads(a, b)


def head_intervals(store: Store, run: str | int, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                   where: str | None = None) -> pd.DataFrame:
    """Per-head mean W and mean C with a bootstrap interval over samples (seeded, so reruns agree).

    Columns: layer, head, mean_w, w_low, w_high, mean_c, c_low, c_high, samples.
    """
    w, _ = weights_array(store, run, "visual_weight", where)
    c, _ = weights_array(store, run, "concentration", where)
    w_low, w_high = bootstrap_mean_ci(w, n_boot, seed, level)
    c_low, c_high = bootstrap_mean_ci(c, n_boot, seed, level)
    layers, heads = w.shape[1], w.shape[2]
    grid_layer, grid_head = np.meshgrid(np.arange(layers), np.arange(heads), indexing="ij")
    frame = pd.DataFrame({
        "layer": grid_layer.ravel(), "head": grid_head.ravel(),
        "mean_w": metrics.nanmean(w).ravel(), "w_low": w_low.ravel(), "w_high": w_high.ravel(),
        "mean_c": metrics.nanmean(c).ravel(), "c_low": c_low.ravel(), "c_high": c_high.ravel(),
    })
    frame["samples"] = w.shape[0]
    return frame
