"""A run's accuracy without its answers (`vheads predict accuracy`): a ridge regression from per-run head figures
(mean W and C per head, or per stage) to accuracy, fitted on other labelled runs of the same model.

The target run's answers are never read: its features come from `head_stats` alone, its confidence estimate from the
mean first-token probability. The fit is judged by leave-one-run-out over the training runs, beside the naive
baseline (the mean accuracy of the other runs) and the confidence-only estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vheads import metrics
from vheads.analysis import predict
from vheads.store import Store

FEATURES = ("heads", "stages")
ESTIMATORS = ("heads", "baseline", "confidence")
MIN_TRAIN = 3


def run_features(store: Store, run: str, features: str = "heads") -> np.ndarray:
    """A run's features from its head figures alone: mean W and mean C of every head (`heads`, 2 x layers x heads
    values), or of every stage, early / mid / late thirds (`stages`, 6 values); NaN where undefined."""
    if features not in FEATURES:
        raise ValueError(f"unknown --features {features!r}; expected one of {', '.join(FEATURES)}")
    info = store.run(run)
    layers, heads = int(info["layers"]), int(info["heads"])
    means = store.query(
        "SELECT layer, head, avg(visual_weight) AS w, avg(concentration) AS c FROM head_stats "
        f"WHERE run_id = {int(info['run_id'])} GROUP BY layer, head")
    grid = np.full((2, layers, heads), np.nan)
    rows, cols = means["layer"].to_numpy(np.int64), means["head"].to_numpy(np.int64)
    grid[0, rows, cols] = means["w"].to_numpy(np.float64, na_value=np.nan)
    grid[1, rows, cols] = means["c"].to_numpy(np.float64, na_value=np.nan)
    if features == "heads":
        return grid.reshape(-1)
    per_stage = [metrics.nanmean(grid[:, metrics.stage_layers(stage, layers)].reshape(2, -1), axis=1)
                 for stage in metrics.STAGES]
    return np.concatenate(per_stage)


def mean_confidence(store: Store, run: str) -> float:
    """A run's mean first-token probability (NaN when it has none stored); its answers are not read."""
    run_id = int(store.run(run)["run_id"])
    if "first_token_prob" not in set(store.query("SELECT column_name FROM duckdb_columns() WHERE table_name = "
                                                 "'samples' AND database_name = current_database()")["column_name"]):
        return float("nan")
    value = store.query(f"SELECT avg(first_token_prob) AS p FROM samples WHERE run_id = {run_id}")["p"].iloc[0]
    return float("nan") if value is None or pd.isna(value) else float(value)


def labelled_accuracy(store: Store, run: str) -> float | None:
    """A training run's accuracy, the mean of its scored samples' `correct` (None when none is scored)."""
    run_id = int(store.run(run)["run_id"])
    value = store.query(f"SELECT avg(correct::DOUBLE) AS a FROM samples WHERE run_id = {run_id} "
                        "AND correct IS NOT NULL")["a"].iloc[0]
    return None if value is None or pd.isna(value) else float(value)


def default_training(store: Store, target: str) -> list[str]:
    """Every other finished run of the target's model and grid with scored samples."""
    info = store.run(target)
    runs = store.runs()
    keep = ((runs["status"] == "done") & (runs["model"] == info["model"]) & (runs["layers"] == info["layers"])
            & (runs["heads"] == info["heads"]) & (runs["run_id"] != info["run_id"]) & runs["accuracy"].notna())
    return [str(name) for name in runs.loc[keep, "name"]]


@dataclass
class AccuracyEstimate:
    """The target's estimates, and leave-one-run-out over the training runs: true accuracy and each estimator's
    estimate per run, their mean absolute errors, and the heads' error with the training accuracies shuffled."""

    target: str
    features: str
    estimates: dict[str, float]
    stored_accuracy: float | None
    loro: pd.DataFrame
    mae: dict[str, float]
    shuffled_mae: float
    l2: float
    train: list[str]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """Per estimator: the target's estimate and the leave-one-run-out mean absolute error."""
        return pd.DataFrame([{"estimator": name, "estimate": self.estimates[name], "loro_mae": self.mae[name]}
                             for name in ESTIMATORS]
                            + [{"estimator": "heads, accuracies shuffled", "estimate": np.nan,
                                "loro_mae": self.shuffled_mae}])

    def rows(self) -> list[dict]:
        """The estimates as store rows: the target's, and each training run's left-out estimate."""
        rows = [{"run": self.target, "role": "target", "estimator": name, "estimate": value}
                for name, value in self.estimates.items()]
        for record in self.loro.itertuples():
            rows += [{"run": record.run, "role": "left-out", "estimator": name, "estimate": getattr(record, name)}
                     for name in ESTIMATORS]
        return rows


