"""The prompt-style comparison: the same questions with the box drawn, as text and left out, side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import run
from vheads.report.styles import StyleView, region_of, style_heatmaps, style_section, style_view, summary_table
from vheads.store import Store


@pytest.fixture(scope="module")
def style_store(model_dirs, tmp_path_factory: pytest.TempPathFactory):
    """A tiny LLaVA run on the same six ShapesQA questions in each prompt style."""
    path = tmp_path_factory.mktemp("styles") / "styles.duckdb"
    for style in ("visual", "plain", "none"):
        run(RunConfig(model=str(model_dirs("llava")), limit=6, max_new_tokens=2, store=str(path), name=style,
                      prompt_style=style))
    return path


def test_summary_has_one_row_per_style_and_compares_with_the_first(style_store):
    with Store(style_store, read_only=True) as store:
        views = [style_view(store, style, style) for style in ("visual", "plain", "none")]
        samples = store.samples("none")
    table = summary_table(views)
    assert list(table["style"]) == ["visual", "plain", "none"]
    assert table.loc[0, "r(W, visual)"] == pytest.approx(1.0)
    assert table.loc[2, "accuracy"] == pytest.approx(samples["correct"].mean())
    for qtype, group in samples.groupby("question_type"):
        assert table.loc[2, f"acc {qtype}"] == pytest.approx(group["correct"].mean())
    assert all(-1 <= r <= 1 for r in table["r(W, visual)"] if np.isfinite(r))


def test_region_share_of_chosen_heads_is_their_mean(style_store):
    with Store(style_store, read_only=True) as store:
        view = style_view(store, "plain", "plain")
    heads = view.top()
    assert len(heads) >= 4
    shares = view.grid("mean_region_share")
    assert region_of(view, heads) == pytest.approx(np.nanmean([shares[layer, head] for layer, head in heads]))
    assert 0 <= region_of(view, heads) <= 1


def test_section_draws_both_maps_for_every_style(style_store, tmp_path):
    with Store(style_store, read_only=True) as store:
        section = style_section(store, {"visual": "visual", "plain": "plain", "none": "none"}, tmp_path)
    assert (tmp_path / "heatmap-styles.png").stat().st_size > 10_000
    body = "".join(section.body)
    assert section.title == "Prompt styles" and body.count("<tr") == 4


def test_style_maps_tick_whole_layers_and_heads():
    """A 6 x 16 grid (the demo model's) gets tick labels only at whole layer and head numbers."""
    layers, heads = 6, 16
    table = pd.DataFrame({"layer": np.repeat(np.arange(layers), heads), "head": np.tile(np.arange(heads), layers)})
    table["mean_w"] = np.linspace(0, 1, layers * heads)
    table["mean_region_share"] = 1 - table["mean_w"]
    table["visual"] = table["mean_w"] > 0.9
    table.attrs.update(layers=layers, heads=heads)
    views = [StyleView(style, style, table, {"all": 1.0}) for style in ("visual", "plain", "none")]
    fig = style_heatmaps(views, "ticks")
    fig.canvas.draw()
    for ax in fig.axes[:6]:
        for ticks, size in ((ax.get_xticks(), heads), (ax.get_yticks(), layers)):
            shown = [t for t in ticks if -0.5 <= t <= size - 0.5]
            assert shown and all(float(t).is_integer() for t in shown)
