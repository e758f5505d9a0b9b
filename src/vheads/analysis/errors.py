"""Which answers to doubt: each sample's chance of being wrong, predicted from its head figures and from the answer's
own confidence by grouped cross-validation (`vheads predict errors`).

A run's labelled samples (correct not NULL) are cut into folds by image, so no image is ever on both sides; in each
fold a logistic regression is fitted on the other folds alone (the visual heads chosen, the penalty picked, the
figures standardised and NaN filled on those folds) and predicts the fold. Three predictors share the folds: the
head figures, the confidence (first-token probability and mean log-probability), and both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vheads import metrics
from vheads.analysis import predict
from vheads.store import PREDICTORS, Store

HEAD_SETS = ("visual", "all")
# The per-head figures a predictor reads: W, C, region share (region weight / W) and pointing.
FIGURES = ("visual_weight", "concentration", "region_share", "pointing")
MIN_CLASS = 20


@dataclass
class Labelled:
    """The labelled samples of one or more runs of one grid: figures [n, layers x heads, FIGURES], wrong (1) or
    right (0), confidence [n, 2] (NaN where not stored), the image group of each, and which run each came from."""

    runs: list[str]
    run_of: np.ndarray
    sample_ids: np.ndarray
    figures: np.ndarray
    wrong: np.ndarray
    confidence: np.ndarray
    groups: np.ndarray
    layers: int
    heads: int


def image_key(frame: pd.DataFrame) -> np.ndarray:
    """The image each sample asks about, for grouping: the meta's `image` file where the loader records one, else
    its `circular_group` (MMBench's rotations of one question), else the sample id (ShapesQA draws one image per
    sample id, and the same id in several runs is the same image)."""
    image, circular = frame["image"], frame["circular_group"]
    return np.where(image.notna(), "image:" + image.astype(str),
                    np.where(circular.notna(), "circular:" + circular.astype(str), "id:" + frame["sample_id"]))


def read_labelled(store: Store, run: str) -> Labelled:
    """A run's labelled samples and their figures; ValueError when it has fewer than 20 right or 20 wrong answers."""
    info = store.run(run)
    run_id, layers, heads, name = int(info["run_id"]), int(info["layers"]), int(info["heads"]), str(info["name"])
    have = set(store.query("SELECT column_name FROM duckdb_columns() WHERE table_name = 'samples' AND "
                           "database_name = current_database()")["column_name"])
    sure = [c if c in have else f"NULL::DOUBLE AS {c}" for c in ("first_token_prob", "mean_logprob")]
    samples = store.query(
        f"SELECT sample_id, correct, {', '.join(sure)}, json_extract_string(meta, '$.image') AS image, "
        "json_extract_string(meta, '$.circular_group') AS circular_group FROM samples "
        f"WHERE run_id = {run_id} AND correct IS NOT NULL ORDER BY sample_id")
    wrong = (~samples["correct"].astype(bool)).to_numpy().astype(np.float64)
    n_wrong, n_right = int(wrong.sum()), int(len(wrong) - wrong.sum())
    if min(n_wrong, n_right) < MIN_CLASS:
        raise ValueError(f"run {name} has {n_right} right and {n_wrong} wrong answers among {len(wrong)} scored "
                         f"samples; predicting errors needs at least {MIN_CLASS} of each")
    columns = store.query("SELECT column_name FROM duckdb_columns() WHERE table_name = 'head_stats' AND "
                          "database_name = current_database()")["column_name"]
    pointing = "h.pointing" if "pointing" in set(columns) else "NULL::REAL"
    cells = store.query(
        "SELECT s.sample_id, h.layer, h.head, h.visual_weight, h.concentration, "
        f"h.region_weight / nullif(h.visual_weight, 0) AS region_share, {pointing} AS pointing "
        f"FROM head_stats h JOIN samples s ON s.run_id = h.run_id AND s.sample_id = h.sample_id "
        f"WHERE h.run_id = {run_id} AND s.correct IS NOT NULL")
    index = pd.Index(samples["sample_id"])
    rows = index.get_indexer(cells["sample_id"])
    figures = np.full((len(samples), layers * heads, len(FIGURES)), np.nan)
    slot = cells["layer"].to_numpy(np.int64) * heads + cells["head"].to_numpy(np.int64)
    for j, figure in enumerate(FIGURES):
        figures[rows, slot, j] = cells[figure].to_numpy(np.float64, na_value=np.nan)
    confidence = np.column_stack([samples["first_token_prob"].to_numpy(np.float64, na_value=np.nan),
                                  samples["mean_logprob"].to_numpy(np.float64, na_value=np.nan)])
    return Labelled([name], np.zeros(len(samples), dtype=np.int64), samples["sample_id"].to_numpy(str), figures,
                    wrong, confidence, image_key(samples), layers, heads)


