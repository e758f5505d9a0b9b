"""Visual heads of a run: per-head score, mean W and C, stage and visual-head flag, ranked."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vheads import metrics
from vheads.figures import listed
from vheads.store import Store


def head_columns() -> list[str]:
    """The columns of a head ranking: rank, layer, head, score, one per listed figure (`vheads.figures`), stage and
    the visual-head flag."""
    return ["rank", "layer", "head", "score", *(f.listed for f in listed()), "stage", "visual"]


def weights_array(store: Store, run: str | int, figure: str = "visual_weight",
                  where: str | None = None) -> tuple[np.ndarray, list[str]]:
    """One figure of a run as [samples, layers, heads] (NaN for NULL) and the sample ids in that order.

    A figure a store predates (written before it was recorded, opened read-only) reads as all NaN."""
    info = store.run(run)
    layers, heads = int(info["layers"]), int(info["heads"])
    extra = f" AND {where}" if where else ""
    value = f"h.{figure}" if figure in head_stats_columns(store) else "NULL::REAL"
    frame = store.query(
        f"SELECT h.sample_id, h.layer, h.head, {value} AS v FROM head_stats h "
        f"JOIN samples s ON s.run_id = h.run_id AND s.sample_id = h.sample_id "
        f"WHERE h.run_id = {int(info['run_id'])}{extra} ORDER BY h.sample_id, h.layer, h.head"
    )
    ids = list(dict.fromkeys(frame["sample_id"]))
    values = np.full((len(ids), layers, heads), np.nan)
    if ids:
        index = {sid: i for i, sid in enumerate(ids)}
        rows = frame["sample_id"].map(index).to_numpy()
        values[rows, frame["layer"].to_numpy(), frame["head"].to_numpy()] = frame["v"].astype(float).to_numpy()
    return values, ids


def head_stats_columns(store: Store) -> set[str]:
    """The columns of the store's head_stats table."""
    found = store.query("SELECT column_name FROM duckdb_columns() WHERE table_name = 'head_stats' "
                        "AND database_name = current_database()")
    return set(found["column_name"])


