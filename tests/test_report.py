"""The report from synthetic stores: every figure written and non-blank, big grids readable, text escaped."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from report_helpers import EXTERNAL, HOSTILE, spread, synthetic_curve, synthetic_run
from typer.testing import CliRunner

from vheads.cli import app
from vheads.models import TokenGrid
from vheads.report import figures
from vheads.report.build import build_report, report_runs
from vheads.report.html import json_script, table
from vheads.report.overlays import attention_density
from vheads.report.samples import pick_samples
from vheads.store import Store

NAMED = f"big {HOSTILE}"


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory):
    """Three runs (32 x 32 twice, 40 x 40) with planted visual heads, and a pruning curve of the first."""
    path = tmp_path_factory.mktemp("report") / "big.duckdb"
    with Store(path) as store:
        synthetic_run(store, NAMED, 32, 32, [(3, 5), (20, 31)])
        synthetic_run(store, "wide", 40, 40, [(0, 0), (39, 39), (12, 20)], seed=1)
        synthetic_run(store, "again", 32, 32, [(3, 5)], seed=2)
        synthetic_curve(store, NAMED, 32, 32)
    return path


@pytest.fixture(scope="module")
def big_report(big_store, tmp_path_factory: pytest.TempPathFactory):
    """The report of `big_store` (its models do not exist, so overlays become a note)."""
    return build_report(big_store, tmp_path_factory.mktemp("out") / "report", overlays=2)


def test_report_covers_finished_runs_but_not_curve_points(big_store):
    with Store(big_store, read_only=True) as store:
        assert report_runs(store) == [NAMED, "wide", "again"]
        assert report_runs(store, ["wide"]) == ["wide"]


def test_report_writes_a_png_per_figure_and_embeds_them(big_report):
    out = big_report.parent
    names = sorted(p.name for p in out.glob("*.png"))
    assert [n for n in names if n.startswith("heatmap-")] == ["heatmap-00-big_script_alert_1_script_.png",
                                                              "heatmap-01-wide.png", "heatmap-02-again.png"]
    assert {"wc-scatter.png", "correlation.png"} <= set(names)
    assert any(n.startswith("pruning-00-") for n in names)
    for png in out.glob("*.png"):
        assert spread(png) > 5, f"{png.name} looks blank"
    page = big_report.read_text()
    assert page.count("data:image/png;base64,") == len(names)


def test_report_page_needs_no_network_and_escapes_names(big_report):
    page = big_report.read_text()
    assert not EXTERNAL.search(page)
    assert HOSTILE not in page
    assert "big &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert len(re.findall(r"<script>", page)) == 1
    assert "No overlays for this run" in page


def test_heatmap_hover_data_matches_the_picture(big_store, tmp_path):
    """The JSON behind a 40 x 40 heatmap puts the planted head where the PNG shows a bright cell."""
    page = build_report(big_store, tmp_path, runs=["wide"], overlays=0).read_text()
    data = json.loads(re.search(r'<script type="application/json" id="hm-00-wide-data">(.*?)</script>', page)[1])
    assert (data["layers"], data["heads"]) == (40, 40)
    assert data["visual"][12 * 40 + 20] == 1 and data["rank"][12 * 40 + 20] <= 3
    picture = np.asarray(Image.open(tmp_path / "heatmap-00-wide.png").convert("RGB"), dtype=float)
    height, width = picture.shape[:2]
    x0, y0, x1, y1 = data["panels"][0]["extent"]

    def brightness(layer: int, head: int) -> float:
        x = (x0 + (head + 0.2) / 40 * (x1 - x0)) * width
        y = (y0 + (layer + 0.2) / 40 * (y1 - y0)) * height
        return picture[int(y), int(x)].sum()

    assert brightness(12, 20) > brightness(12, 21) + 150


def test_report_cli_writes_index(big_store, tmp_path):
    result = CliRunner().invoke(app, ["report", "--store", str(big_store), "--out", str(tmp_path / "r"),
                                      "--run", "again", "--overlays", "0"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "index.html").is_file()
    assert "index.html" in result.output
    assert "report: 0/2 steps (0%), run again" in result.stderr and "report: 2/2 steps (100%), done" in result.stderr


def test_grounding_table_names_the_run_heads_were_chosen_on_and_leaves_unseen_targets_out(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        synthetic_run(store, "val", 4, 4, [(1, 2)])
        synthetic_run(store, "test", 4, 4, [(1, 2)], n=3)
        box = {"x1": 1, "y1": 1, "x2": 9, "y2": 9, "targets": [[0, 0, 10, 10]]}
        hit, missed = {**box, "pointing": True, "iou": 0.64}, {**box, "pointing": False, "iou": 0.0}
        unseen = {**box, "pointing": None, "iou": None}
        store.add_groundings("test", "top:4", ["1.2"], [{"sample_id": f"s00{i}", **row} for i, row in
                                                       enumerate((hit, missed, unseen))])
        store.add_groundings("test", "top:4", ["1.2"], [{"sample_id": f"s00{i}", **hit} for i in range(3)],
                             source="val")
    page = build_report(path, tmp_path / "out", runs=["test"], overlays=0).read_text()
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr><td[^>]*>top:4.*?</tr>", page)]
    assert cells == [["top:4 of run val", "1.2", "3", "0", "1.000", "0.640", "1.000"],
                     ["top:4", "1.2", "2", "1", "0.500", "0.320", "0.500"]]


def test_report_of_an_empty_store_is_a_clear_error(tmp_path):
    Store(tmp_path / "empty.duckdb").close()
    result = CliRunner().invoke(app, ["report", "--store", str(tmp_path / "empty.duckdb"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "no finished run" in result.output


def test_attention_density_keeps_the_attention_mass():
    grid = TokenGrid(boxes=np.array([[0, 0, 8, 8], [8, 0, 16, 8], [np.nan] * 4, [0, 0, 16, 16]], dtype=float),
                     tile=np.array([0, 0, -1, 1]), row=np.zeros(4, int), col=np.zeros(4, int))
    density = attention_density(grid, np.array([0.2, 0.1, 0.5, 0.2]), width=16, height=16)
    assert density.sum() == pytest.approx(0.2 + 0.1 + 0.2)
    assert density[0, 0] == pytest.approx(0.2 / 64 + 0.2 / 256)
    assert density[12, 12] == pytest.approx(0.2 / 256)


def test_pick_samples_takes_correct_and_wrong_spread_over_the_run():
    frame = pd.DataFrame({"sample_id": [f"s{i:02d}" for i in range(10)], "correct": [i % 2 == 0 for i in range(10)]})
    picked = pick_samples(frame, 2)
    assert list(picked["sample_id"]) == ["s00", "s08", "s01", "s09"]
    unscored = frame.assign(correct=None)
    assert len(pick_samples(unscored, 2)) == 4


def test_pruning_curves_draw_every_selector():
    points = pd.DataFrame({"selector": ["top", "top", "random", "random", "random"], "k": [0, 4, 4, 4, 0],
                           "seed": [None, None, 0, None, None], "accuracy": [0.9, 0.3, 0.8, 0.75, 0.9],
                           "low": [0.8, 0.2, 0.7, 0.6, 0.8], "high": [1.0, 0.4, 0.9, 0.9, 1.0]})
    fig = figures.pruning_curves(points, "curve $x$")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["top", "random"]


def test_html_helpers_escape_data():
    block = json_script("d", {"name": "</script><script>alert(1)</script>"})
    assert "</script><script>" not in block.removesuffix("</script>")
    rows = table(pd.DataFrame({"question": [HOSTILE], "W": [0.5]}))
    assert HOSTILE not in rows and "&lt;script&gt;" in rows