def pool(parts: Sequence[Labelled]) -> Labelled:
    """Several runs' samples as one set (same grid required); the same image in two runs is one group."""
    first = parts[0]
    for part in parts[1:]:
        if (part.layers, part.heads) != (first.layers, first.heads):
            raise ValueError(f"cannot pool run {part.runs[0]} ({part.layers} x {part.heads} heads) with run "
                             f"{first.runs[0]} ({first.layers} x {first.heads}): pool runs of one grid")
    offsets = np.cumsum([0] + [len(p.runs) for p in parts])
    return Labelled([r for p in parts for r in p.runs], np.concatenate([p.run_of + o for p, o in zip(parts, offsets,
                                                                                                     strict=False)]),
                    np.concatenate([p.sample_ids for p in parts]), np.concatenate([p.figures for p in parts]),
                    np.concatenate([p.wrong for p in parts]), np.concatenate([p.confidence for p in parts]),
                    np.concatenate([p.groups for p in parts]), first.layers, first.heads)


def chosen_heads(data: Labelled, rows: np.ndarray, head_set: str) -> np.ndarray:
    """The heads (flat layer x heads indices) whose figures a fold's model reads, chosen on its training `rows`
    alone: the visual heads (score >= 0.5; the top K by score when none reaches it), or every measured head."""
    w = data.figures[rows, :, 0]
    measured = np.flatnonzero(np.isfinite(w).any(axis=0))
    if head_set == "all":
        return measured
    scores = metrics.head_scores(w.reshape(len(rows), data.layers, data.heads))
    flags = metrics.visual_head_flags(scores).ravel()
    if flags.any():
        return np.flatnonzero(flags)
    mean_w = metrics.nanmean(w).reshape(data.layers, data.heads)
    ranked = metrics.rank_heads(scores, mean_w)[:metrics.default_top_k(data.layers, data.heads)]
    return np.array([layer * data.heads + head for layer, head in ranked])


