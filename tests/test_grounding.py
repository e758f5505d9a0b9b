"""Grounding: boxes drawn from synthetic maps, IoU and pointing, the localization rule, the pointing and
localization selectors, and `vheads ground` on tiny models of every kind of layout."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image
from tiny_models import BUILDERS
from typer.testing import CliRunner

from vheads import metrics
from vheads.analysis import localization
from vheads.analysis.boxes import Grounded, box_from_map, ground_map, iou, peak_on_target, raster, scores
from vheads.analysis.selectors import canonical, resolve_heads
from vheads.cli import app
from vheads.models import TokenGrid
from vheads.models.geometry import Affine, frame_grid
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import run
from vheads.store import Store

FAMILIES = sorted(BUILDERS)


def grid_4x4(size: int = 96) -> TokenGrid:
    """A 4 x 4 token grid over a size x size image."""
    cell = size / 4
    return frame_grid(Affine(), 4, 4, cell, cell, 0)


def test_box_of_a_single_hot_patch_is_that_patch():
    density = np.zeros((40, 60))
    density[10:20, 30:45] = 1.0
    assert box_from_map(density, sigma=0) == (30.0, 10.0, 45.0, 20.0)
    x1, y1, x2, y2 = box_from_map(density, sigma=2)
    assert x1 < 30 < 45 < x2 and y1 < 10 < 20 < y2, "smoothing widens the box a little"
    assert box_from_map(np.zeros((5, 5)), sigma=1) is None


def test_the_largest_region_wins_over_a_brighter_small_one():
    density = np.zeros((50, 50))
    density[5:8, 5:8] = 5.0
    density[20:40, 10:45] = 1.0
    assert box_from_map(density, sigma=0) == (10.0, 20.0, 45.0, 40.0)


def test_iou_and_pointing_on_boxes():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0 and iou(None, (0, 0, 1, 1)) == 0.0
    density = np.zeros((10, 10))
    density[2, 7] = 3.0
    assert peak_on_target(density, [(0, 0, 2, 2), (6.5, 1.5, 8, 3)])
    assert not peak_on_target(density, [(0, 0, 7, 10)])
    assert not peak_on_target(np.zeros((3, 3)), [(0, 0, 3, 3)])


def test_a_map_over_tokens_is_drawn_on_the_original_pixels_and_grounded():
    grid = grid_4x4()
    weights = np.zeros(16)
    weights[6] = 1.0  # row 1, col 2: pixels x 48-72, y 24-48
    drawn = raster(grid, weights, 96, 96)
    assert drawn.cell == 24 and drawn.density.sum() == pytest.approx(1.0)
    result = ground_map(grid, weights, 96, 96, [(50, 26, 70, 46), (0, 0, 20, 20)], sigma_cells=0)
    assert result.box == (48.0, 24.0, 72.0, 48.0) and result.pointing
    assert result.iou == pytest.approx(400 / 576)
    missed = ground_map(grid, weights, 96, 96, [(0, 0, 20, 20)], sigma_cells=0.5)
    assert not missed.pointing and missed.iou == 0.0
    grid_big = TokenGrid(grid.boxes * [2000 / 96, 1000 / 96, 2000 / 96, 1000 / 96], grid.tile, grid.row, grid.col)
    big = ground_map(grid_big, weights, 2000, 1000, [(1000, 250, 1500, 500)], sigma_cells=0)
    assert big.iou == pytest.approx(1.0, abs=0.01), "large images are drawn smaller and the box scaled back"


def test_scores_summarise_a_head_set():
    results = [Grounded((0, 0, 1, 1), True, 0.8), Grounded(None, False, 0.0), Grounded((0, 0, 1, 1), True, 0.4)]
    assert scores(results) == {"n": 3, "unseen": 0, "pointing": pytest.approx(2 / 3), "iou": pytest.approx(0.4),
                               "acc50": pytest.approx(1 / 3)}
    assert scores([]) == {"n": 0, "unseen": 0, "pointing": None, "iou": None, "acc50": None}


def test_elbow_is_the_point_farthest_from_the_chord():
    assert localization.elbow(np.array([1.0, 0.9, 0.2, 0.15, 0.1, 0.05])) == 2
    assert localization.elbow(np.array([1.0, 0.1, 0.09, 0.08])) == 1
    assert localization.elbow(np.array([0.5])) == 0


def test_localization_keeps_heads_above_the_elbow_and_ranks_them_by_spatial_entropy():
    mean_w = np.array([[0.9, 0.85, 0.1], [0.8, 0.05, 0.02]])
    measured = np.ones_like(mean_w, dtype=bool)
    assert localization.candidates(mean_w, measured, 2) == [(0, 0), (0, 1), (1, 0), (0, 2)]
    entropy = np.full((4, 2, 3), 2.0)
    entropy[:, 0, 0] = [1.0, 1.2, 0.9, 1.1]
    entropy[:, 1, 0] = [0.1, 0.2, 0.3, 0.1]
    entropy[:, 0, 1] = [0.5, 0.5, 0.5, np.nan]
    entropy[:, 1, 2] = 0.0  # lowest entropy of all, but below the elbow of W
    assert localization.localization_heads(mean_w, entropy, measured, k=2, per_sample=1) == [(1, 0), (0, 1)]
    voted = localization.localization_heads(mean_w, entropy, measured, k=3, per_sample=10)
    assert voted == [(1, 0), (0, 0), (0, 2)], "a head without an entropy in a sample gets no vote there"
    few = localization.localization_heads(mean_w, entropy, measured, k=5, per_sample=10)
    assert few == [(1, 0), (0, 0), (0, 2), (1, 1), (0, 1)], "fewer heads above the elbow than K: the next by W"


def synthetic_run(store: Store, name: str, w: np.ndarray, pointing: np.ndarray, entropy: np.ndarray) -> str:
    n, layers, heads = w.shape
    handle = store.start_run(name, model="m", family="llava", dataset="shapes", split="test", layers=layers,
                             heads=heads, readout="prompt", ablation="none", config={})
    rows = [{"sample_id": f"s{i}", "correct": True} for i in range(n)]
    store.add_batch(handle, rows, w, w, None, None, None, pointing=pointing, spatial_entropy=entropy)
    store.finish_run(handle, "done", accuracy=1.0)
    return name


def test_pointing_and_localization_selectors_read_the_run(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.uniform(0.0, 0.1, (6, 3, 4))
    w[:, 2, 1] = w[:, 1, 3] = w[:, 0, 0] = 0.9
    pointing = np.zeros((6, 3, 4))
    pointing[:, 0, 2] = 1.0
    pointing[:, 1, 1] = [1, 1, 1, 1, 1, 0]
    pointing[:, 2, 3] = [1, 0, 0, 0, 0, 0]
    entropy = np.full((6, 3, 4), 2.0)
    entropy[:, 1, 3], entropy[:, 0, 0], entropy[:, 2, 1] = 0.1, 0.5, 1.0
    with Store(tmp_path / "s.duckdb") as store:
        synthetic_run(store, "r", w, pointing, entropy)
        assert resolve_heads("pointing:2", store, "r") == [(0, 2), (1, 1)]
        assert resolve_heads("localization:2", store, "r") == [(1, 3), (0, 0)]
        assert resolve_heads("localization:1", store, "r") == [(1, 3)]
        synthetic_run(store, "no-box", w, np.full_like(w, np.nan), np.full_like(w, np.nan))
        with pytest.raises(ValueError, match="no pointing figures"):
            resolve_heads("pointing:2", store, "no-box")
        with pytest.raises(ValueError, match="no spatial entropies"):
            resolve_heads("localization:2", store, "no-box")
        with pytest.raises(ValueError, match="pass --from"):
            resolve_heads("pointing:2", store)
        with pytest.raises(ValueError, match="K must be between 0 and 12"):
            resolve_heads("localization:40", store, "r")


def test_the_pointing_column_of_vheads_heads(tmp_path):
    w = np.full((2, 1, 2), 0.5)
    with Store(tmp_path / "s.duckdb") as store:
        synthetic_run(store, "r", w, np.array([[[1.0, 0.0]], [[1.0, np.nan]]]), np.zeros_like(w))
    result = CliRunner().invoke(app, ["heads", "--store", str(tmp_path / "s.duckdb"), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {(r["layer"], r["head"]): r["pointing"] for r in json.loads(result.stdout)}
    assert rows == {(0, 0): 1.0, (0, 1): 0.0}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("family", FAMILIES)
def test_vheads_ground_on_every_family(model_dirs, tmp_path, family):
    store = str(tmp_path / "s.duckdb")
    run(RunConfig(model=str(model_dirs(family)), limit=4, max_new_tokens=1, store=store, name="r",
                  question_type="obj", prompt_style="none"))
    result = invoke("ground", "--from", "r", "--store", store, "--heads", "localization:2", "--format", "json")
    assert result.exit_code == 0, result.output
    [summary] = json.loads(result.stdout)
    assert set(summary) == {"selector", "source", "heads", "n", "unseen", "pointing", "iou", "acc50"}
    assert summary["selector"] == "localization:2" and len(summary["heads"]) == 2 and summary["n"] == 4
    assert 0 <= summary["pointing"] <= 1 and 0 <= summary["iou"] <= 1 and 0 <= summary["acc50"] <= 1
    with Store(store, read_only=True) as db:
        kept = db.groundings("r")
    assert len(kept) == 4 and set(kept["selector"]) == {"localization:2"}
    assert kept["heads"].iloc[0] == summary["heads"]
    assert kept[["x1", "y1", "x2", "y2"]].notna().all().all()
    assert (kept["x2"] > kept["x1"]).all() and (kept["x2"] <= 96).all() and (kept["y2"] <= 96).all()
    assert all(len(t) >= 1 for t in kept["targets"])


def test_ground_several_head_sets_in_one_pass_and_choose_heads_on_another_run(model_dirs, tmp_path):
    store = str(tmp_path / "s.duckdb")
    model = str(model_dirs("llava"))
    run(RunConfig(model=model, limit=3, max_new_tokens=1, store=store, name="pick", split="val"))
    run(RunConfig(model=model, limit=5, max_new_tokens=1, store=store, name="test"))
    result = invoke("ground", "--from", "test", "--heads-from", "pick", "--store", store, "--heads", "pointing:3",
                    "--heads", "random:3:1", "--heads", "0.1,2.3", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["selector"] for r in rows] == ["pointing:3", "random:3:1", "0.1,2.3"]
    assert {r["source"] for r in rows} == {"pick"}
    assert rows[2]["heads"] == ["0.1", "2.3"] and all(r["n"] == 5 for r in rows)
    with Store(store, read_only=True) as db:
        from vheads.analysis.selectors import resolve_heads as resolve

        assert rows[0]["heads"] == [f"{layer}.{head}" for layer, head in sorted(resolve("pointing:3", db, "pick"))]
    table = invoke("ground", "--from", "test", "--store", store, "--heads", "top:2", "--heads-from", "pick")
    assert table.exit_code == 0 and "acc50" in table.stdout and "top:2 of run pick" in table.stdout
    again = invoke("ground", "--from", "test", "--store", store, "--heads", "top:2", "--format", "csv")
    assert again.stdout.splitlines()[0] == "selector,source,heads,n,unseen,pointing,iou,acc50"
    with Store(store, read_only=True) as db:
        kept = db.query("SELECT source, count(*) AS n FROM groundings WHERE selector = 'top:2' GROUP BY source")
    assert dict(zip(kept["source"], kept["n"], strict=True)) == {"pick": 5, "test": 5}, "kept apart by source"


def test_heads_from_another_model_are_refused_unless_asked(model_dirs, tmp_path):
    store = str(tmp_path / "s.duckdb")
    run(RunConfig(model=str(model_dirs("llava")), limit=2, max_new_tokens=1, store=store, name="r"))
    run(RunConfig(model=str(model_dirs("vipllava")), limit=2, max_new_tokens=1, store=store, name="other"))
    refused = invoke("ground", "--from", "r", "--heads-from", "other", "--store", store, "--heads", "top:2")
    assert refused.exit_code == 2 and refused.output.count("error:") == 1
    assert "--heads-from run other is of model" in refused.output and "--allow-other-model" in refused.output
    asked = invoke("ground", "--from", "r", "--heads-from", "other", "--store", store, "--heads", "top:2",
                   "--allow-other-model", "--format", "json")
    assert asked.exit_code == 0, asked.output
    assert [(r["selector"], r["source"]) for r in json.loads(asked.stdout)] == [("top:2", "other")]


def test_one_selector_spelled_three_ways_is_one_head_set(model_dirs, tmp_path):
    from vheads.analysis.grounding import ground

    store = str(tmp_path / "s.duckdb")
    run(RunConfig(model=str(model_dirs("llava")), limit=2, max_new_tokens=1, store=store, name="r"))
    results = ground(store, "r", ["random:4", "random:4:0", "random:04:00"])
    assert [r.selector for r in results] == ["random:4"]
    ground(store, "r", ["random:4:0"])
    with Store(store, read_only=True) as db:
        assert set(db.groundings("r")["selector"]) == {"random:4"}


def test_ground_refuses_what_it_cannot_do_in_one_line(model_dirs, tmp_path):
    from vheads.models import Adapter, Loaded, load

    store = str(tmp_path / "s.duckdb")
    model = str(model_dirs("llava"))
    run(RunConfig(model=model, limit=2, max_new_tokens=1, store=store, name="r"))
    for args, message in (
        (["--heads", "nope:3"], "unknown selector"),
        (["--heads", "top:99"], "K must be between"),
        (["--heads-from", "nope"], "unknown run 'nope'"),
        (["--sigma", "1e9"], "--sigma 1000000000.0: expected token cells from 0 to 32"),
        (["--sigma", "inf"], "--sigma inf: expected token cells from 0 to 32"),
        (["--sigma", "-1"], "--sigma -1.0: expected token cells from 0 to 32"),
    ):
        result = invoke("ground", "--from", "r", "--store", store, *args)
        assert result.exit_code == 2 and message in result.output and result.output.count("error:") == 1
    from vheads.analysis.grounding import ground

    known = load(model)
    generic = Loaded(known.model, known.processor, Adapter(known.model, known.processor), known.name)
    from vheads.models import GeometryError

    with pytest.raises(GeometryError, match="lays out image tokens"):
        ground(store, "r", ["top:2"], loaded=generic)


def test_spatial_entropy_of_regions_on_two_frames():
    tile = np.array([0, 0, 0, 0, 1, 1, 1, 1, -1])
    row = np.array([0, 0, 1, 1, 0, 0, 1, 1, -1])
    col = np.array([0, 1, 0, 1, 0, 1, 0, 1, -1])
    maps = np.zeros((2, 9))
    maps[0, [0, 3]] = 1.0  # diagonal neighbours: one region
    maps[1, [1, 4]] = 1.0  # touching across frames: two regions
    maps[:, 8] = 100.0  # a token without a patch is left out
    np.testing.assert_allclose(metrics.spatial_entropy(maps, tile, row, col), [0.0, np.log(2)])


def test_smoothing_costs_the_same_however_wide_sigma_is():
    density = np.zeros((48, 48))
    density[5:9, 30:40] = 1.0
    started = time.perf_counter()
    box = box_from_map(density, sigma=2e5)
    assert time.perf_counter() - started < 1.0, "the kernel is cut at the picture's side"
    assert box is not None and 0 <= box[0] < box[2] <= 48
    assert box_from_map(density, sigma=2.0) == (26.0, 1.0, 44.0, 13.0), "ordinary widths are unchanged"


def test_a_sample_whose_targets_the_model_never_saw_is_counted_apart():
    grid = grid_4x4(96)
    weights = np.zeros(16)
    weights[5] = 1.0
    seen = ground_map(grid, weights, 200, 96, [(24, 24, 48, 48)], sigma_cells=0)
    unseen = ground_map(grid, weights, 200, 96, [(120, 10, 190, 90)], sigma_cells=0)
    assert seen.pointing and seen.iou == 1.0
    assert unseen.box == seen.box and unseen.pointing is None and unseen.iou is None
    assert scores([seen, unseen, Grounded(None, False, 0.0)]) == {"n": 2, "unseen": 1, "pointing": 0.5, "iou": 0.5,
                                                                 "acc50": 0.5}


def test_a_selector_has_one_spelling():
    assert {canonical(s) for s in ("random:4", "random:4:0", " random:04:00 ")} == {"random:4"}
    assert [canonical(s) for s in ("random:4:1", "top:08", "stage:late", "2.3, 0.1,2.3")] == [
        "random:4:1", "top:8", "stage:late", "0.1,2.3"]
    with pytest.raises(ValueError, match="unknown selector"):
        canonical("nope:3")


def wide_refcoco(folder, boxes) -> str:
    """A RefCOCO-layout file on one 96 x 32 picture (a centre-cropping processor keeps x 32..64 of it), one
    expression per box."""
    Image.new("RGB", (96, 32), "white").save(folder / "wide.png")
    lines = [json.dumps({"id": i, "image": "wide.png", "box": list(box), "expression": f"thing {i}"})
             for i, box in enumerate(boxes)]
    path = folder / "refs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_ground_leaves_out_targets_the_centre_crop_cut_away_as_the_run_does(model_dirs, tmp_path):
    store = str(tmp_path / "s.duckdb")
    boxes = [(36, 4, 48, 16), (40, 8, 60, 28), (0, 0, 20, 32), (70, 4, 90, 28), (33, 20, 63, 31)]
    run(RunConfig(model=str(model_dirs("vipllava")), dataset="refcoco", data=wide_refcoco(tmp_path, boxes),
                  max_new_tokens=1, store=store, name="r"))
    result = invoke("ground", "--from", "r", "--store", store, "--heads", "0.0,1.1", "--format", "json")
    assert result.exit_code == 0, result.output
    [summary] = json.loads(result.stdout)
    assert (summary["n"], summary["unseen"]) == (3, 2)
    with Store(store, read_only=True) as db:
        kept = db.groundings("r").set_index("sample_id")
        measured = db.query("SELECT DISTINCT sample_id FROM head_stats WHERE pointing IS NOT NULL")["sample_id"]
    assert set(kept.index[kept["iou"].notna()]) == set(measured) == {"0", "1", "4"}
    assert kept.loc["2", ["pointing", "iou"]].isna().all() and kept.loc["2", "x2"] > kept.loc["2", "x1"]


def test_ground_refuses_data_changed_since_the_run(model_dirs, tmp_path):
    store = str(tmp_path / "s.duckdb")
    boxes = [(36, 4, 48, 16), (40, 8, 60, 28), (33, 20, 63, 31), (34, 2, 62, 12)]
    data = wide_refcoco(tmp_path, boxes)
    run(RunConfig(model=str(model_dirs("llava")), dataset="refcoco", data=data, max_new_tokens=1, store=store,
                  name="r"))
    lines = open(data).read().splitlines()
    with open(data, "w") as handle:
        handle.write("\n".join(lines[:2] + [lines[2].replace("thing 2", "another thing")]) + "\n")
    result = invoke("ground", "--from", "r", "--store", store, "--heads", "0.0")
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert f"2 of 4 samples of run r are gone from {data} or changed" in " ".join(result.output.split())
    with Store(store) as db:
        db.query("UPDATE samples SET digest = NULL")
    with pytest.raises(ValueError, match="2 of 4 samples"):
        from vheads.analysis.grounding import ground

        ground(store, "r", ["0.0"])
