"""Heads in `L.H` notation, and which key/value heads keep the image when query heads go image-blind."""

import pytest

from vheads.heads import format_heads, image_kv_heads, image_kv_share, parse_heads


def test_heads_round_trip_through_their_notation():
    heads = parse_heads("3.1, 4.7")
    assert heads == [(3, 1), (4, 7)]
    assert format_heads(heads) == "3.1,4.7"


def test_without_groups_every_blind_head_drops_its_own_image_keys():
    kept = image_kv_heads([(0, 1), (1, 0), (1, 3)], heads=4, kv_heads=4, attention_layers=[0, 1])
    assert kept == {0: [0, 2, 3], 1: [1, 2]}
    assert image_kv_share(kept, 4) == pytest.approx(5 / 8)


def test_a_key_value_group_drops_the_image_only_when_all_its_query_heads_are_blind():
    # 8 query heads over 2 key/value heads: heads 0-3 read kv 0, heads 4-7 read kv 1
    kept = image_kv_heads([(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)], heads=8, kv_heads=2, attention_layers=[0])
    assert kept == {0: [1]}
    assert image_kv_share(kept, 2) == 0.5


def test_layers_without_softmax_attention_are_not_counted():
    kept = image_kv_heads([], heads=2, kv_heads=2, attention_layers=[3, 7])
    assert kept == {3: [0, 1], 7: [0, 1]}
    assert image_kv_share(kept, 2) == 1.0


def test_heads_that_do_not_split_into_groups_are_refused():
    with pytest.raises(ValueError, match="do not split"):
        image_kv_heads([], heads=6, kv_heads=4, attention_layers=[0])
