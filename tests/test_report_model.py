"""The report of real (tiny) model runs: attention maps agree with the recorder, overlays drawn, the demo end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from report_helpers import EXTERNAL, HOSTILE, spread

from vheads.capture import HeadRecorder, TokenAttention
from vheads.data import shapes_samples
from vheads.demo.study import DemoSettings, run_demo
from vheads.models import load
from vheads.pipeline.config import RunConfig
from vheads.pipeline.replay import attention_maps
from vheads.pipeline.run import run
from vheads.report.build import build_report
from vheads.store import Store


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_token_attention_sums_to_the_recorded_visual_weight(model_dirs, family):
    loaded = load(model_dirs(family))
    samples = shapes_samples(2, seed=3)
    heads = [(0, 1), (2, 3), (2, 0)]
    adapter = loaded.adapter
    inputs = adapter.encode([adapter.prompt(s.text) for s in samples], [[s.image()] for s in samples])
    with torch.inference_mode(), HeadRecorder(loaded.model) as recorder, \
            TokenAttention(loaded.model, heads) as maps:
        loaded.model(**inputs)
    w = recorder.result().visual_weight
    for row, image_map in enumerate(maps.maps):
        assert image_map.shape == (3, int(recorder.result().image_token_count[row]))
        assert np.allclose(image_map.sum(axis=1), [w[row, layer, head] for layer, head in heads], atol=1e-5)


def test_attention_maps_follow_anyres_tiles_back_to_the_image(model_dirs):
    loaded = load(model_dirs("llava_next"))
    sample = shapes_samples(1, seed=5)[0]
    [item] = attention_maps(loaded, [sample], [(1, 2)], readout="first-generated")
    assert item.maps.shape == (1, len(item.grid))
    assert set(np.unique(item.grid.tile)) >= {0, 1}
    assert np.nanmax(item.grid.boxes[:, 2]) == pytest.approx(item.image.width, abs=1)
    assert 0 < item.visual_weight()[0] <= 1 + 1e-5


@pytest.fixture(scope="module")
def real_store(model_dirs, tmp_path_factory: pytest.TempPathFactory):
    """A tiny LLaVA run on six ShapesQA questions, one of them rewritten to carry a script tag."""
    path = tmp_path_factory.mktemp("real") / "real.duckdb"
    run(RunConfig(model=str(model_dirs("llava")), limit=6, max_new_tokens=2, store=str(path), name="tiny"))
    with Store(path) as store:
        store.query("UPDATE samples SET question = ?, prediction = ? WHERE sample_id = "
                    "(SELECT min(sample_id) FROM samples)", [f"How many {HOSTILE}?", "<img src=x onerror=alert(2)>"])
    return path


def test_report_of_a_real_run_draws_overlays_and_escapes_dataset_text(real_store, tmp_path):
    with Store(real_store, read_only=True) as store:
        correct = int(store.samples("tiny")["correct"].sum())
    index = build_report(real_store, tmp_path, overlays=3)
    overlays = sorted(tmp_path.glob("overlay-*.png"))
    assert len(overlays) == min(3, correct) + min(3, 6 - correct)
    assert all(spread(p) > 5 for p in tmp_path.glob("*.png"))
    page = index.read_text()
    assert HOSTILE not in page and "<img src=x" not in page
    assert "How many &lt;script&gt;alert(1)&lt;/script&gt;?" in page
    assert not EXTERNAL.search(page)


def test_demo_runs_the_whole_study_and_can_run_again_in_the_same_folder(model_dirs, tmp_path):
    settings = DemoSettings(out=tmp_path / "demo", limit=3, curve_limit=2, ks=(0, 2), seeds=2, overlays=1,
                            model=str(model_dirs("llava")), keep_ks=(2,), keep_seeds=1, fastv=((1, 0.5),))
    first = run_demo(settings, say=lambda line: None)
    second = run_demo(settings, say=lambda line: None)
    assert second.index == first.index == tmp_path / "demo" / "index.html"
    assert {p["selector"] for p in second.points} == {"top", "random", "late"}
    with Store(second.store, read_only=True) as store:
        runs = store.runs()
    assert list(runs["name"]).count("demo") == 1
    assert second.style_runs == {"visual": "demo", "plain": "demo-plain", "none": "demo-none"}
    # the run, two styles, K = 0, top and late, two random seeds; keep-only: all blind, all kept, top, random; FastV
    assert len(runs) == 1 + 2 + 1 + 2 + 2 + 4 + 1
    assert {(p["mode"], p["selector"]) for p in second.pruning} == {
        ("image-blind", "top"), ("image-blind", "random"), ("fastv", "fastv")}
    page = second.index.read_text()
    assert "pruning curve" in page.lower() and "Run demo" in page and "efficiency frontier of demo" in page
    assert "Prompt styles" in page and (tmp_path / "demo" / "heatmap-styles.png").exists()


def test_report_draws_pointing_and_the_boxes_vheads_ground_drew_on_refcoco(model_dirs, tmp_path):
    import json
    import re

    from test_data_formats import write_image, write_jsonl

    from vheads.analysis.grounding import ground

    for i in range(3):
        write_image(tmp_path / "coco" / f"{i}.png", (64 + 16 * i, 48))
    records = [{"question_id": f"q{i}", "file_name": f"coco/{i}.png", "bbox": [4 + i, 6, 20, 18],
                "answer": [f"{HOSTILE} the thing on the left"]} for i in range(3)]
    data = write_jsonl(tmp_path / "refcoco.jsonl", records)
    store = tmp_path / "s.duckdb"
    summary = run(RunConfig(model=str(model_dirs("llava")), dataset="refcoco", data=str(data), max_new_tokens=2,
                            store=str(store), name="refs"))
    assert summary.accuracy is None and summary.samples == 3
    results = ground(store, "refs", ["pointing:2", "localization:2"])
    assert [r.n for r in results] == [3, 3]
    run(RunConfig(model=str(model_dirs("llava")), limit=2, max_new_tokens=1, store=str(store), name="pick"))
    ground(store, "refs", ["top:2"], heads_from="pick")
    index = build_report(store, tmp_path / "report", runs=["refs"], overlays=2)
    page = " ".join(index.read_text().split())
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt; the thing on the left" in page
    assert "<h3>Grounding</h3>" in page and "pointing:2" in page and "localization:2" in page
    assert "Solid green: the box drawn from the combined attention of top:2 of run pick" in page
    assert "dashed: the true box of the asked-about object, from the data; not shown to the model" in page
    heatmap = json.loads(re.search(r'id="hm-[^"]*-data">(.*?)</script>', page).group(1))
    assert [p["label"] for p in heatmap["panels"]] == ["mean visual weight W", "head score", "pointing"]
    assert all(v is None or 0 <= v <= 1 for v in heatmap["pointing"])
    assert len(sorted((tmp_path / "report").glob("overlay-*.png"))) == 3
