"""Per-head figures are declared once (`vheads.figures`): the recorder's output, the writer, the store's columns, the
per-head means and the listings all follow the declaration, so a new figure is one line there plus its math."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_store import HEADS, LAYERS, fake_batch, start
from typer.testing import CliRunner

from vheads import figures
from vheads.analysis.ranking import head_columns, head_table
from vheads.capture import RECORDED, HeadFigures
from vheads.cli import app
from vheads.cli.common import head_headers, head_legend
from vheads.figures import FIGURES, Figure
from vheads.pipeline.writer import BatchWriter
from vheads.store import Store

# A figure as a contributor would add it: stored, listed; and one derived from stored figures when read.
PEAK = Figure("peak_weight", "peak", "mean attention on the most-attended image token", listed="mean_peak")
TEXT_SHARE = Figure("text_share", "T/W", "mean text weight over visual weight", listed="text_share",
                    derived="text_weight::DOUBLE / nullif(visual_weight::DOUBLE, 0)")


def test_every_declared_figure_has_a_column_a_field_a_mean_and_when_listed_a_header(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        run = start(store)
        samples, *arrays = fake_batch([1, 2])
        store.add_batch(run, samples, *arrays)
        columns = set(store.head_stats(run).columns)
        means = store.head_means(run)
    recorded = HeadFigures(np.full(2, 16), np.ones(2))
    for figure in FIGURES:
        assert figure.name in means, figure.name
        assert (figure.name in columns) == figure.stored, figure.name
        assert (figure.name in recorded.values) == figure.stored, figure.name
        if figure.stored:
            assert getattr(recorded, figure.name) is None, "not measured"
        if figure.listed:
            assert figure.listed in head_columns()
            assert head_headers()[figure.listed] == figure.label
            assert f"{figure.label}: {figure.help}" in head_legend()
    assert set(RECORDED) == set(figures.stored_names()), "the recorder computes exactly the stored figures"
    assert [f.listed for f in figures.listed()] == ["mean_w", "mean_c", "mean_region_share", "pointing"]


def test_a_figure_nobody_declared_is_refused_by_the_recorder_output_and_the_store(tmp_path):
    with pytest.raises(TypeError, match="peak_weight"):
        HeadFigures(np.full(2, 16), np.ones(2), peak_weight=np.zeros((2, LAYERS, HEADS)))
    with Store(tmp_path / "s.duckdb") as store:
        run = start(store)
        samples, *arrays = fake_batch([1, 2])
        with pytest.raises(TypeError, match="peak_weight"):
            store.add_batch(run, samples, *arrays, peak_weight=arrays[0])
        with pytest.raises(TypeError, match="visual_weight"):
            store.add_batch(run, samples, *arrays, visual_weight=arrays[0])


def test_one_declaration_carries_a_new_figure_to_the_store_the_means_and_the_listing(tmp_path, monkeypatch):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        old = start(store, "old")
        samples, *arrays = fake_batch([1, 2])
        store.add_batch(old, samples, *arrays)
        store.finish_run(old)

    monkeypatch.setattr(figures, "FIGURES", (*FIGURES, PEAK, TEXT_SHARE))
    with Store(path, read_only=True) as store:
        assert "peak_weight" not in store.head_stats("old")
        assert store.head_means("old")["peak_weight"].isna().all(), "a store that predates it reads NULL"

    samples, visual, concentration, region, text, sink = fake_batch([1, 2, 3])
    peak = visual / 3
    with Store(path) as store:
        new = start(store, "new")
        with BatchWriter(store, new) as writer:
            writer.submit(samples, HeadFigures(np.full(3, 16), np.ones(3), visual_weight=visual,
                                               concentration=concentration, text_weight=text, peak_weight=peak))
        store.finish_run(new)
        stats = store.head_stats("new")
        means = store.head_means("new")
        table = head_table(store, "new").set_index(["layer", "head"]).sort_index()
        assert store.head_stats("old")["peak_weight"].isna().all(), "the old store gained the column"

    np.testing.assert_allclose(stats["peak_weight"].to_numpy().reshape(3, LAYERS, HEADS), peak)
    np.testing.assert_allclose(means["peak_weight"], peak.mean(axis=0).ravel(), rtol=1e-6)
    share = (text.astype(np.float64) / visual.astype(np.float64)).mean(axis=0).ravel()
    np.testing.assert_allclose(means["text_share"], share, rtol=1e-12)
    assert list(table.columns)[-4:] == ["mean_peak", "text_share", "stage", "visual"]
    np.testing.assert_allclose(table["mean_peak"], means["peak_weight"])
    np.testing.assert_allclose(table["text_share"], share, rtol=1e-12)

    runner = CliRunner(env={"COLUMNS": "200"})
    listed = runner.invoke(app, ["heads", "--run", "new", "--store", str(path), "--format", "json", "--top", "0"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert len(rows) == LAYERS * HEADS and {"mean_peak", "text_share"} <= set(rows[0])
    shown = runner.invoke(app, ["heads", "--run", "new", "--store", str(path)])
    assert shown.exit_code == 0, shown.output
    text_out = " ".join(shown.stdout.split())
    assert " peak " in text_out and " T/W " in text_out
    assert "peak: mean attention on the most-attended image token" in text_out
