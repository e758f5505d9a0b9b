"""Ablation cost: each head ablated alone (`vheads ablate --each`), the costs it gives, and the `cost:K` selector
that keeps or ablates the heads costliest to lose."""

from __future__ import annotations

import json

import numpy as np
import pytest
from analysis_helpers import synthetic_run
from typer.testing import CliRunner

from vheads.analysis.ablation import curve_points
from vheads.analysis.costs import cost_table, each_plan, head_costs, with_costs
from vheads.analysis.ranking import head_table
from vheads.analysis.selectors import resolve_heads, select_heads
from vheads.cli import app
from vheads.store import Store

LAYERS, HEADS = 3, 2
runner = CliRunner()


def each_point(store: Store, name: str, curve: str, selector: str, heads: list[str], mode: str,
               correct: list[bool], prob: float = 0.9) -> None:
    """A finished point of an each-head curve, written straight into the store."""
    handle = store.start_run(name, model="model-a", family="llava", dataset="shapes", split="test", layers=LAYERS,
                             heads=HEADS, readout="prompt", ablation=mode, config={}, curve=curve,
                             tags={"from_run": "source", "selector": selector, "k": len(heads), "seed": None,
                                   "heads": heads, "mode": mode})
    rows = [{"sample_id": f"s{i:03d}", "answer": "1", "prediction": "1" if c else "2", "correct": c,
             "first_token_prob": prob} for i, c in enumerate(correct)]
    store.add_batch(handle, rows, np.full((len(rows), LAYERS, HEADS), 0.1))
    store.finish_run(handle, "done", accuracy=float(np.mean(correct)))


def measured_store(path) -> Store:
    """A source run and an image-blind each-head curve: without 1.0 half the answers go, without 0.1 one in four;
    the others cost no answer, but without 1.1 the model is less sure of the right ones."""
    w = np.broadcast_to(np.array([[0.6, 0.5], [0.4, 0.3], [0.2, 0.1]]), (4, LAYERS, HEADS)).copy()
    store = Store(path)
    synthetic_run(store, "source", w, correct=[True] * 4)
    curve = "ablate-source-each-image-blind-x"
    each_point(store, "k0", curve, "none", [], "image-blind", [True] * 4)
    for head, correct, prob in [("0.0", [True] * 4, 0.9), ("0.1", [True, True, True, False], 0.9),
                                ("1.0", [True, True, False, False], 0.9), ("1.1", [True] * 4, 0.5),
                                ("2.0", [True] * 4, 0.9), ("2.1", [True] * 4, 0.9)]:
        each_point(store, f"h{head}", curve, "each", [head], "image-blind", correct, prob)
    return store


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """`measured_store`, shared by the tests that only read it."""
    with measured_store(tmp_path_factory.mktemp("costs") / "s.duckdb") as store:
        yield store


def test_a_head_costs_the_accuracy_lost_without_it_ties_broken_by_confidence(measured):
    costs = head_costs(measured, "source", "image-blind")
    assert [(r.layer, r.head) for r in costs.itertuples()] == [(1, 0), (0, 1), (1, 1), (0, 0), (2, 0), (2, 1)]
    assert list(costs["cost"]) == pytest.approx([0.5, 0.25, 0, 0, 0, 0])
    assert costs["confidence_cost"].iloc[2] == pytest.approx(0.9 - 0.5)  # 1.1: as right, less sure
    assert costs.attrs["accuracy"] == 1.0 and costs.attrs["n"] == 4


def test_the_cost_selector_picks_the_costliest_heads_not_the_highest_scoring(measured):
    ranking = head_table(measured, "source")
    assert select_heads("top:2", ranking, LAYERS, HEADS) == [(0, 0), (0, 1)]
    costed = with_costs(ranking, head_costs(measured, "source", "image-blind"))
    assert select_heads("cost:2", costed, LAYERS, HEADS) == [(1, 0), (0, 1)]
    assert resolve_heads("cost:3", measured, "source", mode="image-blind") == [(1, 0), (0, 1), (1, 1)]
    # `vheads run --ablate cost:K --ablation zero` ranks by the costs there are when none are of its own mode
    assert resolve_heads("cost:1", measured, "source", mode="zero") == [(1, 0)]


def test_the_cost_table_sets_each_head_beside_its_rank_by_score(measured):
    table = cost_table(head_costs(measured, "source"), head_table(measured, "source"))
    assert list(table["head"]) == ["1.0", "0.1", "1.1", "0.0", "2.0", "2.1"]
    assert list(table["score rank"]) == [3, 2, 4, 1, 5, 6]


def test_vheads_heads_lists_each_head_s_cost_beside_its_score(measured):
    result = runner.invoke(app, ["heads", "--run", "source", "--store", str(measured.path), "--format", "json"])
    assert result.exit_code == 0, result.output
    costs = {(row["layer"], row["head"]): row["cost_image_blind"] for row in json.loads(result.stdout)}
    assert costs[(1, 0)] == pytest.approx(0.5) and costs[(0, 1)] == pytest.approx(0.25) and costs[(0, 0)] == 0


def test_each_head_curves_are_costs_not_pruning_curves(measured):
    assert curve_points(measured, from_run="source").empty
    assert len(curve_points(measured, curve="ablate-source-each-image-blind-x")) == 7


