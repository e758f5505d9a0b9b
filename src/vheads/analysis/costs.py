"""Ablation cost: what each head costs when it alone is ablated, measured rather than read off its attention.

`vheads ablate --from RUN --each --mode M` stores one run per head (that head alone in mode M) beside one
unablated run. A head's cost is the accuracy the source's questions lose without it; ties (common with a few
hundred questions) break on the confidence it costs: the mean probability of the right first answer token,
counted as 0 where the answer is wrong. The `cost:K` selector keeps or ablates the K costliest heads.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from vheads.analysis.points import BASELINE, Point
from vheads.analysis.ranking import by_pointing
from vheads.heads import Head, format_head, parse_heads
from vheads.store import Store

# The selector of an each-head curve's single-head points.
EACH = "each"
COST_COLUMNS = ["layer", "head", "accuracy", "cost", "confidence", "confidence_cost", "n", "mode", "curve"]
EACH_MODES = ("zero", "uniform", "image-blind", "flow-blind")


def each_plan(heads: list[Head], tag: str, mode: str) -> list[Point]:
    """One point per head, that head alone ablated in `mode`, after the unablated point they are measured
    against."""
    if mode not in EACH_MODES:
        raise ValueError(f"--each ablates one head at a time: use it with --mode {', '.join(EACH_MODES)}, not {mode}")
    return [Point(BASELINE, 0, None, [], f"{tag}-k0", mode),
            *(Point(EACH, 1, None, [head], f"{tag}-h{head[0]}-{head[1]}", mode) for head in heads)]


def head_costs(store: Store, from_run: str | int, mode: str | None = None, strict: bool = True,
               curve: str | None = None) -> pd.DataFrame:
    """Each head's ablation cost from the stored each-head curve of `from_run` in `mode` (any mode when None, or
    when not `strict` and `mode` has none, as long as only one was run; the newest curve when several cover the
    mode, or the one named `curve`), costliest first: `COST_COLUMNS`.

    cost: the unablated point's accuracy minus the head's; confidence: mean probability of the right first answer
    token (0 where wrong); confidence_cost: the unablated point's confidence minus the head's. attrs: the
    unablated point's accuracy, confidence and n, the curve, and its data (`dataset split`). Raises ValueError
    naming the command to run when there is no such curve."""
    source = store.run(from_run)["name"]
    runs = _each_runs(store, source)
    if curve is not None:
        runs = runs[runs["curve"] == curve]
    modes = _modes(runs)
    if mode is not None and not strict and mode not in modes:
        mode = None
    if mode is not None:
        runs = runs[runs["tags"].map(lambda t: t.get("mode") == mode).astype(bool)]
    elif len(modes) > 1:
        raise ValueError(f"run {source} has each-head costs in several modes ({', '.join(modes)}): name one")
    if runs.empty:
        asked = mode or "image-blind"
        raise ValueError(f"cost ranks heads by what each costs when ablated alone, and run {source} has no "
                         f"{mode + ' ' if mode else ''}each-head points: run `vheads ablate --from {source} --each "
                         f"--mode {asked}` first" + (f" (it has {', '.join(modes)})" if modes else ""))
    newest = runs.sort_values("run_id")["curve"].iloc[-1]
    runs = runs[runs["curve"] == newest]
    base = runs[runs["tags"].map(lambda t: t["selector"] == BASELINE).astype(bool)]
    heads = runs[runs["tags"].map(lambda t: t["selector"] == EACH).astype(bool)]
    if base.empty or heads.empty:
        raise ValueError(f"the each-head curve {newest} of run {source} is unfinished: run the same `vheads ablate "
                         "--each` again to finish it")
    figures = _figures(store, [int(i) for i in runs["run_id"]])
    plain = figures.get(int(base["run_id"].iloc[0]), (np.nan, np.nan, 0))
    rows = []
    for run in heads.itertuples():
        (layer, head), = parse_heads(run.tags["heads"][0])
        accuracy, confidence, n = figures.get(int(run.run_id), (np.nan, np.nan, 0))
        rows.append({"layer": layer, "head": head, "accuracy": accuracy, "cost": plain[0] - accuracy,
                     "confidence": confidence, "confidence_cost": plain[1] - confidence, "n": n,
                     "mode": run.tags["mode"], "curve": newest})
    frame = pd.DataFrame(rows, columns=COST_COLUMNS)
    frame.attrs.update(accuracy=plain[0], confidence=plain[1], n=plain[2], curve=newest,
                       data=f"{base['dataset'].iloc[0]} {base['split'].iloc[0]}")
    return order_costs(frame)


def cost_label(costs: pd.DataFrame) -> tuple[str, str]:
    """What the points a `cost` ranking chose record: the selector label, naming the questions the costs were
    measured on (`cost (shapes train, 300 questions)`), and a name stem unique to their each-head curve, so
    costs measured anew make new points rather than reuse old ones."""
    digest = hashlib.sha1(str(costs.attrs["curve"]).encode()).hexdigest()[:6]
    return f"cost ({costs.attrs['data']}, {costs.attrs['n']} questions)", f"cost-{digest}-"


def cost_modes(store: Store, from_run: str | int) -> list[str]:
    """The ablation modes in which `from_run` has each-head points."""
    return _modes(_each_runs(store, store.run(from_run)["name"]))


def order_costs(costs: pd.DataFrame) -> pd.DataFrame:
    """Costliest first: by cost, then confidence cost, then lower layer and head; heads never measured last."""
    ordered = costs.assign(_c=costs["cost"].fillna(-np.inf), _p=costs["confidence_cost"].fillna(-np.inf))
    ordered = ordered.sort_values(["_c", "_p", "layer", "head"], ascending=[False, False, True, True])
    ordered = ordered.drop(columns=["_c", "_p"]).reset_index(drop=True)
    ordered.attrs = dict(costs.attrs)
    return ordered


def with_costs(ranking: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """A `head_table` ranking with each head's `ablation_cost` and its `cost_rank` in `order_costs`'s order (NaN
    where unmeasured), what the `cost:K` selector reads."""
    ranked = order_costs(costs)
    ranked = ranked.assign(cost_rank=np.arange(1, len(ranked) + 1))[["layer", "head", "cost", "cost_rank"]]
    merged = ranking.merge(ranked.rename(columns={"cost": "ablation_cost"}), on=["layer", "head"], how="left")
    merged.attrs = dict(ranking.attrs)
    return merged


def with_mode_costs(ranking: pd.DataFrame, store: Store, run: str | int) -> pd.DataFrame:
    """A `head_table` ranking with a `cost_MODE` column (accuracy lost with the head alone ablated) for each mode
    in which `run` has a finished each-head curve; the ranking as it is when it has none."""
    out = ranking
    for mode in cost_modes(store, run):
        try:
            costs = head_costs(store, run, mode)
        except ValueError:  # an unfinished each-head curve
            continue
        column = costs[["layer", "head", "cost"]].rename(columns={"cost": f"cost_{mode.replace('-', '_')}"})
        out = out.merge(column, on=["layer", "head"], how="left")
    out.attrs = dict(ranking.attrs)
    return out


def cost_table(costs: pd.DataFrame, ranking: pd.DataFrame | None = None) -> pd.DataFrame:
    """The costs as a table to read: head `L.H`, its rank by cost, accuracy without it, cost, confidence cost, and
    beside them (with a ranking) its rank by the paper's score and by pointing."""
    frame = pd.DataFrame({"head": [format_head((int(r.layer), int(r.head))) for r in costs.itertuples()],
                          "cost rank": range(1, len(costs) + 1), "accuracy": costs["accuracy"],
                          "cost": costs["cost"], "confidence cost": costs["confidence_cost"]})
    if ranking is not None:
        key = [(int(r.layer), int(r.head)) for r in costs.itertuples()]
        score_rank = {(int(r.layer), int(r.head)): int(r.rank) for r in ranking.itertuples()}
        frame["score rank"] = [score_rank.get(h) for h in key]
        ordered = by_pointing(ranking) if "pointing" in ranking else ranking.iloc[:0]
        if len(ordered):
            pointing_rank = {(int(r.layer), int(r.head)): i for i, r in enumerate(ordered.itertuples(), start=1)}
            frame["pointing rank"] = [pointing_rank.get(h) for h in key]
    return frame