@dataclass
class ErrorPrediction:
    """One cross-validated fit: out-of-fold error probabilities per predictor, their AUROCs (pairs within a fold,
    `predict.auroc`) with cluster-bootstrap
    intervals, the paired difference heads - confidence, and the AUROC of the heads with the labels shuffled (its
    own folds, stratified on the shuffled labels; it should hold 0.5 inside its interval)."""

    data: Labelled
    head_set: str
    folds: np.ndarray
    p_error: dict[str, np.ndarray]
    auroc: dict[str, tuple[float, float, float]]
    difference: tuple[float, float, float] | None
    shuffled: tuple[float, float, float] | None
    heads_used: list[int]
    l2: dict[str, list[float]]
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The runs fitted together, as one name."""
        return "+".join(self.data.runs)

    def table(self) -> pd.DataFrame:
        """One row per predictor: AUROC and its 95% interval, samples and wrong answers."""
        rows = [{"runs": self.label, "predictor": name, "auroc": value, "low": low, "high": high,
                 "samples": len(self.data.wrong), "wrong": int(self.data.wrong.sum())}
                for name, (value, low, high) in self.auroc.items()]
        if self.shuffled is not None:
            rows.append({"runs": self.label, "predictor": "heads, labels shuffled", "auroc": self.shuffled[0],
                         "low": self.shuffled[1], "high": self.shuffled[2], "samples": len(self.data.wrong),
                         "wrong": int(self.data.wrong.sum())})
        return pd.DataFrame(rows)

    def rows(self) -> list[dict]:
        """The predictions as store rows (run name, predictor, sample id, p_error, fold)."""
        return [{"run": self.data.runs[int(r)], "predictor": name, "sample_id": str(s), "p_error": float(p),
                 "fold": int(f)} for name, probs in self.p_error.items()
                for r, s, p, f in zip(self.data.run_of, self.data.sample_ids, probs, self.folds, strict=True)]


def predict_errors(data: Labelled, head_set: str = "visual", k: int = 5, n_boot: int = 1000, seed: int = 0,
                   shuffle_check: bool = True) -> ErrorPrediction:
    """Cross-validate the three predictors on `data` (grouped `k` folds, seeded) and bound their AUROCs."""
    if head_set not in HEAD_SETS:
        raise ValueError(f"unknown head set {head_set!r}; expected one of {', '.join(HEAD_SETS)}")
    folds = predict.grouped_folds(data.groups, k, seed, labels=data.wrong)
    notes = []
    has_confidence = np.isfinite(data.confidence).any(axis=0).all()
    names = PREDICTORS if has_confidence else ("heads",)
    if not has_confidence:
        notes.append("no answer confidence stored (runs written before it was recorded): heads only")
    used: list[int] = []

    def heads(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chosen = chosen_heads(data, train, head_set)
        used.append(len(chosen))
        x = data.figures[:, chosen, :].reshape(len(data.wrong), -1)
        return x[train], x[test]

    def confidence(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return data.confidence[train], data.confidence[test]

    def both(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (a, b), (c, d) = heads(train, test), confidence(train, test)
        return np.hstack([a, c]), np.hstack([b, d])

    build = {"heads": heads, "confidence": confidence, "both": both}
    fits = {name: predict.cross_validate(build[name], data.wrong, folds, data.groups, seed=seed) for name in names}
    heads_used = used[:k]
    scores = np.column_stack([fits[name].p for name in names])
    low, high, replicates = predict.bootstrap_auroc(data.wrong, scores, data.groups, n_boot, seed, strata=folds)
    aurocs = {name: (predict.auroc(data.wrong, fits[name].p, folds), float(low[j]), float(high[j]))
              for j, name in enumerate(names)}
    difference = None
    if has_confidence:
        value = aurocs["heads"][0] - aurocs["confidence"][0]
        difference = (value, *predict.percentile_interval(replicates[:, 0] - replicates[:, 1]))
    shuffled = None
    if shuffle_check:
        permuted = np.random.default_rng(seed + 1).permutation(data.wrong)
        refolded = predict.grouped_folds(data.groups, k, seed, labels=permuted)
        fit = predict.cross_validate(heads, permuted, refolded, data.groups, seed=seed)
        low, high, _ = predict.bootstrap_auroc(permuted, fit.p, data.groups, n_boot, seed, strata=refolded)
        shuffled = (predict.auroc(permuted, fit.p, refolded), float(low[0]), float(high[0]))
    return ErrorPrediction(data, head_set, folds, {name: fit.p for name, fit in fits.items()}, aurocs, difference,
                           shuffled, heads_used, {name: fit.l2 for name, fit in fits.items()}, notes)


def predict_runs(store: Store, runs: Sequence[str], head_set: str = "visual", pooled: bool = False, k: int = 5,
                 n_boot: int = 1000, seed: int = 0, shuffle_check: bool = True,
                 save: bool = True) -> list[ErrorPrediction]:
    """`predict_errors` for each run (or for the runs pooled), the predictions kept in the store's `predictions`
    table unless `save` is off. Every run is checked before anything is fitted."""
    parts = [read_labelled(store, run) for run in runs]
    sets = [pool(parts)] if pooled and len(parts) > 1 else parts
    results = [predict_errors(data, head_set, k, n_boot, seed, shuffle_check) for data in sets]
    if save:
        for result in results:
            store.add_predictions(result.rows(), heads=head_set, fit=result.data.runs)
    return results