@pytest.mark.parametrize(("call", "message"), [
    (lambda s: head_costs(s, "source", "flow-blind"), r"run `vheads ablate --from source --each --mode flow-blind` "
                                                      r"first \(it has image-blind\)"),
    (lambda s: select_heads("cost:2", head_table(s, "source"), LAYERS, HEADS), "run `vheads ablate --from RUN "
                                                                               "--each"),
    (lambda s: each_plan([(0, 0)], "t", "fastv"), "--each ablates one head at a time: use it with --mode zero"),
])
def test_missing_costs_say_which_command_measures_them(measured, call, message):
    with pytest.raises(ValueError, match=message):
        call(measured)


def test_the_report_lists_the_heads_costliest_to_lose(measured, tmp_path):
    from vheads.report.build import build_report

    page = build_report(measured.path, tmp_path / "report", overlays=0).read_text()
    section = page[page.index('id="pruning"'):]
    assert "source: heads costliest to lose (image-blind)" in section
    assert section.index(">1.0</td>") < section.index(">0.1</td>")
    assert "5 of 6 heads cost no answer" not in section and "4 of 6 heads cost no answer" in section
    assert 'id="ablation"' not in page  # an each-head curve is no pruning curve


def test_costs_measured_anew_make_new_points_named_for_their_questions(tmp_path):
    from vheads.analysis.costs import cost_label
    from vheads.analysis.pruning import keep_plan

    with measured_store(tmp_path / "s.duckdb") as measured:

        again = "ablate-source-each-image-blind-y"
        each_point(measured, "y-k0", again, "none", [], "image-blind", [True] * 8)
        each_point(measured, "y-h2.1", again, "each", ["2.1"], "image-blind", [False] * 8)
        newest = head_costs(measured, "source", "image-blind")
        assert newest.attrs["curve"] == again and list(newest["cost"]) == [1.0]
        first = head_costs(measured, "source", "image-blind", curve="ablate-source-each-image-blind-x")
        (label_1, stem_1), (label_2, stem_2) = cost_label(first), cost_label(newest)
        assert (label_1, label_2) == ("cost (shapes test, 4 questions)", "cost (shapes test, 8 questions)")
        assert stem_1 != stem_2
        ranking = head_table(measured, "source")
        points = keep_plan(with_costs(ranking, newest), "t", "image-blind", ["cost"], [1],
                           renamed={"cost": (label_2, stem_2)})
        assert (points[-1].selector, points[-1].kept, points[-1].name) == (label_2, [(2, 1)], f"t-{stem_2}1")


def test_each_plan_has_one_point_per_head_after_the_unablated_one():
    points = each_plan([(0, 0), (2, 3)], "t", "zero")
    assert [(p.selector, p.k, p.heads, p.name) for p in points] == [
        ("none", 0, [], "t-k0"), ("each", 1, [(0, 0)], "t-h0-0"), ("each", 1, [(2, 3)], "t-h2-3")]


@pytest.fixture(scope="module")
def demo_costs(tmp_path_factory):
    """The embedded demo model's image-blind costs on 12 questions, for the 32 heads of its mid stage (33 runs)."""
    from vheads.pipeline import run as pipeline
    from vheads.pipeline.config import RunConfig

    store = str(tmp_path_factory.mktemp("costs") / "s.duckdb")
    pipeline.run(RunConfig(limit=12, batch_size=12, store=store, name="demo"))
    result = runner.invoke(app, ["ablate", "--from", "demo", "--each-of", "stage:mid", "--mode", "image-blind",
                                 "--batch-size", "12", "--store", store, "--format", "json"])
    assert result.exit_code == 0, result.output
    return store, json.loads(result.stdout)


def test_on_the_demo_model_one_head_is_nearly_necessary_and_most_cost_nothing(demo_costs):
    _, rows = demo_costs
    assert len(rows) == 32 and {row["head"].split(".")[0] for row in rows} == {"2", "3"}
    costs = np.array([row["cost"] for row in rows])
    assert (np.diff(costs) <= 1e-12).all()  # costliest first
    assert costs[0] >= 0.4  # blinding one head loses almost half the answers
    assert np.mean(np.abs(costs) < 1e-12) >= 0.6  # most heads are free to blind, one at a time


def test_cost_selectors_keep_or_ablate_the_heads_the_each_head_curve_found_costliest(demo_costs):
    store, rows = demo_costs
    result = runner.invoke(app, ["ablate", "--from", "demo", "--mode", "image-blind", "--keep", "cost", "--k", "4",
                                 "--batch-size", "12", "--store", store, "--format", "json"])
    assert result.exit_code == 0, result.output
    points = {(r["selector"], r["k"]): r for r in json.loads(result.stdout)}
    cost = points[("cost (shapes test, 12 questions)", 4)]  # the selector names the questions costs came from
    assert set(cost["kept"]) == {row["head"] for row in rows[:4]}
    # `vheads run --ablate cost:1` blinds the costliest head again: the same answers as its each-head point
    run = runner.invoke(app, ["run", "--from", "demo", "--ablate", "cost:1", "--ablation", "image-blind", "--limit",
                              "12", "--batch-size", "12", "--store", store, "--name", "costliest"])
    assert run.exit_code == 0, run.output
    with Store(store, read_only=True) as db:
        assert db.run("costliest")["accuracy"] == pytest.approx(rows[0]["accuracy"])
    zero = runner.invoke(app, ["ablate", "--from", "demo", "--mode", "zero", "--select", "cost", "--k", "2",
                               "--store", store])
    assert zero.exit_code == 2 and "--each --mode zero` first (it has image-blind)" in zero.output
    beyond = runner.invoke(app, ["ablate", "--from", "demo", "--mode", "image-blind", "--keep", "cost", "--k", "33",
                                 "--store", store])
    assert beyond.exit_code == 2 and "cost:33: only 32 heads have a measured ablation cost" in beyond.output