def loro_table(runs: Sequence[str], x: np.ndarray, accuracy: np.ndarray, confidence: np.ndarray,
               l2s: Sequence[float] = predict.RIDGE_L2) -> pd.DataFrame:
    """Leave-one-run-out: each run's accuracy beside the ridge estimate fitted on the others, the others' mean
    accuracy (baseline) and its own mean first-token probability (confidence)."""
    estimates, baselines = predict.leave_one_out(x, accuracy, l2s)
    return pd.DataFrame({"run": list(runs), "accuracy": accuracy, "heads": np.clip(estimates, 0.0, 1.0),
                         "baseline": baselines, "confidence": confidence})


def mean_abs_errors(table: pd.DataFrame) -> dict[str, float]:
    """Mean absolute error of every estimator column against `accuracy` (NaN estimates left out)."""
    return {name: float(np.nanmean(np.abs(table[name] - table["accuracy"]))) if table[name].notna().any()
            else float("nan") for name in ESTIMATORS}


def estimate_accuracy(store: Store, target: str, train: Sequence[str] | None = None, features: str = "heads",
                      seed: int = 0, save: bool = True) -> AccuracyEstimate:
    """Estimate `target`'s accuracy from its head figures with a ridge regression fitted on `train` (default: every
    other finished, scored run of its model and grid); ValueError when the grids or models differ, a training run
    has no scored sample, or fewer than three remain. The estimates are kept in `accuracy_estimates` unless `save`
    is off."""
    info = store.run(target)
    target = str(info["name"])
    names = [str(store.run(run)["name"]) for run in (train if train else default_training(store, target))]
    notes = []
    if target in names:
        names.remove(target)
        notes.append(f"run {target} is the target and was left out of the training runs")
    for name in names:
        other = store.run(name)
        if (other["layers"], other["heads"]) != (info["layers"], info["heads"]):
            raise ValueError(f"run {name} has {other['layers']} x {other['heads']} heads but the target {target} has "
                             f"{info['layers']} x {info['heads']}: train on runs of the same model")
        if other["model"] != info["model"]:
            raise ValueError(f"run {name} is of model {other['model']}, the target {target} of {info['model']}: "
                             "train on runs of the same model")
    accuracy = [labelled_accuracy(store, name) for name in names]
    unscored = [name for name, value in zip(names, accuracy, strict=True) if value is None]
    if unscored:
        raise ValueError(f"training run {unscored[0]} has no scored sample; train on labelled runs")
    if len(names) < MIN_TRAIN:
        raise ValueError(f"{len(names)} training run(s) of the target's model and grid; estimating accuracy needs at "
                         f"least {MIN_TRAIN} (name them with --train)")
    x = np.stack([run_features(store, name, features) for name in names])
    y = np.asarray(accuracy, dtype=np.float64)
    confidence = np.array([mean_confidence(store, name) for name in names])
    loro = loro_table(names, x, y, confidence)
    shuffled = loro_table(names, x, np.random.default_rng(seed).permutation(y), confidence)
    estimate, l2 = predict.ridge_estimate(x, y, run_features(store, target, features)[None, :])
    result = AccuracyEstimate(
        target=target, features=features,
        estimates={"heads": float(np.clip(estimate[0], 0.0, 1.0)), "baseline": float(y.mean()),
                   "confidence": mean_confidence(store, target)},
        stored_accuracy=None if info.get("accuracy") is None or pd.isna(info["accuracy"]) else float(info["accuracy"]),
        loro=loro, mae=mean_abs_errors(loro), shuffled_mae=mean_abs_errors(shuffled)["heads"], l2=l2, train=names,
        notes=notes)
    if save:
        store.add_accuracy_estimates(result.rows(), features=features, train=names)
    return result
