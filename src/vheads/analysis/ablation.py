"""Pruning curves: ablate the top visual heads, random heads or the weakest late heads, K at a time, and record
accuracy with a 95% interval (DESIGN.md, Ablation); or keep only K heads seeing the image (keep-only), or prune
image tokens with FastV (`analysis.pruning`); or ablate each head alone (`analysis.costs`).

Every point is an ordinary run in the store, tagged with the curve (runs.curve) and with its selector, K, seed,
source run, mode and heads (runs.tags). Point names are derived from the curve, so running the same curve again
reuses the finished points and resumes an interrupted one. K = 0 is one unablated run shared by every selector
(keep-only: K = 0, every head blind, and K = all heads, the plain run).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vheads.analysis.costs import cost_label, each_curves, each_plan, head_costs, with_costs
from vheads.analysis.points import BASELINE, Point
from vheads.analysis.pruning import FASTV, all_heads, check_pruning, fastv_plan, keep_plan
from vheads.analysis.ranking import head_table
from vheads.analysis.selectors import CURVE_SELECTORS, DEFAULT_CURVE, check_ranked, resolve_heads, select_heads
from vheads.analysis.stats import bootstrap_mean_ci, t_interval
from vheads.analysis.visual import stage_counts
from vheads.heads import parse_heads
from vheads.pipeline import run as pipeline
from vheads.pipeline.config import NOT_INHERITED, RunConfig
from vheads.store import Store

POINT_COLUMNS = ["selector", "k", "seed", "accuracy", "low", "high", "n", "seeds", "heads", "kept", "stages", "mode",
                 "image_kv_share", "fastv_layer", "fastv_keep", "curve", "from_run", "run"]
_DIGEST_FIELDS = ("model", "dataset", "data", "images", "split", "question_type", "prompt_style", "limit", "seed",
                  "readout", "max_new_tokens", "ablation")

__all__ = ["POINT_COLUMNS", "Point", "plan", "resolve_heads", "curve", "curve_points", "curve_tag"]


def curve_tag(from_run: str, config: RunConfig, kind: str | None = None) -> str:
    """`ablate-<source run>-<kind>-<digest of model, data and readout options>`: equal settings, equal tag. The
    kind is the ablation mode, `keep-<mode>` for keep-only curves, `each-<mode>` for each-head ones, `fastv` for
    FastV's."""
    settings = {name: getattr(config, name) for name in _DIGEST_FIELDS}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"ablate-{from_run}-{kind or config.ablation}-{digest}"