def each_curves(runs: pd.DataFrame) -> set[str]:
    """The each-head curves among curve-point runs (rows with `curve` and decoded `tags`)."""
    return {c for c, t in zip(runs["curve"], runs["tags"], strict=True) if t.get("selector") == EACH}


def _each_runs(store: Store, source: str) -> pd.DataFrame:
    """Finished runs of the each-head curves of `source`: their single-head points and unablated points."""
    runs = store.runs()
    runs = runs[runs["curve"].notna() & (runs["status"] == "done")]
    runs = runs[runs["tags"].map(lambda t: isinstance(t, dict) and t.get("from_run") == source).astype(bool)]
    return runs[runs["curve"].isin(each_curves(runs))]


def _modes(runs: pd.DataFrame) -> list[str]:
    """The ablation modes of each-head runs."""
    return sorted({str(t.get("mode")) for t in runs["tags"]})


def _figures(store: Store, run_ids: list[int]) -> dict[int, tuple[float, float, int]]:
    """Per run: accuracy, mean probability of the right first answer token (0 where wrong), scored samples."""
    have = set(store.query("SELECT column_name FROM duckdb_columns() WHERE table_name = 'samples'")["column_name"])
    confidence = "first_token_prob" if "first_token_prob" in have else "NULL::DOUBLE"
    frame = store.query(f"SELECT run_id, avg(correct::DOUBLE) AS accuracy, avg(CASE WHEN correct THEN {confidence} "
                        "ELSE 0 END) AS confidence, count(*) AS n FROM samples WHERE list_contains(?::INTEGER[], "
                        "run_id) AND correct IS NOT NULL GROUP BY run_id", [run_ids])
    return {int(r.run_id): (float(r.accuracy), float(r.confidence) if r.confidence is not None else np.nan, int(r.n))
            for r in frame.itertuples()}


__all__ = ["EACH", "EACH_MODES", "COST_COLUMNS", "each_plan", "each_curves", "head_costs", "cost_label", "cost_modes",
           "order_costs", "with_costs", "with_mode_costs", "cost_table"]
