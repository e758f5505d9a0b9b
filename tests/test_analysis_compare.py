"""Comparisons across runs on head maps built by hand: self-correlation, shuffled maps, depth profiles across
sizes, one model across datasets, accuracy against attention, the stored figures and `vheads compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from analysis_helpers import synthetic_run
from typer.testing import CliRunner

from vheads.analysis.compare import (
    HeadMaps,
    accuracy_attention,
    compare_runs,
    map_correlations,
    pairwise,
    save_comparison,
    top_overlap,
)
from vheads.analysis.stats import depth_profile, pearson, spearman
from vheads.cli import app
from vheads.metrics import rank_heads
from vheads.store import Store


def maps(name: str, mean_w: np.ndarray, score: np.ndarray | None = None, accuracy: float | None = None,
         model: str = "m", dataset: str = "d", mean_c: np.ndarray | None = None) -> HeadMaps:
    """Head maps of a run that never ran: the ranking follows from the score and mean W given."""
    score = mean_w if score is None else score
    return HeadMaps(name=name, model=model, dataset=dataset, accuracy=accuracy, mean_w=mean_w, score=score,
                    mean_c=np.full_like(mean_w, 0.5) if mean_c is None else mean_c, ranking=rank_heads(score, mean_w))


def test_a_run_correlates_perfectly_with_itself_and_not_with_a_shuffled_copy():
    rng = np.random.default_rng(0)
    w = rng.random((16, 32))
    shuffled = rng.permutation(w.ravel()).reshape(w.shape)
    same = map_correlations(maps("a", w), maps("b", w.copy()))
    other = map_correlations(maps("a", w), maps("c", shuffled))
    assert {(r["basis"], r["figure"]) for r in same} == {("heads", "mean_w"), ("heads", "score")}
    assert all(r["pearson"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0) for r in same)
    assert all(abs(r["pearson"]) < 0.1 and abs(r["spearman"]) < 0.1 and r["n"] == 512 for r in other)


def test_models_of_different_depth_are_compared_on_relative_depth():
    deep = maps("deep", np.repeat(np.linspace(0, 1, 8)[:, None], 4, axis=1))
    shallow = maps("shallow", np.repeat(np.linspace(0, 1, 4)[:, None], 8, axis=1) ** 2)
    rows = map_correlations(deep, shallow)
    assert {r["basis"] for r in rows} == {"depth"} and rows[0]["n"] == 8
    assert rows[0]["spearman"] == pytest.approx(1.0) and 0.9 < rows[0]["pearson"] < 1.0
    assert np.isnan(top_overlap(deep, shallow))
    assert depth_profile(np.array([0.0, 1.0]), 5) == pytest.approx([0, 0.25, 0.5, 0.75, 1])


def test_correlations_skip_missing_values_and_refuse_constant_input():
    assert pearson([1, 2, np.nan, 4], [2, 4, 5, 8]) == pytest.approx(1.0)
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3])) and np.isnan(spearman([1, 2], [2, 1]))
    with pytest.raises(ValueError, match="cannot correlate"):
        pearson([1, 2, 3], [1, 2])


def test_top_overlap_counts_shared_top_heads():
    w = np.arange(12, dtype=float).reshape(3, 4)
    flipped = w.copy()
    flipped[2, 3], flipped[0, 0] = 0.0, 11.0
    assert top_overlap(maps("a", w), maps("b", w), k=3) == 1.0
    assert top_overlap(maps("a", w), maps("b", flipped), k=3) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("n", "warned"), [(3, True), (5, False)])
def test_accuracy_follows_the_attention_of_the_top_heads(n, warned):
    runs = [maps(f"r{i}", np.full((2, 2), 0.1 * (i + 1)), accuracy=0.5 + 0.05 * i,
                 mean_c=np.full((2, 2), 0.9 - 0.1 * i)) for i in range(n)]
    per_run, table, warnings = accuracy_attention(runs)
    assert list(per_run["top_k_mean_w"]) == pytest.approx([0.1 * (i + 1) for i in range(n)])
    assert dict(zip(table["figure"], table["spearman"], strict=True)) == {"top_k_mean_w": 1.0, "top_k_mean_c": -1.0}
    assert warnings == ([f"n = {n}: too few runs for this correlation to mean much"] if warned else [])


def test_accuracy_against_attention_needs_three_runs_with_an_accuracy():
    runs = [maps("a", np.ones((2, 2)), accuracy=0.5), maps("b", np.ones((2, 2))), maps("c", np.ones((2, 2)))]
    _, table, warnings = accuracy_attention(runs)
    assert table.empty and warnings == ["accuracy against attention needs at least 3 runs with an accuracy; got 1"]


@pytest.fixture
def three_runs(tmp_path):
    """One model on two datasets and a second, deeper model: 4 samples each, head 1.0 the clear visual head."""
    rng = np.random.default_rng(1)
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        for name, model, dataset, layers, correct in (("a-shapes", "model-a", "shapes", 3, [1, 1, 0, 1]),
                                                      ("a-pope", "model-a", "pope", 3, [1, 0, 0, 1]),
                                                      ("b-shapes", "model-b", "shapes", 6, [1, 1, 1, 1])):
            w = rng.uniform(0, 0.2, size=(4, layers, 4))
            w[:, 1, 0] = 0.9
            synthetic_run(store, name, w, correct=correct, model=model, dataset=dataset)
    return path


def test_compare_runs_reports_pairs_consistency_and_accuracy_and_keeps_them(three_runs):
    with Store(three_runs) as store:
        result = compare_runs(store, ["a-shapes", "a-pope", "b-shapes"])
        written = save_comparison(store, result)
        kept = store.query("SELECT * FROM comparisons")
    assert len(result.pairs) == 6 and set(result.pairs["basis"]) == {"heads", "depth"}
    row = result.consistency.iloc[0]
    assert (row["model"], row["runs"], row["datasets"], row["top_k_overlap"]) == ("model-a", 2, "shapes, pope", 1.0)
    assert result.warnings == ["n = 3: too few runs for this correlation to mean much"]
    assert len(kept) == written == 12 + 5 + 2
    pair = kept[kept["kind"] == "pair"].iloc[0]
    assert json.loads(pair["runs"]) == ["a-shapes", "a-pope"] and pair["method"] == "pearson"
    assert set(kept["kind"]) == {"pair", "consistency", "accuracy"}


def test_compare_needs_two_distinct_runs(three_runs):
    with Store(three_runs) as store, pytest.raises(ValueError, match="at least two runs"):
        compare_runs(store, ["a-shapes"])
    assert pairwise([]).empty


runner = CliRunner()


def test_cli_compare_prints_the_tables_and_the_warning(three_runs):
    result = runner.invoke(app, ["compare", "a-shapes", "a-pope", "b-shapes", "--store", str(three_runs), "--k", "2"])
    assert result.exit_code == 0, result.output
    for title in ("head-map correlation", "one model across datasets", "accuracy and the attention",
                  "warning: n = 3: too few runs for this correlation to mean much", "kept 19 figures"):
        assert title in result.output
    unknown = runner.invoke(app, ["compare", "a-shapes", "nope", "--store", str(three_runs)])
    assert unknown.exit_code == 2 and "nope" in unknown.output