def plan(ranking: pd.DataFrame, tag: str, selectors: Sequence[str] = DEFAULT_CURVE,
         ks: Sequence[int] = (0, 4, 8, 16), seeds: int = 5, mode: str = "zero",
         renamed: dict[str, tuple[str, str]] | None = None) -> list[Point]:
    """The points of a curve over a ranking (`head_table` of the source run); K = 0 once, random once per seed.
    Every point ablates its K heads in `mode`. `renamed` maps a selector to the (label, stem) its points record as
    their selector and take as their names (`{tag}-{stem}{K}`)."""
    unknown = [s for s in selectors if s not in CURVE_SELECTORS]
    if unknown:
        raise ValueError(f"unknown selector {unknown[0]!r} for a curve; expected {', '.join(CURVE_SELECTORS)}")
    if not selectors or not ks:
        raise ValueError("a curve needs at least one selector and one K")
    if any(k < 0 for k in ks):
        raise ValueError(f"K must be 0 or more, got {min(ks)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    layers, heads = int(ranking.attrs["layers"]), int(ranking.attrs["heads"])
    points = [Point(BASELINE, 0, None, [], f"{tag}-k0", mode)] if 0 in ks else []
    for selector in dict.fromkeys(selectors):
        for k in sorted({k for k in ks if k > 0}):
            if selector == "random":
                points += [Point(selector, k, seed, select_heads(f"random:{k}:{seed}", ranking, layers, heads),
                                 f"{tag}-random{k}-s{seed}", mode) for seed in range(seeds)]
            else:
                label, stem = (renamed or {}).get(selector, (selector, selector))
                points.append(Point(label, k, None, select_heads(f"{selector}:{k}", ranking, layers, heads),
                                    f"{tag}-{stem}{k}", mode))
    return points


def curve(store_path: str | Path, from_run: str | int, selectors: Sequence[str] = DEFAULT_CURVE,
          ks: Sequence[int] = (0, 4, 8, 16), seeds: int = 5, ablation: str = "zero", config: RunConfig | None = None,
          loaded: Any = None, dataset: Any = None, progress: Callable[[str, int, int, int, int], None] | None = None,
          n_boot: int = 1000, keep: bool = False, sets: Sequence[str] = (),
          fastv: Sequence[tuple[int, float]] = (), each: bool = False,
          each_of: str | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) every point of a pruning curve and return its points, as `curve_points` rows.

    `ablation` is the mode: zero or uniform (ablate K heads), image-blind or flow-blind (with `keep`: only K heads
    keep the image, chosen by `selectors` or the fixed `sets`, see `pruning.keep_plan`), or fastv (one point per
    (layer, share) of `fastv`; selectors and K unused). `each`: one point per head, that head alone ablated in
    the mode (only the heads `each_of` names, a selector or `L.H` list, when given), beside one unablated point:
    the heads' ablation costs (`analysis.costs`), which the `cost` selector
    ranks by (costs in the curve's own mode; the cost points record which each-head curve ranked them, see
    `costs.cost_label`).

    The points reuse the source run's stored settings (model, data, images, split, question type, prompt style,
    limit, seed, readout, max-new-tokens, dtype, attention kernel, stages, ...); an option `config` gives explicitly
    (`config.explicit`, or for the Python API a value other than the default) overrides it and is stored with each
    point. `progress(point_name, done, total, correct, scored)` follows each point's run (see `pipeline.run`).
    """
    check_pruning(ablation, keep, fastv)
    if (each or each_of) and (keep or fastv):
        raise ValueError("--each ablates one head at a time; it goes without --keep and FastV")
    config = config or RunConfig()
    with Store(store_path, read_only=True) as store:
        source = store.run(from_run)
        stored = source["config"] or {}
        base = replace(config.inherit(stored, skip=NOT_INHERITED), store=str(store_path),
                       ablation="zero" if ablation == FASTV else ablation, ablate=[], fastv_layer=None,
                       fastv_keep=None, shard=None, name=None)
        ranking = head_table(store, from_run, stages=base.stages)
        check_ranked(ranking, source["name"])
        base = replace(base, model=base.model or source["model"])
        kind = f"keep-{ablation}" if keep else f"each-{ablation}" if each else ablation
        tag = base.curve or curve_tag(source["name"], base, kind)
        renamed = {}
        if "cost" in selectors and not each and ablation != FASTV:
            costs = head_costs(store, source["name"], ablation)
            ranking = with_costs(ranking, costs)
            renamed["cost"] = cost_label(costs)
        if ablation == FASTV:
            points = fastv_plan(tag, fastv)
        elif each:
            heads = all_heads(ranking)
            if each_of:
                chosen = set(select_heads(each_of, ranking, int(source["layers"]), int(source["heads"])))
                heads = [head for head in heads if head in chosen]
            points = each_plan(heads, tag, ablation)
        elif keep:
            points = keep_plan(ranking, tag, ablation, selectors, ks, seeds, sets, renamed)
        else:
            points = plan(ranking, tag, selectors, ks, seeds, ablation, renamed)
        status = dict(store.query("SELECT name, status FROM runs WHERE curve = ?", [tag]).itertuples(index=False))
    finished = {name for name, state in status.items() if state == "done"}
    todo = [p for p in points if p.name not in finished]
    if todo:
        loaded, dataset = _prepare(base, loaded, dataset, (int(source["layers"]), int(source["heads"])))
    for point in todo:
        fastv_layer, fastv_keep = point.fastv or (None, None)
        pipeline.run(replace(base, name=point.name, ablate=point.heads, fastv_layer=fastv_layer,
                             fastv_keep=fastv_keep, curve=tag, tags=point.tags(source["name"]),
                             resume=point.name in status),
                     loaded=loaded, dataset=dataset, progress=partial(progress, point.name) if progress else None,
                     start=partial(_started, progress, point.name) if progress else None)
    with Store(store_path, read_only=True) as store:
        runs = _curve_runs(store, tag, None)
        present = list(dict.fromkeys(p.selector for p in points if p.selector != BASELINE))
        frame = _points(store, runs[runs["name"].isin({p.name for p in points})], present, n_boot)
    return frame.to_dict("records")


def curve_points(store: Store, curve: str | None = None, from_run: str | int | None = None,
                 n_boot: int = 1000) -> pd.DataFrame:
    """The pruning-curve points of the curves in a store (one curve, or those ablating `from_run`, or all).

    Columns: selector, k, seed, accuracy, low, high, n (scored samples per run), seeds, heads (`L.H` list of the
    heads ablated), kept (keep-only: the heads that keep the image, else None), stages ({early, mid, late} counts
    of the heads the selector chose: ablated, or kept), mode, image_kv_share (share of the image's keys and
    values the run needs, for pruning modes and FastV; NaN otherwise), fastv_layer / fastv_keep (FastV's K and R),
    curve, from_run, run. top / late and single runs carry a bootstrap 95% interval over samples; random K has
    one row per seed plus a row with seed None: the mean over seeds with a t interval (heads, kept and stages
    None there). The shared points (K = 0; keep-only: K = 0 and K = all) appear once per selector of their curve.
    """
    source = store.run(from_run)["name"] if from_run is not None else None
    frames = []
    for _, runs in _curve_runs(store, curve, source).groupby("curve", sort=True):
        present = [s for s in dict.fromkeys(t["selector"] for t in runs["tags"]) if s != BASELINE]
        frames.append(_points(store, runs, present, n_boot))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=POINT_COLUMNS)


def _started(progress: Callable[[str, int, int, int, int], None], label: str, done: int, total: int) -> None:
    progress(label, done, total, 0, 0)


def _prepare(config: RunConfig, loaded: Any, dataset: Any, grid: tuple[int, int]) -> tuple[Any, Any]:
    """Load the dataset and model once for every point, and check the model has the source run's heads."""
    dataset = dataset if dataset is not None else config.load_dataset()
    loaded = loaded if loaded is not None else config.load_model()
    text = loaded.model.config.get_text_config()
    model_grid = (int(text.num_hidden_layers), int(text.num_attention_heads))
    if model_grid != grid:
        raise ValueError(f"model {loaded.name} has {model_grid[0]} x {model_grid[1]} heads but the source run has "
                         f"{grid[0]} x {grid[1]}; ablate with the source run's model")
    return loaded, dataset


def _curve_runs(store: Store, curve: str | None, from_run: str | None) -> pd.DataFrame:
    """Finished runs that are curve points, with their tags decoded (each-head curves only when named: they are
    costs, not curves)."""
    runs = store.runs()
    runs = runs[runs["curve"].notna() & (runs["status"] == "done")]
    runs = runs[runs["tags"].map(lambda t: isinstance(t, dict) and "selector" in t).astype(bool)]
    if curve is not None:
        runs = runs[runs["curve"] == curve]
    else:
        runs = runs[~runs["curve"].isin(each_curves(runs))]
    if from_run is not None:
        runs = runs[runs["tags"].map(lambda t: t.get("from_run") == from_run).astype(bool)]
    return runs


def _points(store: Store, runs: pd.DataFrame, selectors: list[str], n_boot: int) -> pd.DataFrame:
    """Rows of one curve's runs; the baseline is repeated for each selector (or kept as `none` if there is none)."""
    if runs.empty:
        return pd.DataFrame(columns=POINT_COLUMNS)
    correct = _correct(store, list(runs["run_id"]))
    single: list[dict[str, Any]] = []
    for run in runs.itertuples():
        values = correct.get(int(run.run_id), np.zeros(0))
        low, high = bootstrap_mean_ci(values, n_boot=n_boot)
        tags, settings = run.tags, run.config or {}
        chosen = parse_heads(",".join(tags["kept"] if "kept" in tags else tags["heads"]))
        share = tags.get("image_kv_share")
        single.append({"selector": tags["selector"], "k": int(tags["k"]), "seed": tags.get("seed"),
                       "accuracy": float(values.mean()) if len(values) else float("nan"), "low": float(low),
                       "high": float(high), "n": len(values), "seeds": 1, "heads": tags["heads"],
                       "kept": tags.get("kept"),
                       "stages": stage_counts(chosen, int(run.layers), settings.get("stages")),
                       "mode": tags.get("mode", settings.get("ablation")),
                       "image_kv_share": float("nan") if share is None else float(share),
                       "fastv_layer": tags.get("fastv_layer"), "fastv_keep": tags.get("fastv_keep"),
                       "curve": run.curve, "from_run": tags["from_run"], "run": run.name})
    rows = [r for r in single if r["selector"] != BASELINE]
    for base in (r for r in single if r["selector"] == BASELINE):
        rows += [{**base, "selector": s} for s in selectors] or [base]
    rows += _random_means([r for r in single if r["selector"] == "random"])
    order = {s: i for i, s in enumerate((*CURVE_SELECTORS, BASELINE))}
    rows.sort(key=lambda r: (order.get(r["selector"], len(order)), r["selector"], r["k"], r["fastv_keep"] or 0,
                             -1 if r["seed"] is None else r["seed"]))
    frame = pd.DataFrame(rows, columns=POINT_COLUMNS)
    for column in ("seed", "fastv_layer", "fastv_keep"):
        frame[column] = pd.Series([r[column] for r in rows], dtype=object)
    return frame


def _random_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per random K: the mean accuracy over seeds with a t interval clipped to [0, 1] (one seed: its
    bootstrap interval)."""
    means = []
    for k in sorted({r["k"] for r in rows}):
        group = [r for r in rows if r["k"] == k]
        if len(group) == 1:
            mean, low, high = group[0]["accuracy"], group[0]["low"], group[0]["high"]
        else:
            mean, low, high = t_interval(np.array([r["accuracy"] for r in group]))
            low, high = max(low, 0.0), min(high, 1.0)
        means.append({**group[0], "seed": None, "accuracy": mean, "low": low, "high": high,
                      "n": min(r["n"] for r in group), "seeds": len(group), "heads": None, "stages": None,
                      "kept": None, "image_kv_share": float(np.mean([r["image_kv_share"] for r in group])),
                      "run": None})
    return means


def _correct(store: Store, run_ids: list[int]) -> dict[int, np.ndarray]:
    """The scored `correct` values of each run, as 0/1 arrays."""
    frame = store.query("SELECT run_id, correct::DOUBLE AS c FROM samples WHERE list_contains(?::INTEGER[], run_id) "
                        "AND correct IS NOT NULL ORDER BY run_id, sample_id", [[int(i) for i in run_ids]])
    return {int(run_id): group["c"].to_numpy() for run_id, group in frame.groupby("run_id")}
