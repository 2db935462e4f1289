"""One example's weights dict as labelled maps: kinds, layers, heads, trimming to the labels."""

import numpy as np
import pytest

from attnx.interpret.example_views import example_maps, kind_of


@pytest.mark.parametrize(
    "key, expected",
    [
        ("encoder/layer_0/self_attention", ("encoder-self", 0)),
        ("decoder/layer_11/self_attention", ("decoder-self", 11)),
        ("decoder/layer_2/cross_attention", ("cross", 2)),
        ("decoder/layer_3/attention", ("multi-step", 3)),
        ("decoder/attention", ("global", 0)),
        ("decoder/spatial_attention", ("spatial", 0)),
        ("alignment", None),
        ("gate", None),
    ],
)
def test_kind_of_every_key_the_models_return(key, expected):
    assert kind_of(key) == expected


def test_maps_are_trimmed_to_the_labels_per_head_and_mean():
    rng = np.random.default_rng(0)
    weights = {
        # float32, as the models return them.
        "decoder/layer_10/cross_attention": rng.random((2, 6, 7), np.float32),
        "decoder/layer_9/cross_attention": rng.random((2, 6, 7), np.float32),
        "encoder/layer_0/self_attention": rng.random((2, 7, 7), np.float32),
        "decoder/layer_0/self_attention": rng.random((2, 6, 6), np.float32),
        "alignment": rng.random((6, 7)),
    }
    source, target = ["a", "b", "</s>"], ["x", "</s>"]
    maps = example_maps(weights, source, target)
    assert [(m.name, m.head) for m in maps][:3] == [
        ("encoder/layer_0/self_attention", 0),
        ("encoder/layer_0/self_attention", 1),
        ("encoder/layer_0/self_attention", "mean"),
    ]
    names = [m.name for m in maps if m.head == "mean"]
    # Encoder first, then the decoder's layers in numeric order (9 before 10).
    assert names == [
        "encoder/layer_0/self_attention",
        "decoder/layer_0/self_attention",
        "decoder/layer_9/cross_attention",
        "decoder/layer_10/cross_attention",
    ]
    cross = next(m for m in maps if m.name.endswith("9/cross_attention") and m.head == 1)
    np.testing.assert_array_equal(
        cross.weights, weights["decoder/layer_9/cross_attention"][1, :2, :3]
    )
    mean = next(m for m in maps if m.name.endswith("9/cross_attention") and m.head == "mean")
    np.testing.assert_allclose(
        mean.weights, weights["decoder/layer_9/cross_attention"][:, :2, :3].mean(0), rtol=1e-6
    )
    self_map = next(m for m in maps if m.kind == "decoder-self")
    assert list(self_map.key_labels) == ["<s>", "x"] and list(self_map.query_labels) == target


def test_a_map_smaller_than_its_labels_is_an_error():
    with pytest.raises(ValueError, match="decoder/attention"):
        example_maps({"decoder/attention": np.ones((1, 2))}, ["a", "b", "</s>"], ["x", "</s>"])
