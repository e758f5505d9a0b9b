"""Prediction from head figures: the statistics against the obvious computation, no leakage between folds, chance on
shuffled labels, and `vheads predict errors / accuracy` on synthetic stored runs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from predict_helpers import HEADS, LAYERS, add_run
from scipy import optimize
from typer.testing import CliRunner

from vheads.analysis import predict
from vheads.analysis.accuracy import loro_table, mean_abs_errors
from vheads.analysis.errors import Labelled, predict_errors
from vheads.cli import app
from vheads.store import Store, merge


def synthetic(n: int, p: int = 12, seed: int = 0, strength: float = 1.5, twins: bool = False) -> Labelled:
    """A labelled set drawn directly: `p` figures of one head each, the error log-odds linear in the first."""
    rng = np.random.default_rng(seed)
    figures = rng.normal(size=(n, p, 4))
    figures[:, :, 0] = rng.uniform(0, 1, size=(n, p))
    wrong = (rng.random(n) < 1 / (1 + np.exp(-strength * 4 * (figures[:, 0, 0] - 0.5)))).astype(float)
    groups = np.array([f"g{i // 2 if twins else i}" for i in range(n)])
    if twins:
        figures[1::2], wrong[1::2] = figures[0::2], wrong[0::2]
    confidence = np.column_stack([1 - wrong * 0.3 + rng.normal(0, 0.3, n), rng.normal(size=n)])
    return Labelled(["r"], np.zeros(n, dtype=np.int64), np.array([f"s{i}" for i in range(n)]), figures, wrong,
                    confidence, groups, 1, p)


# --- the statistics, each against the obvious computation ------------------------------------------------------

def test_auroc_is_the_mann_whitney_share_of_pairs_ties_half():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 80), rng.integers(0, 6, 80).astype(float)
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in s[y == 1] for b in s[y == 0]]
    assert predict.auroc(y, s) == pytest.approx(np.mean(pairs))
    assert np.isnan(predict.auroc(np.ones(5), np.arange(5.0)))
    fpr, tpr = predict.roc_curve(y, s)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(predict.auroc(y, s))


def test_the_cluster_bootstrap_draws_whole_groups_and_brackets_the_auroc():
    data = synthetic(400, seed=1)
    score = data.figures[:, 0, 0] * -1
    low, high, reps = predict.bootstrap_auroc(data.wrong, score, data.groups, n_boot=300, seed=0)
    assert low[0] < predict.auroc(data.wrong, score) < high[0] and reps.shape == (300, 1)
    # Duplicating every sample into its own group must not change the AUROC, only narrow an i.i.d. interval;
    # kept as one group per pair, the interval stays as wide.
    twice = np.repeat(score, 2), np.repeat(data.wrong, 2)
    paired = predict.bootstrap_auroc(twice[1], twice[0], np.repeat(data.groups, 2), n_boot=300, seed=0)
    apart = predict.bootstrap_auroc(twice[1], twice[0], np.arange(800), n_boot=300, seed=0)
    assert paired[1][0] - paired[0][0] > 1.25 * (apart[1][0] - apart[0][0])


def test_logistic_fit_matches_a_generic_minimiser_of_the_same_objective():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)), rng.integers(0, 2, 200).astype(float)
    w = predict.fit_logistic(x, y, l2=3.0)

    def objective(v):
        z = x @ v[:-1] + v[-1]
        return np.sum(np.log1p(np.exp(z)) - y * z) + 1.5 * v[:-1] @ v[:-1]

    reference = optimize.minimize(objective, np.zeros(6), method="Nelder-Mead",
                                  options={"maxiter": 40000, "xatol": 1e-9, "fatol": 1e-12}).x
    np.testing.assert_allclose(w, reference, atol=1e-3)


def test_ridge_fit_solves_the_normal_equations_with_a_free_intercept():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=30)
    w = predict.fit_ridge(x, y, 2.0)
    design = np.hstack([x, np.ones((30, 1))])
    penalty = np.diag([2.0] * 4 + [0.0])
    np.testing.assert_allclose(w, np.linalg.solve(design.T @ design + penalty, design.T @ y), atol=1e-10)
    assert predict.fit_ridge(x, y, float("inf"))[:-1].tolist() == [0.0] * 4


def test_standardize_learns_from_the_training_rows_and_fills_nan_with_their_mean():
    train = np.array([[1.0, 5.0, np.nan], [3.0, 5.0, np.nan], [np.nan, 5.0, np.nan]])
    test = np.array([[np.nan, 7.0, 1.0], [2.0, 1.0, 4.0]])
    t, v = predict.standardize(train, test)
    assert t[2, 0] == 0 and v[0, 0] == 0 and v[1, 0] == 0        # NaN -> the training mean, 2
    assert (t[:, 1:] == 0).all() and (v[:, 1:] == 0).all()       # no spread / no value in training: dropped
    assert predict.standardize(train, test[:1])[1][0].tolist() == v[0].tolist()   # other test rows do not matter


def test_folds_keep_each_image_together_and_balance_the_classes():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 150, 600)
    labels = rng.random(600) < 0.3
    folds = predict.grouped_folds(groups, 5, seed=3, labels=labels)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    rates = [labels[folds == f].mean() for f in range(5)]
    sizes = np.bincount(folds)
    assert max(rates) - min(rates) < 0.05 and sizes.max() - sizes.min() < 0.15 * sizes.mean()
    with pytest.raises(ValueError, match="3 image group"):
        predict.grouped_folds(["a", "b", "c"], 5)


# --- no leakage -----------------------------------------------------------------------------------------------

def test_a_samples_prediction_never_depends_on_its_own_fold():
    data = synthetic(300, seed=2)
    folds = predict.grouped_folds(data.groups, 5, 0, labels=data.wrong)
    x = data.figures.reshape(300, -1)

    def features(table):
        return lambda train, test: (table[train], table[test])

    before = predict.cross_validate(features(x), data.wrong, folds, data.groups).p
    same_fold = folds == folds[0]
    changed_x, changed_y = x.copy(), data.wrong.copy()
    changed_x[same_fold & (np.arange(300) != 0)] = np.random.default_rng(9).normal(size=(same_fold.sum() - 1,
                                                                                          x.shape[1]))
    changed_y[same_fold] = 1 - changed_y[same_fold]
    after = predict.cross_validate(features(changed_x), changed_y, folds, data.groups).p
    assert after[0] == before[0]
    assert not np.allclose(after[~same_fold], before[~same_fold])


def test_grouping_by_image_stops_a_model_from_reading_a_twin_in_training():
    grouped, leaky = [], []
    for seed in range(3):
        data = synthetic(400, p=60, seed=seed, strength=0.0, twins=True)   # noise labels; every image asked twice
        grouped.append(predict_errors(data, "all", n_boot=20, shuffle_check=False).auroc["heads"][0])
        apart = Labelled(**{**data.__dict__, "groups": data.sample_ids})
        leaky.append(predict_errors(apart, "all", n_boot=20, shuffle_check=False).auroc["heads"][0])
    assert abs(np.mean(grouped) - 0.5) < 0.06, grouped
    assert min(leaky) > 0.75, leaky     # the leak grouping prevents: the twin's label, learnt in training


# --- validity -------------------------------------------------------------------------------------------------

def test_heads_predict_errors_and_shuffled_labels_give_chance():
    data = synthetic(1000, seed=4)
    result = predict_errors(data, "all", n_boot=200)
    value, low, high = result.auroc["heads"]
    assert value > 0.75 and low < value < high
    assert abs(result.shuffled[0] - 0.5) < 0.05 and result.shuffled[1] < 0.5 < result.shuffled[2]
    shuffled = []
    for seed in range(5):
        permuted = np.random.default_rng(100 + seed).permutation(data.wrong)
        fit = predict_errors(Labelled(**{**data.__dict__, "wrong": permuted}), "all", n_boot=20, seed=seed,
                             shuffle_check=False)
        shuffled.append([fit.auroc[name][0] for name in ("heads", "confidence", "both")])
    shuffled = np.array(shuffled)
    assert np.all(np.abs(shuffled.mean(axis=0) - 0.5) < 0.05), shuffled
    assert np.all(np.abs(shuffled - 0.5) < 0.08), shuffled


def test_shuffled_accuracies_give_the_baselines_error_and_real_ones_beat_it():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 20))
    accuracy = np.clip(0.6 + 0.1 * x[:, 0] + rng.normal(0, 0.01, 30), 0, 1)
    confidence = np.full(30, np.nan)
    names = [f"r{i}" for i in range(30)]
    real = mean_abs_errors(loro_table(names, x, accuracy, confidence))
    assert real["heads"] < 0.3 * real["baseline"]
    ratios = []
    for seed in range(5):
        shuffled = mean_abs_errors(loro_table(names, x, np.random.default_rng(seed).permutation(accuracy),
                                              confidence))
        assert shuffled["baseline"] == pytest.approx(real["baseline"])
        ratios.append(shuffled["heads"] / shuffled["baseline"])
    assert abs(np.mean(ratios) - 1) < 0.1, ratios


def test_nan_figures_are_filled_from_the_training_folds_only():
    data = synthetic(300, seed=5)
    data.figures[np.random.default_rng(0).random(data.figures.shape) < 0.3] = np.nan
    data.figures[:, 3, :] = np.nan          # a head never measured
    result = predict_errors(data, "all", n_boot=20, shuffle_check=False)
    assert all(np.isfinite(p).all() for p in result.p_error.values())
    assert result.auroc["heads"][0] > 0.6


# --- the store and the command line -----------------------------------------------------------------------------

@pytest.fixture()
def labelled_store(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path) as db:
        add_run(db, "a", 400, seed=1, image_of=lambda i: f"img{i // 2}.png")
        add_run(db, "b", 300, seed=2)
        add_run(db, "tiny", 30, seed=3)
        add_run(db, "old", 200, seed=4, confident=False)
    return path


def cli(*args):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_predict_errors_stores_each_samples_error_probability(labelled_store, tmp_path):
    result = cli("predict", "errors", "--runs", "a,b", "--store", str(labelled_store), "--boot", "100",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    table = pd.DataFrame(out["auroc"])
    assert set(table["runs"]) == {"a", "b"}
    heads = table[table["predictor"] == "heads"]
    assert (heads["auroc"] > 0.7).all() and (heads["low"] < heads["auroc"]).all()
    assert len(out["differences"]) == 2
    with Store(labelled_store, read_only=True) as db:
        stored = db.query("SELECT r.name, p.predictor, count(*) AS n, min(p_error) AS lo, max(p_error) AS hi, "
                          "count(DISTINCT fold) AS folds FROM predictions p JOIN runs r USING (run_id) "
                          "GROUP BY ALL ORDER BY ALL")
        pairs = db.query("SELECT count(DISTINCT p.fold) AS folds FROM predictions p JOIN samples s USING "
                         "(run_id, sample_id) WHERE p.run_id = 1 GROUP BY json_extract_string(s.meta, '$.image')")
    assert stored["n"].tolist() == [400] * 3 + [300] * 3 and (stored["folds"] == 5).all()
    assert (stored["lo"] >= 0).all() and (stored["hi"] <= 1).all()
    assert (pairs["folds"] == 1).all() and len(pairs) == 200      # the two questions on one image share a fold
    # again: replaced, not added to; merged and exported with every other table
    assert cli("predict", "errors", "--runs", "a", "--store", str(labelled_store), "--boot", "20",
               "--no-shuffle-check").exit_code == 0
    merged = tmp_path / "merged.duckdb"
    merge([labelled_store], merged)
    with Store(merged, read_only=True) as db:
        assert len(db.predictions()) == 2100 and set(db.predictions()["run"]) == {"a", "b"}
    assert cli("export", "--store", str(labelled_store), "--out", str(tmp_path / "pq")).exit_code == 0
    assert len(pd.read_parquet(tmp_path / "pq" / "predictions.parquet")) == 2100


def test_predict_errors_refuses_runs_without_twenty_of_each_class_in_one_line(labelled_store):
    result = CliRunner().invoke(app, ["predict", "errors", "--runs", "a,tiny", "--store", str(labelled_store)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "run tiny has" in lines[0] and "at least 20 of each" in lines[0]
    with Store(labelled_store, read_only=True) as db:
        assert db.predictions().empty       # checked before anything was fitted or stored


def test_runs_without_stored_confidence_get_heads_only(labelled_store):
    result = cli("predict", "errors", "--runs", "old", "--store", str(labelled_store), "--boot", "20")
    assert result.exit_code == 0 and "heads only" in result.output
    assert "│ heads " in result.output and "│ confidence" not in result.output and "│ both" not in result.output


def test_predict_accuracy_fits_other_runs_of_the_grid_and_reports_leave_one_run_out(tmp_path):
    path = tmp_path / "acc.duckdb"
    with Store(path) as db:
        for i, shift in enumerate(np.linspace(-0.3, 0.3, 14)):
            add_run(db, f"r{i}", 60, seed=10 + i, shift=float(shift))
        db.start_run("other-grid", model="synthetic", family="llava", dataset="shapes", split="test", layers=2,
                     heads=2, readout="prompt", ablation="none", config={})
    result = cli("predict", "accuracy", "--target", "r3", "--store", str(path), "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert "r3" not in out["train"] and len(out["train"]) == 13
    mae = {row["estimator"]: row["loro_mae"] for row in out["estimates"]}
    assert mae["heads"] < 0.75 * mae["baseline"]
    with Store(path, read_only=True) as db:
        kept = db.accuracy_estimates()
    assert set(kept["role"]) == {"target", "left-out"} and len(kept) == 3 + 13 * 3
    refused = CliRunner().invoke(app, ["predict", "accuracy", "--target", "r3", "--train", "r1,other-grid,r2",
                                       "--store", str(path)])
    assert refused.exit_code == 2 and "other-grid has 2 x 2 heads" in refused.output
    few = CliRunner().invoke(app, ["predict", "accuracy", "--target", "r3", "--train", "r1,r2", "--store", str(path)])
    assert few.exit_code == 2 and "needs at least 3" in few.output


def test_target_features_never_read_its_answers(tmp_path):
    from vheads.analysis.accuracy import estimate_accuracy

    path = tmp_path / "acc.duckdb"
    with Store(path) as db:
        for i in range(5):
            add_run(db, f"r{i}", 60, seed=20 + i, shift=0.1 * i)
        first = estimate_accuracy(db, "r4", save=False).estimates
        db.query("UPDATE samples SET correct = NOT correct, answer = 'x', prediction = 'y' WHERE run_id = 5")
        db.query("UPDATE runs SET accuracy = 0 WHERE run_id = 5")
        assert estimate_accuracy(db, "r4", save=False).estimates == first


def test_pooled_runs_keep_one_image_asked_in_both_in_one_fold(tmp_path):
    from vheads.analysis.errors import pool, read_labelled

    with Store(tmp_path / "p.duckdb") as db:
        add_run(db, "x", 100, seed=1)
        add_run(db, "y", 100, seed=2)
        data = pool([read_labelled(db, "x"), read_labelled(db, "y")])
    assert data.runs == ["x", "y"] and len(data.wrong) == 200 and data.figures.shape == (200, LAYERS * HEADS, 4)
    folds = predict.grouped_folds(data.groups, 5, 0, labels=data.wrong)
    assert (folds[:100] == folds[100:]).all()      # the same sample ids: the same images


def test_the_speed_benchmark_prints_its_table(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "predict.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, str(script), "--n", "400", "--boot", "20"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 BLAS thread(s)" in out.stdout and "| visual | " in out.stdout and "| all | 384 |" in out.stdout
