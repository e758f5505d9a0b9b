"""Pruning curves: keep-only points (only K heads keep the image), FastV points, the image KV each keeps, the
frontier in the report, and the layer,head,score CSV."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import synthetic_run
from report_helpers import HOSTILE
from typer.testing import CliRunner

from vheads.analysis.ablation import curve_points
from vheads.analysis.pruning import fastv_plan, keep_plan
from vheads.analysis.ranking import head_table
from vheads.cli import app
from vheads.pipeline.pruning import fastv_kv_share, image_kv_record
from vheads.report.build import build_report
from vheads.store import Store

LAYERS, HEADS = 6, 2
runner = CliRunner()


@pytest.fixture
def ranked(tmp_path):
    """A run whose ranking is known: mean W of head (l, h) is 0.05 * (2l + h + 1), so 5.1 is best and 0.0 worst."""
    w = np.broadcast_to(0.05 * (np.arange(LAYERS * HEADS) + 1).reshape(LAYERS, HEADS), (3, LAYERS, HEADS)).copy()
    with Store(tmp_path / "s.duckdb") as store:
        synthetic_run(store, "source", w, correct=[True, True, False])
        yield store


def test_keep_only_blinds_the_complement_of_the_kept_heads(ranked):
    points = {p.name: p for p in keep_plan(head_table(ranked, "source"), "t", "image-blind", ["top", "random"],
                                           ks=[3], seeds=2)}
    top = points["t-top3"]
    assert top.kept == [(4, 1), (5, 0), (5, 1)] and top.k == 3 and top.mode == "image-blind"
    assert len(top.heads) == LAYERS * HEADS - 3 and not set(top.heads) & set(top.kept)
    assert sorted(top.heads + top.kept) == [(layer, head) for layer in range(LAYERS) for head in range(HEADS)]
    assert points["t-random3-s0"].kept != points["t-random3-s1"].kept
    assert top.tags("source")["kept"] == ["4.1", "5.0", "5.1"]


def test_keep_only_always_has_every_head_blind_and_the_plain_run(ranked):
    points = keep_plan(head_table(ranked, "source"), "t", "flow-blind", ["top"], ks=[2])
    ends = {p.k: p for p in points if p.selector == "none"}
    assert set(ends) == {0, LAYERS * HEADS}
    assert ends[0].kept == [] and len(ends[0].heads) == LAYERS * HEADS
    assert ends[LAYERS * HEADS].heads == [] and len(ends[LAYERS * HEADS].kept) == LAYERS * HEADS
    assert [p.name for p in points] == ["t-k0", "t-k12", "t-top2"]


def test_keep_only_fixed_sets_keep_a_stage_or_a_list(ranked):
    points = keep_plan(head_table(ranked, "source"), "t", "image-blind", [], ks=[], sets=["stage:late", "1.0, 0.1"])
    late, listed = points[2:]
    assert late.selector == "stage:late" and late.kept == [(4, 0), (4, 1), (5, 0), (5, 1)] and late.k == 4
    assert listed.selector == "0.1,1.0" and listed.kept == [(0, 1), (1, 0)] and listed.name.startswith("t-set-")


@pytest.mark.parametrize(("call", "message"), [
    (lambda r: keep_plan(r, "t", "zero", ["top"], [2]), "use it with --mode image-blind or flow-blind, not zero"),
    (lambda r: keep_plan(r, "t", "image-blind", ["best"], [2]), "unknown selector 'best' for --keep"),
    (lambda r: keep_plan(r, "t", "image-blind", ["top"], [13]), "--k 13: a keep-only K is between 0 and the 12"),
    (lambda r: keep_plan(r, "t", "image-blind", [], [], sets=["top:3"]), "a fixed head set is stage:NAME"),
    (lambda r: fastv_plan("t", [(2, 1.5)]), r"--fastv-keep 1.5: the share of image tokens kept must be in \(0, 1\]"),
    (lambda r: fastv_plan("t", [(0, 0.5)]), "--fastv-layer 0: must be at least 1"),
])
def test_bad_pruning_plans_say_what_is_wrong(ranked, call, message):
    with pytest.raises(ValueError, match=message):
        call(head_table(ranked, "source"))


def test_fastv_keeps_every_image_token_before_its_layer_and_r_after():
    assert fastv_kv_share(2, 0.25, range(6)) == pytest.approx((2 + 4 * 0.25) / 6)
    assert fastv_kv_share(3, 1.0, range(32)) == 1.0
    # a hybrid decoder: only its softmax-attention layers hold keys and values
    assert fastv_kv_share(4, 0.5, [3, 7, 11]) == pytest.approx((1 + 2 * 0.5) / 3)
    assert [p.name for p in fastv_plan("t", [(2, 0.25), (2, 0.5)])] == ["t-l2-r0.25", "t-l2-r0.5"]


def test_image_kv_record_says_which_key_value_heads_keep_the_image():
    # 4 query heads on 2 key/value heads: heads 0, 1 share key/value head 0
    record = image_kv_record("image-blind", [(0, 0), (0, 1), (0, 2), (1, 0)], heads=4, kv_heads=2,
                             attention_layers=[0, 1])
    assert record == {"image_kv_heads": {"0": [1], "1": [0, 1]}, "image_kv_share": 0.75}
    assert image_kv_record("zero", [(0, 0)], 4, 2, [0, 1]) == {}
    assert image_kv_record("image-blind", [], 4, 4, [0])["image_kv_share"] == 1.0
    assert image_kv_record("zero", [], 4, 4, [0, 1], fastv=(1, 0.5)) == {"image_kv_share": 0.75}


def pruning_point(store: Store, name: str, curve: str, tags: dict, correct: list[bool]) -> None:
    """A finished curve point written straight into the store, with the tags a pruning run records."""
    handle = store.start_run(name, model="model-a", family="llava", dataset="shapes", split="test", layers=LAYERS,
                             heads=HEADS, readout="prompt", ablation="none", config={}, curve=curve,
                             tags={"from_run": "source", "seed": None, "heads": [], **tags})
    rows = [{"sample_id": f"s{i:03d}", "answer": "1", "prediction": "1", "correct": c} for i, c in enumerate(correct)]
    store.add_batch(handle, rows, np.full((len(rows), LAYERS, HEADS), 0.1))
    store.finish_run(handle, "done", accuracy=float(np.mean(correct)))


@pytest.fixture
def frontier(ranked):
    """The source run with a keep-only curve (top and two random seeds) and a FastV curve, stored by hand."""
    keep, fastv = "ablate-source-keep-image-blind-x", "ablate-source-fastv-x"
    for name, selector, k, seed, share, correct in [
            ("k0", "none", 0, None, 0.0, [False] * 4), ("k12", "none", 12, None, 1.0, [True] * 4),
            ("top2", "top", 2, None, 2 / 12, [True, True, True, False]),
            ("r2s0", "random", 2, 0, 2 / 12, [False, False, True, False]),
            ("r2s1", "random", 2, 1, 2 / 12, [False, True, True, False])]:
        pruning_point(ranked, name, keep, {"selector": selector, "k": k, "seed": seed, "mode": "image-blind",
                                           "kept": [], "image_kv_share": share}, correct)
    pruning_point(ranked, "fv", fastv, {"selector": "fastv", "k": 2, "mode": "fastv", "fastv_layer": 2,
                                        "fastv_keep": 0.25, "image_kv_share": 0.5}, [True, True, False, True])
    return ranked


def test_curve_points_carry_the_mode_and_the_image_kv_kept(frontier):
    points = curve_points(frontier, from_run="source")
    rows = {(r.selector, r.k, r.seed): r for r in points.itertuples()}
    assert rows[("top", 2, None)].image_kv_share == pytest.approx(2 / 12)
    assert rows[("top", 0, None)].accuracy == 0.0 and rows[("top", 12, None)].accuracy == 1.0
    mean = rows[("random", 2, None)]
    assert mean.accuracy == pytest.approx(0.375) and mean.seeds == 2 and mean.image_kv_share == pytest.approx(2 / 12)
    fastv = rows[("fastv", 2, None)]
    assert fastv.mode == "fastv" and fastv.fastv_keep == 0.25 and fastv.image_kv_share == 0.5


def test_keep_summary_says_where_a_selector_reaches_full_accuracy_and_its_lead_over_random(frontier):
    from vheads.analysis.pruning import keep_summary

    summary = keep_summary(curve_points(frontier, from_run="source")).set_index("selector")
    assert list(summary.index) == ["top", "random"]  # FastV has no heads to count
    top = summary.loc["top"]
    assert top["full"] == 1.0 and top["k_90"] == 12 and top["share_90"] == 1.0
    assert top["k_full"] == 2 and top["share_full"] == pytest.approx(2 / 12)  # [1, 1, 1, 0]: its interval reaches 1
    assert top["gap_random"] == pytest.approx(0.75 - 0.375) and np.isnan(summary.loc["random", "gap_random"])


def test_report_draws_the_efficiency_frontier(frontier, tmp_path):
    pruning_point(frontier, "flow", "ablate-source-keep-flow-blind-x", {
        "selector": HOSTILE, "k": 2, "mode": "flow-blind", "kept": ["5.1"], "image_kv_share": 2 / 12}, [True] * 4)
    index = build_report(frontier.path, tmp_path / "report", overlays=0)
    page = index.read_text()
    assert 'id="pruning"' in page and "the efficiency frontier" in page
    assert (tmp_path / "report" / "pruning-frontier-00-source.png").exists()
    assert "FastV K=2 R=0.25" in page and "flow-blind" in page
    assert HOSTILE not in page and "&lt;script&gt;" in page
    assert 'id="ablation"' not in page  # keep-only and FastV points belong to the frontier only
    assert "image KV" in page[page.index('id="pruning"'):] and "How few heads need the image" in page


def test_export_scores_writes_layer_head_score(ranked, tmp_path):
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["export", "--scores", "source", "--out", str(out), "--store", str(ranked.path)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["layer", "head", "score"] and len(frame) == LAYERS * HEADS
    assert list(zip(frame["layer"], frame["head"], strict=True))[:3] == [(0, 0), (0, 1), (1, 0)]
    expected = head_table(ranked, "source").set_index(["layer", "head"])["score"]
    assert np.allclose(frame.set_index(["layer", "head"])["score"], expected.loc[frame.set_index(["layer", "head"])
                                                                                 .index])
    by_w = runner.invoke(app, ["export", "--scores", "source", "--by", "mean_w", "--out", str(out), "--force",
                               "--store", str(ranked.path)])
    assert by_w.exit_code == 0 and pd.read_csv(out)["score"].iloc[-1] == pytest.approx(0.6)
    again = runner.invoke(app, ["export", "--scores", "source", "--out", str(out), "--store", str(ranked.path)])
    assert again.exit_code == 2 and "--force" in again.output and len(again.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "half-blind"], "unknown --mode 'half-blind'"),
    (["--mode", "fastv", "--fastv-layer", "2", "--fastv-keep", "1.5"], "--fastv-keep 1.5: the share of image"),
    (["--mode", "fastv", "--fastv-layer", "2", "--fastv-keep", "0"], "--fastv-keep 0: the share of image"),
    (["--mode", "fastv"], "--mode fastv needs --fastv-layer K and --fastv-keep R"),
    (["--mode", "fastv", "--fastv-layer", "2"], "--fastv-layer and --fastv-keep go together"),
    (["--keep", "top"], "--keep makes every other head image-blind: use it with --mode image-blind or flow-blind"),
    (["--mode", "zero", "--fastv-layer", "2", "--fastv-keep", "0.5"], "go with --mode fastv, not zero"),
])
def test_cli_ablate_refuses_bad_pruning_options_in_one_line(ranked, args, message):
    result = runner.invoke(app, ["ablate", "--from", "source", "--store", str(ranked.path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def kept(tmp_path_factory, model_dirs):
    """A source run of 6 shapes questions on the tiny LLaVA (3 layers x 4 heads on 2 key/value heads), and a
    keep-only image-blind curve of top and random at K = 2."""
    from vheads.analysis.ablation import curve
    from vheads.models import load
    from vheads.pipeline import run as pipeline
    from vheads.pipeline.config import RunConfig

    loaded = load(model_dirs("llava"))
    store = str(tmp_path_factory.mktemp("keep") / "s.duckdb")
    config = RunConfig(limit=6, max_new_tokens=2, batch_size=6)
    pipeline.run(RunConfig(limit=6, max_new_tokens=2, batch_size=6, store=store, name="source"), loaded=loaded)
    points = curve(store, "source", selectors=("top", "random"), ks=(2,), seeds=1, ablation="image-blind",
                   keep=True, config=config, loaded=loaded)
    return store, config, loaded, points


def test_a_keep_only_run_records_which_key_value_heads_keep_the_image(kept):
    from vheads.heads import image_kv_heads

    store, _, _, points = kept
    top = next(p for p in points if (p["selector"], p["k"]) == ("top", 2))
    with Store(store, read_only=True) as db:
        info = db.run(top["run"])
        blind = db.run(next(p["run"] for p in points if p["k"] == 0))["tags"]
        plain = db.run(next(p["run"] for p in points if p["k"] == 12))["tags"]
    kept_heads = [tuple(map(int, h.split("."))) for h in top["kept"]]
    ablated = [(layer, head) for layer in range(3) for head in range(4) if (layer, head) not in kept_heads]
    expected = {str(layer): kv for layer, kv in image_kv_heads(ablated, 4, 2, range(3)).items()}
    assert info["tags"]["image_kv_heads"] == expected and info["ablation"].startswith("image-blind:")
    assert top["image_kv_share"] == pytest.approx(sum(map(len, expected.values())) / 6)
    assert blind["image_kv_heads"] == {"0": [], "1": [], "2": []} and blind["image_kv_share"] == 0.0
    assert plain["image_kv_share"] == 1.0 and plain["heads"] == []
    listing = runner.invoke(app, ["runs", "--store", store, "--format", "csv"])
    assert listing.exit_code == 0 and "image_kv_share" in listing.stdout.splitlines()[0]


def test_an_interrupted_keep_only_point_is_resumed_and_only_it(kept, monkeypatch):
    from vheads.analysis.ablation import curve
    from vheads.pipeline import run as pipeline

    store, config, loaded, points = kept
    top = next(p["run"] for p in points if (p["selector"], p["k"]) == ("top", 2))
    with Store(store) as db:
        run_id = db.run(top)["run_id"]
        db.query("DELETE FROM head_stats WHERE run_id = ? AND sample_id IN (SELECT sample_id FROM samples "
                 "WHERE run_id = ? ORDER BY sample_id LIMIT 2)", [run_id] * 2)
        db.query("DELETE FROM samples WHERE run_id = ? AND sample_id NOT IN (SELECT DISTINCT sample_id FROM "
                 "head_stats WHERE run_id = ?)", [run_id] * 2)
        db.mark(top, "interrupted")
    ran = []
    real_run = pipeline.run

    def recording_run(config, **kwargs):
        ran.append(config.name)
        return real_run(config, **kwargs)

    monkeypatch.setattr(pipeline, "run", recording_run)
    again = curve(store, "source", selectors=("top", "random"), ks=(2,), seeds=1, ablation="image-blind", keep=True,
                  config=config, loaded=loaded)
    assert ran == [top]
    with Store(store, read_only=True) as db:
        assert db.run(top)["status"] == "done" and db.run(top)["n_samples"] == 6
    assert [(p["selector"], p["k"], p["accuracy"]) for p in again] == [
        (p["selector"], p["k"], p["accuracy"]) for p in points]


def test_cli_fastv_points_land_in_the_same_store_with_their_share(kept):
    store, _, _, _ = kept
    result = runner.invoke(app, ["ablate", "--from", "source", "--mode", "fastv", "--fastv-layer", "1",
                                 "--fastv-keep", "0.5", "--limit", "6", "--max-new-tokens", "2", "--store", store,
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert (row["selector"], row["k"], row["mode"], row["fastv_layer"], row["fastv_keep"]) == (
        "fastv", 1, "fastv", 1, 0.5)
    assert row["image_kv_share"] == pytest.approx((1 + 2 * 0.5) / 3)
    with Store(store, read_only=True) as db:
        info = db.run(curve_points(db, from_run="source").query("mode == 'fastv'")["run"].iloc[0])
    assert info["ablation"] == "fastv:1:0.5" and info["config"]["fastv_keep"] == 0.5


def test_a_fastv_run_is_replayed_with_its_pruning_for_overlays_and_grounding(kept):
    """Overlays and grounding run a stored run's samples again: a FastV run's heads after layer K must show
    attention on the kept image tokens only, as they had in the run."""
    from vheads.pipeline.replay import attention_maps, reload_samples, run_ablation

    store, _, loaded, _ = kept
    runner.invoke(app, ["ablate", "--from", "source", "--mode", "fastv", "--fastv-layer", "1", "--fastv-keep",
                        "0.25", "--limit", "6", "--max-new-tokens", "2", "--store", store])
    with Store(store, read_only=True) as db:
        info = db.run(curve_points(db, from_run="source").query("fastv_keep == 0.25")["run"].iloc[0])
        ids = list(db.samples(info["name"])["sample_id"].astype(str))[:2]
    heads, mode, point = run_ablation(info)
    assert (heads, point) == ([], (1, 0.25))
    samples = reload_samples(info, ids)
    late = [(2, head) for head in range(4)]
    pruned = attention_maps(loaded, samples, late, ablate_heads=heads, ablation=mode, fastv_point=point)
    plain = attention_maps(loaded, samples, late)
    for before, after in zip(plain, pruned, strict=True):
        image_tokens = before.maps.shape[1]
        assert (np.count_nonzero(after.maps, axis=1) <= -(-image_tokens // 4)).all()
        assert (np.count_nonzero(before.maps, axis=1) > -(-image_tokens // 4)).all()


def test_keep_only_on_the_demo_model_needs_the_image_and_the_visual_heads_help(tmp_path):
    """End to end on the embedded model: with every head blind the model loses what the image told it."""
    from vheads.pipeline import run as pipeline
    from vheads.pipeline.config import RunConfig

    store = str(tmp_path / "s.duckdb")
    pipeline.run(RunConfig(limit=16, batch_size=16, store=store, name="demo"))
    result = runner.invoke(app, ["ablate", "--from", "demo", "--mode", "image-blind", "--keep", "top", "--k", "48",
                                 "--store", store, "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {row["k"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {0, 48, 96}
    assert rows[96]["accuracy"] >= 0.9 and rows[0]["accuracy"] <= rows[96]["accuracy"] - 0.4
    assert rows[0]["image_kv_share"] == 0.0 and rows[48]["image_kv_share"] == 0.5 and rows[96]["image_kv_share"] == 1
    assert len(rows[48]["kept"]) == 48
    flow = runner.invoke(app, ["ablate", "--from", "demo", "--mode", "flow-blind", "--keep", "top", "--k", "48",
                               "--store", store, "--format", "json"])
    assert flow.exit_code == 0, flow.output
    flows = {row["k"]: row for row in json.loads(flow.stdout)}
    assert {row["mode"] for row in flows.values()} == {"flow-blind"} and flows[96]["accuracy"] == rows[96]["accuracy"]
    assert flows[0]["accuracy"] <= flows[96]["accuracy"] - 0.4  # no head lets the image into the text


@pytest.mark.parametrize(("args", "message"), [
    (["--fastv-layer", "2", "--fastv-keep", "1.5"], "--fastv-keep 1.5: the share of image tokens kept must be in"),
    (["--fastv-layer", "2"], "--fastv-layer and --fastv-keep go together"),
    (["--fastv-layer", "2", "--fastv-keep", "0.5", "--ablate", "0.1"], "run it without --ablate"),
    (["--ablation", "half-blind", "--ablate", "0.1"], "unknown --ablation 'half-blind'"),
])
def test_cli_run_refuses_bad_pruning_options_in_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["run", "--limit", "1", "--store", str(tmp_path / "s.duckdb"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
