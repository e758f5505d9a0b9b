"""Pruning curves: ablate the top visual heads, random heads or the weakest late heads, K at a time, and record
accuracy with a 95% interval (DESIGN.md, Ablation).

Every point is an ordinary run in the store, tagged with the curve (runs.curve) and with its selector, K, seed,
source run and heads (runs.tags). Point names are derived from the curve, so running the same curve again
reuses the finished points and resumes an interrupted one. K = 0 is one unablated run shared by every selector.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vheads.analysis.ranking import head_table
from vheads.analysis.selectors import CURVE_SELECTORS, check_ranked, resolve_heads, select_heads
from vheads.analysis.stats import bootstrap_mean_ci, t_interval
from vheads.analysis.visual import head_label, stage_counts
from vheads.heads import Head, parse_heads
from vheads.pipeline import run as pipeline
from vheads.pipeline.config import NOT_INHERITED, RunConfig
from vheads.store import Store

BASELINE = "none"
POINT_COLUMNS = ["selector", "k", "seed", "accuracy", "low", "high", "n", "seeds", "heads", "stages", "curve",
                 "from_run", "run"]
_DIGEST_FIELDS = ("model", "dataset", "data", "images", "split", "question_type", "prompt_style", "limit", "seed",
                  "readout", "max_new_tokens", "ablation")

__all__ = ["POINT_COLUMNS", "Point", "plan", "resolve_heads", "curve", "curve_points", "curve_tag"]


@dataclass(frozen=True)
class Point:
    """One point of a curve: the heads removed and the run that measures it."""

    selector: str
    k: int
    seed: int | None
    heads: list[Head]
    name: str

    def tags(self, from_run: str) -> dict[str, Any]:
        """What runs.tags records for this point."""
        return {"selector": self.selector, "k": self.k, "seed": self.seed, "from_run": from_run,
                "heads": head_label(self.heads)}


def curve_tag(from_run: str, config: RunConfig) -> str:
    """`ablate-<source run>-<mode>-<digest of model, data and readout options>`: equal settings, equal tag."""
    settings = {name: getattr(config, name) for name in _DIGEST_FIELDS}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"ablate-{from_run}-{config.ablation}-{digest}"


def plan(ranking: pd.DataFrame, tag: str, selectors: Sequence[str] = CURVE_SELECTORS,
         ks: Sequence[int] = (0, 4, 8, 16), seeds: int = 5) -> list[Point]:
    """The points of a curve over a ranking (`head_table` of the source run); K = 0 once, random once per seed."""
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
    points = [Point(BASELINE, 0, None, [], f"{tag}-k0")] if 0 in ks else []
    for selector in dict.fromkeys(selectors):
        for k in sorted({k for k in ks if k > 0}):
            if selector == "random":
                points += [Point(selector, k, seed, select_heads(f"random:{k}:{seed}", ranking, layers, heads),
                                 f"{tag}-random{k}-s{seed}") for seed in range(seeds)]
            else:
                points.append(Point(selector, k, None, select_heads(f"{selector}:{k}", ranking, layers, heads),
                                    f"{tag}-{selector}{k}"))
    return points


def curve(store_path: str | Path, from_run: str | int, selectors: Sequence[str] = CURVE_SELECTORS,
          ks: Sequence[int] = (0, 4, 8, 16), seeds: int = 5, ablation: str = "zero", config: RunConfig | None = None,
          loaded: Any = None, dataset: Any = None, progress: Callable[[str, int, int, int, int], None] | None = None,
          n_boot: int = 1000) -> list[dict[str, Any]]:
    """Run (or reuse) every point of a pruning curve and return its points, as `curve_points` rows.

    The points reuse the source run's stored settings (model, data, images, split, question type, prompt style,
    limit, seed, readout, max-new-tokens, dtype, attention kernel, stages, ...); an option `config` gives explicitly
    (`config.explicit`, or for the Python API a value other than the default) overrides it and is stored with each
    point. `progress(point_name, done, total, correct, scored)` follows each point's run (see `pipeline.run`).
    """
    config = config or RunConfig()
    with Store(store_path, read_only=True) as store:
        source = store.run(from_run)
        stored = source["config"] or {}
        base = replace(config.inherit(stored, skip=NOT_INHERITED), store=str(store_path), ablation=ablation,
                       ablate=[], shard=None, name=None)
        ranking = head_table(store, from_run, stages=base.stages)
        check_ranked(ranking, source["name"])
        base = replace(base, model=base.model or source["model"])
        tag = base.curve or curve_tag(source["name"], base)
        points = plan(ranking, tag, selectors, ks, seeds)
        status = dict(store.query("SELECT name, status FROM runs WHERE curve = ?", [tag]).itertuples(index=False))
    finished = {name for name, state in status.items() if state == "done"}
    todo = [p for p in points if p.name not in finished]
    if todo:
        loaded, dataset = _prepare(base, loaded, dataset, (int(source["layers"]), int(source["heads"])))
    for point in todo:
        pipeline.run(replace(base, name=point.name, ablate=point.heads, curve=tag, tags=point.tags(source["name"]),
                             resume=point.name in status),
                     loaded=loaded, dataset=dataset, progress=partial(progress, point.name) if progress else None,
                     start=partial(_started, progress, point.name) if progress else None)
    with Store(store_path, read_only=True) as store:
        runs = _curve_runs(store, tag, None)
        frame = _points(store, runs[runs["name"].isin({p.name for p in points})], list(dict.fromkeys(selectors)),
                        n_boot)
    return frame.to_dict("records")


def curve_points(store: Store, curve: str | None = None, from_run: str | int | None = None,
                 n_boot: int = 1000) -> pd.DataFrame:
    """The pruning-curve points of the curves in a store (one curve, or those ablating `from_run`, or all).

    Columns: selector, k, seed, accuracy, low, high, n (scored samples per run), seeds, heads (`L.H` list),
    stages ({early, mid, late} counts of the heads), curve, from_run, run. top / late and single runs carry a
    bootstrap 95% interval over samples; random K has one row per seed plus a row with seed None: the mean over
    seeds with a t interval (heads and stages None there). K = 0 appears once per selector of its curve.
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
    """Finished runs that are curve points, with their tags decoded."""
    runs = store.runs()
    runs = runs[runs["curve"].notna() & (runs["status"] == "done")]
    runs = runs[runs["tags"].map(lambda t: isinstance(t, dict) and "selector" in t).astype(bool)]
    if curve is not None:
        runs = runs[runs["curve"] == curve]
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
        heads = parse_heads(",".join(run.tags["heads"]))
        single.append({"selector": run.tags["selector"], "k": int(run.tags["k"]), "seed": run.tags.get("seed"),
                       "accuracy": float(values.mean()) if len(values) else float("nan"), "low": float(low),
                       "high": float(high), "n": len(values), "seeds": 1, "heads": run.tags["heads"],
                       "stages": stage_counts(heads, int(run.layers), (run.config or {}).get("stages")),
                       "curve": run.curve,
                       "from_run": run.tags["from_run"], "run": run.name})
    rows = [r for r in single if r["selector"] != BASELINE]
    for base in (r for r in single if r["selector"] == BASELINE):
        rows += [{**base, "selector": s} for s in selectors] or [base]
    rows += _random_means([r for r in single if r["selector"] == "random"])
    order = {s: i for i, s in enumerate((*CURVE_SELECTORS, BASELINE))}
    rows.sort(key=lambda r: (order.get(r["selector"], len(order)), r["selector"], r["k"],
                             -1 if r["seed"] is None else r["seed"]))
    frame = pd.DataFrame(rows, columns=POINT_COLUMNS)
    frame["seed"] = pd.Series([r["seed"] for r in rows], dtype=object)
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
                      "run": None})
    return means


def _correct(store: Store, run_ids: list[int]) -> dict[int, np.ndarray]:
    """The scored `correct` values of each run, as 0/1 arrays."""
    frame = store.query("SELECT run_id, correct::DOUBLE AS c FROM samples WHERE list_contains(?::INTEGER[], run_id) "
                        "AND correct IS NOT NULL ORDER BY run_id, sample_id", [[int(i) for i in run_ids]])
    return {int(run_id): group["c"].to_numpy() for run_id, group in frame.groupby("run_id")}
