"""The figures of DESIGN.md on hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from vheads import metrics


def test_uniform_image_attention_has_zero_concentration():
    attn = np.array([0.1, 0.2, 0.2, 0.2, 0.2, 0.1])
    image = np.array([False, True, True, True, True, False])
    assert metrics.visual_weight(attn, image) == pytest.approx(0.8)
    assert metrics.concentration(attn, image) == pytest.approx(0.0, abs=1e-12)


def test_one_hot_image_attention_has_full_concentration():
    attn = np.array([0.5, 0.5, 0.0, 0.0])
    image = np.array([False, True, True, True])
    assert metrics.concentration(attn, image) == pytest.approx(1.0)


def test_concentration_by_hand():
    attn = np.array([0.0, 0.3, 0.1])
    image = np.array([False, True, True])
    p = np.array([0.75, 0.25])
    expected = 1 + (p * np.log(p)).sum() / math.log(2)
    assert metrics.concentration(attn, image) == pytest.approx(expected)


def test_concentration_is_nan_without_image_attention_or_with_one_token():
    assert np.isnan(metrics.concentration(np.array([1.0, 0.0, 0.0]), np.array([False, True, True])))
    assert np.isnan(metrics.concentration(np.array([0.5, 0.5]), np.array([False, True])))


def test_figures_broadcast_and_work_on_torch_tensors_too():
    attn = np.random.default_rng(0).dirichlet(np.ones(6), size=(2, 3))
    image = np.array([False, True, True, True, False, False])
    region = np.array([False, True, False, False, False, False])
    sink = np.array([True, False, False, False, False, False])
    text = ~image & ~sink
    f_np = metrics.attention_figures(attn, image, region, text, sink)
    f_t = metrics.attention_figures(torch.tensor(attn), torch.tensor(image), torch.tensor(region),
                                    torch.tensor(text), torch.tensor(sink))
    for name, value in f_np.items():
        assert value.shape == (2, 3)
        np.testing.assert_allclose(f_t[name].numpy(), value)
    np.testing.assert_allclose(f_np["visual_weight"] + f_np["text_weight"] + f_np["sink_weight"], 1.0)
    np.testing.assert_allclose(metrics.region_share(f_np["region_weight"], f_np["visual_weight"]),
                               attn[..., 1] / attn[..., 1:4].sum(-1))
    assert np.isnan(metrics.attention_figures(attn, image)["region_weight"]).all()


def test_figures_from_masked_sums_equal_the_five_figures_one_by_one():
    rng = np.random.default_rng(1)
    attn = rng.dirichlet(np.ones(9), size=(4, 3))
    attn[0, 0, 1:5] = 0.0
    image = np.zeros((4, 9), bool)
    image[:, 1:5] = True
    image[3] = False
    image[2, 1:4] = False
    region = image & (np.arange(9) < 3)
    sink = np.zeros((4, 9), bool)
    sink[:, 0] = True
    text = ~image & ~sink
    masks = np.stack([image, region, text, sink], -1).astype(np.float64)
    expected = metrics.attention_figures(attn, image[:, None], region[:, None], text[:, None], sink[:, None])
    on_numpy = metrics.figures_from_sums(metrics.masked_sums(attn, masks), image.sum(-1)[:, None])
    on_torch = metrics.figures_from_sums(metrics.masked_sums(torch.tensor(attn), torch.tensor(masks)),
                                         torch.tensor(image.sum(-1)[:, None]))
    for figures in (on_numpy, on_torch.numpy()):
        assert figures.shape == (4, 3, 5)
        for i, name in enumerate(metrics.SUM_FIGURES):
            np.testing.assert_allclose(figures[..., i], expected[name], atol=1e-12, equal_nan=True, err_msg=name)
    assert np.isnan(on_numpy[0, 0, 1]), "no image attention: C undefined"
    assert np.isnan(on_numpy[2:, :, 1]).all(), "one or no image token: C undefined"


def test_head_score_is_the_share_of_samples_in_the_top_k():
    w = np.array([
        [[0.9, 0.1], [0.5, 0.2]],
        [[0.8, 0.7], [0.1, 0.2]],
        [[0.1, 0.2], [0.3, 0.9]],
    ])
    scores = metrics.head_scores(w, k=2)
    np.testing.assert_allclose(scores, [[2 / 3, 1 / 3], [2 / 3, 1 / 3]])


def test_head_score_with_k_equal_to_all_heads_and_nan_weights():
    w = np.array([[[0.3, np.nan]], [[0.1, 0.2]]])
    np.testing.assert_allclose(metrics.head_scores(w, k=2), [[1.0, 0.5]])


def test_head_score_rejects_k_outside_one_to_all_heads():
    w = np.ones((2, 2, 3))
    for k in (0, -3, 7, 1000):
        with pytest.raises(ValueError, match="between 1 and 6"):
            metrics.head_scores(w, k=k)


def test_head_score_counts_only_samples_that_have_the_readout_row():
    answered = np.array([[[0.9, 0.1]], [[0.2, 0.8]], [[0.7, 0.3]]])
    missing = np.full((3, 1, 2), np.nan)
    with_missing = np.concatenate([answered, missing])
    np.testing.assert_allclose(metrics.head_scores(with_missing, k=1), metrics.head_scores(answered, k=1))
    np.testing.assert_allclose(metrics.head_scores(with_missing, k=1), [[2 / 3, 1 / 3]])


def test_head_score_is_undefined_when_no_sample_has_the_readout_row():
    assert np.isnan(metrics.head_scores(np.full((4, 2, 2), np.nan), k=1)).all()


def test_head_score_of_a_layer_without_attention_is_undefined():
    w = np.array([[[0.6, 0.4], [np.nan, np.nan]], [[0.3, 0.7], [np.nan, np.nan]]])
    scores = metrics.head_scores(w, k=1)
    np.testing.assert_allclose(scores[0], [0.5, 0.5])
    assert np.isnan(scores[1]).all()


def test_one_layer_default_k_and_bad_shapes():
    assert metrics.default_top_k(32, 32) == 102
    assert metrics.default_top_k(1, 2) == 1
    np.testing.assert_allclose(metrics.head_scores(np.array([[[0.2, 0.1, 0.4]]])), [[0, 0, 1]])
    with pytest.raises(ValueError, match="samples, layers, heads"):
        metrics.head_scores(np.zeros((3, 4)))


def test_stages_split_layers_in_thirds():
    assert [metrics.stage_of(i, 6) for i in range(6)] == ["early"] * 2 + ["mid"] * 2 + ["late"] * 2
    assert metrics.stage_layers("late", 32) == list(range(21, 32))
    assert metrics.stage_layers("early", 32) == list(range(0, 10))
    assert metrics.stage_of(0, 1) == "late"
    with pytest.raises(ValueError):
        metrics.stage_of(6, 6)


def test_stages_with_user_boundaries():
    assert [metrics.stage_of(i, 6, (1, 5)) for i in range(6)] == ["early"] + ["mid"] * 4 + ["late"]
    assert metrics.stage_layers("late", 32, (10, 20)) == list(range(20, 32))
    assert metrics.parse_stages("10,20") == (10, 20)
    for bad in ("10", "20,10", "a,b", "0,5", "5,32", "3,3"):
        with pytest.raises(ValueError, match="--stages"):
            metrics.check_stages(metrics.parse_stages(bad), 32)


def test_paper_stages_follow_the_reference_tables_per_depth():
    assert metrics.paper_stages(32) == (10, 20)
    assert metrics.paper_stages(40) == (13, 27)
    assert metrics.paper_stages(24) == (8, 16)
    assert metrics.paper_stages(9) == (3, 6)


def test_ranking_and_flags():
    scores = np.array([[0.6, 0.6], [0.2, np.nan]])
    mean_w = np.array([[0.1, 0.3], [0.9, 0.5]])
    assert metrics.rank_heads(scores, mean_w) == [(0, 1), (0, 0), (1, 0), (1, 1)]
    assert metrics.visual_head_flags(scores).tolist() == [[True, True], [False, False]]
