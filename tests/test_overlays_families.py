"""The report's overlays on every family with a region layout: attention maps drawn back through tiles, crops,
thumbnails and merged cells onto the original image, and a real report of a tiled family."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from vheads.data import shapes_samples
from vheads.models import load
from vheads.pipeline.config import RunConfig
from vheads.pipeline.replay import attention_maps
from vheads.pipeline.run import run
from vheads.report.build import build_report
from vheads.report.overlays import attention_density, overlay_figure

REGION_FAMILIES = ("internvl", "llava_onevision", "smolvlm", "idefics3", "paligemma", "mistral3", "qwen2_vl",
                   "qwen2_5_vl", "qwen3_vl", "glm4v")


@pytest.mark.parametrize("family", REGION_FAMILIES)
def test_overlays_put_each_tokens_attention_on_its_pixels(model_dirs, family, tmp_path):
    loaded = load(model_dirs(family))
    sample = shapes_samples(1, seed=5)[0]
    [item] = attention_maps(loaded, [sample], [(0, 1), (1, 2)])
    assert item.maps.shape == (2, len(item.grid))
    assert np.all(item.visual_weight() > 0) and np.all(item.visual_weight() <= 1 + 1e-5)
    width, height = item.image.size
    weights = item.maps[0]
    density = attention_density(item.grid, weights, width, height)
    with np.errstate(invalid="ignore"):
        on_image = np.isfinite(item.grid.boxes[:, 0]) & (item.grid.boxes[:, 0] >= -1e-6) & \
            (item.grid.boxes[:, 1] >= -1e-6) & (item.grid.boxes[:, 2] <= width + 1e-6) & \
            (item.grid.boxes[:, 3] <= height + 1e-6)
    assert density.sum() >= weights[on_image].sum() - 1e-6, "attention of tokens inside the image is all drawn"
    assert density.sum() <= np.nansum(weights) + 1e-6, "no attention is drawn twice"
    fig = overlay_figure(item, sample.box, sample.question, sample.answer, "2", True, visual={(0, 1)})
    fig.savefig(tmp_path / "overlay.png")
    plt.close(fig)
    assert (tmp_path / "overlay.png").stat().st_size > 1000


def test_the_report_of_a_tiled_family_run_draws_its_overlays(model_dirs, tmp_path):
    store = tmp_path / "s.duckdb"
    run(RunConfig(model=str(model_dirs("internvl")), limit=4, max_new_tokens=2, store=str(store), name="tiles"))
    index = build_report(store, tmp_path / "report", overlays=2)
    assert sorted((tmp_path / "report").glob("overlay-*.png")), "overlays drawn for the InternVL run"
    assert "No overlays for this run" not in index.read_text()


def test_boxes_with_fractional_edges_keep_their_attention_mass():
    from vheads.models import TokenGrid

    boxes = np.array([[0.5, 0.25, 3.2, 2.0], [3.2, 0.0, 7.9, 2.0], [6.0, 2.0, 9.0, 4.0]])
    grid = TokenGrid(boxes, np.zeros(3, dtype=int), np.zeros(3, dtype=int), np.arange(3))
    density = attention_density(grid, np.array([0.3, 0.6, 0.1]), width=8, height=3)
    off_image = 0.1 * (1 - (2 * 1) / (3 * 2))
    assert density.sum() == pytest.approx(1.0 - off_image)
    assert density[0, 0] == pytest.approx(0.3 / (2.7 * 1.75) * 0.5 * 0.75)