def run_stages(info: dict, stages: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The stage boundaries for a run: `stages` if given, else the ones stored in its config (None: thirds)."""
    chosen = stages if stages is not None else (info.get("config") or {}).get("stages")
    return None if chosen is None else metrics.check_stages(chosen, int(info["layers"]))


def attention_heads(info: dict, w: np.ndarray, layers: int, heads: int) -> np.ndarray:
    """[layers, heads] mask of the heads with softmax attention: the run's recorded attention layers, else the
    heads with a W in some sample, else (no sample has the readout row) every head."""
    recorded = (info.get("config") or {}).get("attention_layers")
    mask = np.zeros((layers, heads), dtype=bool)
    if recorded is not None:
        mask[[int(i) for i in recorded]] = True
        return mask
    finite = np.isfinite(w).any(axis=0) if w.shape[0] else mask
    return finite if finite.any() else ~mask


def head_table(store: Store, run: str | int, k: int | None = None, threshold: float = 0.5,
               where: str | None = None, stages: tuple[int, int] | None = None) -> pd.DataFrame:
    """The ranking of DESIGN.md: score (share of the samples with the readout row that have the head in the top K
    by W), then mean W; beside them the per-head mean of every listed figure (`vheads.figures`: mean W, mean C,
    region share, pointing: the share of samples with a target whose most-attended image token lies on one).
    Stages follow `stages`, else the run's stored `--stages`, else thirds.

    Heads of layers without softmax attention (a hybrid decoder's, as the run recorded them, else those never
    measured in a sample that has the readout) are left out.
    attrs: layers, heads, k, stages, samples (all the run's samples), scored (those with the readout row; 0 means
    every score is NaN), attention_layers (the layers that were measured).
    """
    info = store.run(run)
    bounds = run_stages(info, stages)
    w, _ = weights_array(store, run, "visual_weight", where)
    layers, heads = w.shape[1], w.shape[2]
    k = metrics.default_top_k(layers, heads) if k is None else k
    if not 1 <= k <= layers * heads:
        raise ValueError(f"--k {k}: must be between 1 and {layers * heads} (the run's {layers} layers x {heads} "
                         "heads)")
    scores = metrics.head_scores(w, k)
    means = store.head_means(run, where)
    shown = {f.listed: _grid(means, f.name, layers, heads) for f in listed()}
    mean_w = _grid(means, "visual_weight", layers, heads)
    flags = metrics.visual_head_flags(scores, threshold)
    measured = attention_heads(info, w, layers, heads)
    rows = []
    ranked = [(layer, head) for layer, head in metrics.rank_heads(scores, mean_w) if measured[layer, head]]
    for rank, (layer, head) in enumerate(ranked, start=1):
        rows.append({"rank": rank, "layer": layer, "head": head, "score": float(scores[layer, head]),
                     **{column: float(grid[layer, head]) for column, grid in shown.items()},
                     "stage": metrics.stage_of(layer, layers, bounds), "visual": bool(flags[layer, head])})
    table = pd.DataFrame(rows, columns=head_columns())
    table.attrs.update(layers=layers, heads=heads, k=k, samples=w.shape[0], scored=metrics.readout_samples(w),
                       stages=bounds or metrics.thirds(layers), readout=info.get("readout"),
                       attention_layers=[int(i) for i in np.flatnonzero(measured.any(axis=1))])
    return table


def _grid(means: pd.DataFrame, column: str, layers: int, heads: int) -> np.ndarray:
    """One column of `Store.head_means` as [layers, heads] (NaN where undefined or never measured)."""
    grid = np.full((layers, heads), np.nan)
    grid[means["layer"].to_numpy(), means["head"].to_numpy()] = means[column].astype(float).to_numpy()
    return grid


def no_readout_hint(table: pd.DataFrame) -> str | None:
    """One line explaining why every score is undefined, or None when some sample has the readout row."""
    if table.attrs.get("scored") or not table.attrs.get("samples"):
        return None
    readout = table.attrs.get("readout") or "the readout"
    extra = (" (first-generated needs an answer of two tokens or more: raise --max-new-tokens)"
             if readout == "first-generated" else "")
    return f"head scores are undefined: none of the {table.attrs['samples']} samples has a {readout} row{extra}"


def by_pointing(table: pd.DataFrame) -> pd.DataFrame:
    """The heads of a ranking measured on a target, most often pointing at one first (ties: higher mean W, then
    lower layer and head): the order of the `pointing:K` selector."""
    known = table[np.isfinite(table["pointing"].to_numpy(dtype=float))]
    return known.sort_values(["pointing", "mean_w", "layer", "head"], ascending=[False, False, True, True])


def top_heads(table: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    """The first K heads of a ranking."""
    return [(int(r.layer), int(r.head)) for r in table.head(k).itertuples()]


SCORE_COLUMNS = ("score", "mean_w", "mean_c", "mean_region_share", "pointing")


def score_table(store: Store, run: str | int, by: str = "score") -> pd.DataFrame:
    """Per-head visual scores of a run as `layer, head, score`, in layer and head order: the file head-budgeted KV
    methods (SparseMM-style) read. `by` picks the figure: the head score (default), mean W, mean C, mean region
    share or pointing. Only heads of softmax-attention layers; an undefined value is NaN."""
    if by not in SCORE_COLUMNS:
        raise ValueError(f"unknown --by {by!r}; expected one of {', '.join(SCORE_COLUMNS)}")
    table = head_table(store, run)
    if table.empty:
        raise ValueError(f"run {run} has no head figures to export")
    frame = table[["layer", "head", by]].rename(columns={by: "score"}).astype({"layer": int, "head": int})
    return frame.sort_values(["layer", "head"]).reset_index(drop=True)
