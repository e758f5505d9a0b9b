"""Visual heads: a head planted to look at the image is found, stage counts, per-group breakdowns, set differences,
bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analysis_helpers import synthetic_run

from vheads.analysis.ranking import head_table
from vheads.analysis.stats import bootstrap_mean_ci
from vheads.analysis.visual import (
    breakdown,
    compare_visual,
    diff_heads,
    group_filter,
    head_intervals,
    head_set,
    stage_counts,
    visual_heads,
)
from vheads.models import load
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import run
from vheads.store import Store

FLAG, CONSTANT = 0, 1  # hidden dimensions: "this token is an image token", and 1 on every token


def plant_visual_head(model: torch.nn.Module, layer: int, head: int) -> None:
    """Make one head of a tiny LLaVA attend to the image tokens and every other head attend uniformly.

    The residual stream is frozen to the input embeddings (attention and MLP outputs zeroed), image embeddings
    carry a flag dimension that text embeddings lack, and only the planted head has a query: a constant that
    matches the keys' flag. It sits in the slowest rotary pair, so positions barely rotate it.
    """
    lm = model.model.language_model
    config = lm.config
    head_dim = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    slot = head_dim // 2 - 1
    with torch.no_grad():
        lm.embed_tokens.weight[:, FLAG] = 0.0
        lm.embed_tokens.weight[:, CONSTANT] = 1.0
        projector = model.model.multi_modal_projector.linear_2
        projector.weight.zero_()
        projector.bias.zero_()
        projector.bias[[FLAG, CONSTANT]] = 1.0
        for block in lm.layers:
            block.self_attn.q_proj.weight.zero_()
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        attention = lm.layers[layer].self_attn
        attention.q_proj.weight[head * head_dim + slot, CONSTANT] = 8.0
        key_row = (head // group) * head_dim + slot
        attention.k_proj.weight[key_row] = 0.0
        attention.k_proj.weight[key_row, FLAG] = 8.0


@pytest.mark.parametrize(("layer", "head", "stage"), [(2, 1, "late"), (1, 2, "mid")])
def test_a_head_planted_to_look_at_the_image_ranks_first_with_score_one(tmp_path, model_dirs, layer, head, stage):
    loaded = load(model_dirs("llava"))
    plant_visual_head(loaded.model, layer, head)
    store_path = str(tmp_path / "s.duckdb")
    run(RunConfig(limit=4, max_new_tokens=1, store=store_path, name="planted"), loaded=loaded)
    with Store(store_path, read_only=True) as store:
        table = head_table(store, "planted")
        found = visual_heads(store, "planted")
    best = table.iloc[0]
    assert (best["layer"], best["head"], best["score"]) == (layer, head, 1.0)
    assert best["mean_w"] > 0.99
    assert table["score"].iloc[1:].eq(0).all() and table["mean_w"].iloc[1:].lt(0.6).all()
    assert head_set(found) == {(layer, head)}
    assert stage_counts(head_set(found), layers=3) == {"early": 0, "mid": 0, "late": 0, stage: 1}


def grouped_store(path) -> Store:
    """Six layers x two heads; head 5.0 looks at the image on every question, head 1.1 only when the object is named."""
    rng = np.random.default_rng(0)
    w = rng.uniform(0.0, 0.1, size=(8, 6, 2))
    w[:, 5, 0] = 0.9
    for i in range(4):  # on general questions the runner-up changes from sample to sample
        w[i, 2 + i // 2, i % 2] = 0.5
    w[4:, 1, 1] = 0.8
    types = ["general"] * 4 + ["obj"] * 4
    store = Store(path)
    synthetic_run(store, "boxes", w, question_types=types, prompt_styles=["visual", "plain"] * 4)
    return store


def test_breakdown_per_question_type_shows_the_heads_naming_the_object_adds(tmp_path):
    with grouped_store(tmp_path / "s.duckdb") as store:
        table = breakdown(store, "boxes", by="question_type", k=2)
        styles = breakdown(store, "boxes", by="prompt_style", k=2)
        named = compare_visual(store, "boxes", "boxes", k=2, where_a=group_filter("question_type", "general"),
                               where_b=group_filter("question_type", "obj"))
    by_type = table.set_index("question_type")
    assert by_type.loc["general", "heads"] == ["5.0"] and by_type.loc["obj", "heads"] == ["1.1", "5.0"]
    assert by_type.loc["obj", ["samples", "visual", "early", "mid", "late"]].tolist() == [4, 2, 1, 0, 1]
    assert list(styles["prompt_style"]) == ["plain", "visual"]
    assert named.shared == [(5, 0)] and named.only_b == [(1, 1)] and named.only_a == []
    assert named.jaccard == 0.5


def test_head_set_difference():
    diff = diff_heads([(0, 1), (2, 3)], [(2, 3), (4, 0)])
    assert diff.as_dict() == {"shared": ["2.3"], "only_a": ["0.1"], "only_b": ["4.0"], "jaccard": 1 / 3}
    assert diff_heads([], []).jaccard == 1.0


def test_group_filter_quotes_values_and_rejects_other_columns():
    assert group_filter("prompt_style", "it's") == "s.prompt_style = 'it''s'"
    assert group_filter("question_type", None) == "s.question_type IS NULL"
    with pytest.raises(ValueError, match="cannot filter on 'answer'"):
        group_filter("answer", "1")


def test_head_intervals_bracket_the_mean_and_repeat_with_the_seed(tmp_path):
    with grouped_store(tmp_path / "s.duckdb") as store:
        first = head_intervals(store, "boxes", n_boot=200, seed=1)
        again = head_intervals(store, "boxes", n_boot=200, seed=1)
    assert len(first) == 12 and first.equals(again)
    assert (first["w_low"] <= first["mean_w"]).all() and (first["mean_w"] <= first["w_high"]).all()
    constant = first.set_index(["layer", "head"]).loc[(5, 0)]
    assert constant["w_low"] == pytest.approx(0.9) and constant["w_high"] == pytest.approx(0.9)


def test_bootstrap_interval_of_a_proportion_matches_the_normal_approximation():
    coin = np.array([0.0, 1.0] * 200)
    low, high = bootstrap_mean_ci(coin, n_boot=2000, seed=0)
    half = 1.96 * np.sqrt(0.25 / 400)
    assert float(low) == pytest.approx(0.5 - half, abs=0.01) and float(high) == pytest.approx(0.5 + half, abs=0.01)
    nan_low, nan_high = bootstrap_mean_ci(np.full((5, 2), np.nan))
    assert np.isnan(nan_low).all() and np.isnan(nan_high).all()
