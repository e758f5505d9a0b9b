"""Head selectors on a known ranking, and pruning curves on a tiny LLaVA: tagged runs, resume, the CLI's JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from analysis_helpers import synthetic_run
from typer.testing import CliRunner

from vheads.analysis.ablation import POINT_COLUMNS, curve, curve_points
from vheads.analysis.selectors import random_heads, resolve_heads
from vheads.cli import app
from vheads.models import load
from vheads.pipeline import run as pipeline
from vheads.pipeline.config import RunConfig
from vheads.store import Store

LAYERS, HEADS = 6, 2


@pytest.fixture
def ranked(tmp_path):
    """A run whose ranking is known: mean W of head (l, h) is 0.05 * (2l + h + 1), so 5.1 is best and 0.0 worst."""
    w = np.broadcast_to(0.05 * (np.arange(LAYERS * HEADS) + 1).reshape(LAYERS, HEADS), (3, LAYERS, HEADS)).copy()
    with Store(tmp_path / "s.duckdb") as store:
        synthetic_run(store, "source", w)
        yield store


def test_top_takes_the_best_heads_of_the_ranking(ranked):
    assert resolve_heads("top:3", ranked, "source") == [(5, 1), (5, 0), (4, 1)]


def test_late_takes_the_lowest_scoring_heads_of_the_late_stage(ranked):
    assert resolve_heads("late:3", ranked, "source") == [(4, 0), (4, 1), (5, 0)]


def test_stage_takes_every_head_of_the_stage(ranked):
    assert resolve_heads("stage:mid", ranked, "source") == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert resolve_heads("stage:early", layers=LAYERS, heads=HEADS) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_random_is_fixed_by_its_seed_and_nested_across_k():
    first = resolve_heads("random:4:7", layers=LAYERS, heads=HEADS)
    assert first == resolve_heads("random:4:7", layers=LAYERS, heads=HEADS) == random_heads(4, LAYERS, HEADS, 7)
    assert len(set(first)) == 4 and all(0 <= layer < LAYERS and 0 <= head < HEADS for layer, head in first)
    assert first != resolve_heads("random:4:8", layers=LAYERS, heads=HEADS)
    assert set(first) <= set(resolve_heads("random:8:7", layers=LAYERS, heads=HEADS))
    assert resolve_heads("random:4", layers=LAYERS, heads=HEADS) == random_heads(4, LAYERS, HEADS, 0)


def test_explicit_lists_pass_through():
    assert resolve_heads("1.0, 5.1", layers=LAYERS, heads=HEADS) == [(1, 0), (5, 1)]


@pytest.mark.parametrize(("spec", "message"), [
    ("top:3", "pass --from RUN"),
    ("top:13", "K must be between 0 and 12"),
    ("late:5", "K must be between 0 and 4"),
    ("random:x", "K 'x' is not a whole number"),
    ("random:2:1:0", "expected random:K or random:K:SEED"),
    ("stage:middle", "expected stage:early, stage:mid or stage:late"),
    ("best:3", "unknown selector 'best:3'"),
    ("6.0", "heads 6.0 do not exist"),
    ("", "empty head selector"),
])
def test_bad_selectors_say_what_is_wrong(ranked, spec, message):
    needs_run = spec.startswith(("top:13", "late"))
    with pytest.raises(ValueError, match=message):
        resolve_heads(spec, ranked if needs_run else None, "source" if needs_run else None, LAYERS, HEADS)


def test_a_model_of_another_size_is_refused(ranked):
    with pytest.raises(ValueError, match="run source has 6 x 2 heads but the model has 3 x 4"):
        resolve_heads("top:2", ranked, "source", layers=3, heads=4)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, model_dirs):
    """A source run of 6 shapes questions on the tiny LLaVA, and a curve of top / random / late at K = 0, 1."""
    loaded = load(model_dirs("llava"))
    store = str(tmp_path_factory.mktemp("curve") / "s.duckdb")
    config = RunConfig(limit=6, max_new_tokens=2, batch_size=6)
    pipeline.run(RunConfig(limit=6, max_new_tokens=2, batch_size=6, store=store, name="source"), loaded=loaded)
    points = curve(store, "source", ks=(0, 1), seeds=2, config=config, loaded=loaded)
    return store, config, loaded, points


def test_a_curve_stores_each_point_as_a_tagged_run(swept):
    store, _, _, points = swept
    with Store(store, read_only=True) as db:
        runs = db.runs()
        frame = curve_points(db, from_run="source")
    tagged = runs[runs["curve"].notna()]
    assert len(tagged) == 5 and tagged["curve"].nunique() == 1  # K = 0 once, top, late, random x 2 seeds
    assert (tagged["n_samples"] == 6).all() and (tagged["status"] == "done").all()
    by_name = {name: tags for name, tags in zip(tagged["name"], tagged["tags"], strict=True)}
    base = next(tags for name, tags in by_name.items() if name.endswith("-k0"))
    assert base == {"selector": "none", "k": 0, "seed": None, "from_run": "source", "heads": [], "mode": "zero"}
    seeds = sorted(tags["seed"] for tags in by_name.values() if tags["selector"] == "random")
    assert seeds == [0, 1]
    assert list(frame.columns) == POINT_COLUMNS
    assert [(p["selector"], p["k"], p["seed"]) for p in points] == [
        ("top", 0, None), ("top", 1, None), ("random", 0, None), ("random", 1, None), ("random", 1, 0),
        ("random", 1, 1), ("late", 0, None), ("late", 1, None)]


def test_curve_points_carry_intervals_heads_and_stages(swept):
    store, _, _, points = swept
    with Store(store, read_only=True) as db:
        top_heads = [f"{layer}.{head}" for layer, head in resolve_heads("top:1", db, "source")]
    point = {(p["selector"], p["k"], p["seed"]): p for p in points}
    top = point[("top", 1, None)]
    assert top["heads"] == top_heads and sum(top["stages"].values()) == 1 and top["n"] == 6
    assert top["low"] <= top["accuracy"] <= top["high"]
    late = point[("late", 1, None)]
    assert late["stages"] == {"early": 0, "mid": 0, "late": 1}
    mean = point[("random", 1, None)]
    seeds = [point[("random", 1, s)]["accuracy"] for s in (0, 1)]
    assert mean["accuracy"] == pytest.approx(np.mean(seeds)) and mean["seeds"] == 2 and mean["heads"] is None
    assert point[("top", 0, None)]["run"] == point[("late", 0, None)]["run"]


def test_running_the_curve_again_reuses_finished_points(swept, monkeypatch):
    store, config, loaded, points = swept

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished point was run again")

    monkeypatch.setattr(pipeline, "run", must_not_run)
    again = curve(store, "source", ks=(0, 1), seeds=2, config=config, loaded=loaded)
    assert json.dumps(again, sort_keys=True) == json.dumps(points, sort_keys=True)
    fewer = curve(store, "source", selectors=("random",), ks=(1,), seeds=1, config=config, loaded=loaded)
    assert [(p["k"], p["seed"], p["seeds"]) for p in fewer] == [(1, None, 1), (1, 0, 1)]


def test_an_interrupted_point_is_resumed_and_only_it(swept, monkeypatch):
    store, config, loaded, points = swept
    late = next(p["run"] for p in points if p["selector"] == "late" and p["k"] == 1)
    with Store(store) as db:
        db.query("DELETE FROM head_stats WHERE run_id = ? AND sample_id IN (SELECT sample_id FROM samples "
                 "WHERE run_id = ? ORDER BY sample_id LIMIT 2)", [db.run(late)["run_id"]] * 2)
        db.query("DELETE FROM samples WHERE run_id = ? AND sample_id NOT IN (SELECT DISTINCT sample_id FROM "
                 "head_stats WHERE run_id = ?)", [db.run(late)["run_id"]] * 2)
        db.mark(late, "interrupted")
    ran = []
    real_run = pipeline.run

    def recording_run(config, **kwargs):
        ran.append(config.name)
        return real_run(config, **kwargs)

    monkeypatch.setattr(pipeline, "run", recording_run)
    curve(store, "source", ks=(0, 1), seeds=2, config=config, loaded=loaded)
    with Store(store, read_only=True) as db:
        assert db.run(late)["status"] == "done" and db.run(late)["n_samples"] == 6
    assert ran == [late]


runner = CliRunner()


def test_cli_ablate_prints_the_documented_json(swept):
    store, _, _, points = swept
    result = runner.invoke(app, ["ablate", "--from", "source", "--select", "top,random", "--k", "0,1", "--seeds", "2",
                                 "--limit", "6", "--max-new-tokens", "2", "--batch-size", "6", "--store", store,
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert all(list(row) == ["selector", "k", "seed", "accuracy", "low", "high", "heads", "mode", "kept",
                             "image_kv_share", "fastv_layer", "fastv_keep"] for row in rows)
    assert {row["mode"] for row in rows} == {"zero"} and all(row["image_kv_share"] is None for row in rows)
    assert [(r["selector"], r["k"], r["seed"]) for r in rows] == [
        ("top", 0, None), ("top", 1, None), ("random", 0, None), ("random", 1, None), ("random", 1, 0),
        ("random", 1, 1)]
    assert rows[1]["heads"] == next(p["heads"] for p in points if (p["selector"], p["k"]) == ("top", 1))


def test_cli_ablate_table_and_clear_errors(swept):
    store, _, _, _ = swept
    args = ["ablate", "--from", "source", "--select", "top", "--k", "0,1", "--limit", "6", "--max-new-tokens", "2",
            "--batch-size", "6", "--store", store]
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "pruning curve" in table.stdout and "top" in table.stdout
    bad = runner.invoke(app, [*args[:4], "best", *args[5:]])
    assert bad.exit_code == 2 and "unknown selector 'best' for a curve" in bad.output
    missing = runner.invoke(app, ["ablate", "--from", "nope", "--store", store])
    assert missing.exit_code == 2 and "nope" in missing.output


def test_cli_run_ablates_the_heads_a_selector_names(swept):
    store, _, loaded, _ = swept
    result = runner.invoke(app, ["run", "--model", loaded.name, "--limit", "2", "--max-new-tokens", "1",
                                 "--ablate", "top:2", "--from", "source", "--store", store, "--name", "top2"])
    assert result.exit_code == 0, result.output
    with Store(store, read_only=True) as db:
        expected = resolve_heads("top:2", db, "source")
        info = db.run("top2")
    assert info["ablation"] == "zero:" + ",".join(f"{layer}.{head}" for layer, head in expected)
    assert info["tags"] == {"ablate": "top:2", "from_run": "source"}
    no_from = runner.invoke(app, ["run", "--ablate", "late:2", "--store", store])
    assert no_from.exit_code == 2 and "pass --from RUN" in no_from.output


def test_curve_points_of_a_store_without_curves_is_empty(tmp_path):
    import numpy as np

    from vheads.analysis.ablation import curve_points
    from vheads.store import Store

    with Store(tmp_path / "s.duckdb") as store:
        run = store.start_run("plain", model="m", family="llava", dataset="d", split="", layers=1, heads=2,
                              readout="prompt", ablation="none", config={})
        store.add_batch(run, [{"sample_id": "x", "meta": {"box": [1, 2, 3, 4]}}],
                        *[np.zeros((1, 1, 2), np.float32)] * 5)
        store.finish_run(run)
        assert curve_points(store).empty
        assert store.samples("plain")["meta"].iloc[0] == {"box": [1, 2, 3, 4]}
