"""Alignments from attention: choosing maps, hard links, sub-words, specials and Pharaoh files."""

import numpy as np
import pytest

from attnx.interpret.alignments import (
    GoldAlignment,
    argmax_links,
    argmax_positions,
    cross_attention,
    cross_attention_layers,
    cross_attention_maps,
    lengths_to_mask,
    merge_subwords,
    read_pharaoh,
    real_token_mask,
    sentencepiece_word_ids,
    soft_alignment,
    threshold_links,
    to_pharaoh,
    trim_special_tokens,
    word_argmax_links,
    write_pharaoh,
)


def transformer_weights():
    """2 layers x 3 heads, b=1, t=2, s=3; every entry distinct so that selections are checkable."""
    cross = np.arange(2 * 3 * 2 * 3, dtype=np.float64).reshape(2, 1, 3, 2, 3)
    return {
        "encoder/layer_0/self_attention": np.zeros((1, 3, 3, 3)),
        "decoder/layer_0/self_attention": np.zeros((1, 3, 2, 2)),
        "decoder/layer_0/cross_attention": cross[0],
        "decoder/layer_1/self_attention": np.zeros((1, 3, 2, 2)),
        "decoder/layer_1/cross_attention": cross[1],
        "alignment": cross[1].mean(axis=1),
    }, cross


# ---------------------------------------------------------------- choosing maps


def test_cross_attention_picks_layers_and_heads():
    weights, cross = transformer_weights()
    # Default: the last layer, heads averaged (what the Transformer's 'alignment' is).
    np.testing.assert_allclose(cross_attention(weights), weights["alignment"])
    np.testing.assert_allclose(cross_attention(weights, layer=0, head=2), cross[0][:, 2])
    np.testing.assert_allclose(cross_attention(weights, layer=1, reduce="max"), cross[1][:, 2])
    np.testing.assert_allclose(
        cross_attention(weights, layer="all"), (cross[0].mean(1) + cross[1].mean(1)) / 2
    )
    np.testing.assert_allclose(
        cross_attention(weights, layer="all", head=1), (cross[0][:, 1] + cross[1][:, 1]) / 2
    )
    assert cross_attention(weights).shape == (1, 2, 3)


def test_a_missing_layer_or_head_names_what_exists():
    weights, _ = transformer_weights()
    with pytest.raises(ValueError, match=r"layer 2 does not exist; available layers: \[0, 1\]"):
        cross_attention(weights, layer=2)
    with pytest.raises(
        ValueError, match=r"head 3 does not exist in layer 1, which has heads \[0, 1, 2\]"
    ):
        cross_attention(weights, head=3)
    with pytest.raises(ValueError, match="reduce must be one of"):
        cross_attention(weights, reduce="median")
    with pytest.raises(ValueError, match=r"no cross-attention.*keys: \['encoder/layer_0"):
        cross_attention({"encoder/layer_0/self_attention": np.zeros((1, 1, 2, 2))})


def test_single_head_and_single_layer_models():
    rng = np.random.default_rng(0)
    # ConvS2S: single-head maps, attention only in some layers (here 1 and 3).
    convs2s = {
        "decoder/layer_1/attention": rng.random((2, 4, 5)),
        "decoder/layer_3/attention": rng.random((2, 4, 5)),
        "alignment": rng.random((2, 4, 5)),
    }
    assert list(cross_attention_layers(convs2s)) == [1, 3]
    np.testing.assert_allclose(cross_attention(convs2s), convs2s["decoder/layer_3/attention"])
    np.testing.assert_allclose(
        cross_attention(convs2s, layer=1, head=0), convs2s["decoder/layer_1/attention"]
    )
    with pytest.raises(ValueError, match=r"available layers: \[1, 3\]"):
        cross_attention(convs2s, layer=0)
    with pytest.raises(ValueError, match=r"which has heads \[0\]"):
        cross_attention(convs2s, head=1)
    # RNN and captioner: one attention, layer 0 head 0.
    for key in ("decoder/attention", "decoder/spatial_attention"):
        single = {key: rng.random((2, 4, 6)), "alignment": rng.random((2, 4, 6))}
        assert list(cross_attention_maps(single)) == [(0, 0)]
        np.testing.assert_allclose(cross_attention(single, layer=0, head=0), single[key])


def test_cross_attention_maps_lists_every_layer_and_head():
    weights, cross = transformer_weights()
    maps = cross_attention_maps(weights)
    assert list(maps) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    np.testing.assert_allclose(maps[(1, 2)], cross[1][:, 2])


# ---------------------------------------------------------------- hard and soft links


def test_argmax_and_threshold_links_respect_masks():
    attention = np.array(
        [
            # Example 0: 2 real targets, 3 real source tokens (+ eos column, padding row).
            [[0.1, 0.7, 0.1, 0.1], [0.5, 0.1, 0.35, 0.05], [0.0, 0.0, 0.0, 1.0]],
            # Example 1: 1 real source token; the padding column has the largest weight.
            [[0.2, 0.0, 0.0, 0.8], [0.3, 0.0, 0.0, 0.7], [1.0, 0.0, 0.0, 0.0]],
        ]
    )
    source_mask = lengths_to_mask(np.array([3, 1]), 4)
    target_mask = lengths_to_mask(np.array([2, 3]), 3)
    np.testing.assert_array_equal(
        argmax_positions(attention, source_mask, target_mask), [[1, 0, -1], [0, 0, 0]]
    )
    assert argmax_links(attention, source_mask, target_mask) == [
        {(1, 0), (0, 1)},
        {(0, 0), (0, 1), (0, 2)},
    ]
    assert threshold_links(attention, 0.3, source_mask, target_mask) == [
        {(1, 0), (0, 1), (2, 1)},
        {(0, 1), (0, 2)},
    ]
    soft = soft_alignment(attention, source_mask, target_mask)
    assert soft[0, 2].sum() == 0 and soft[0, :, 3].sum() == 0 and soft[0, 1, 2] == 0.35


def test_shapes_that_disagree_are_refused():
    attention = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"source_mask \(2, 5\)"):
        argmax_links(attention, np.ones((2, 5), bool), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"must be \[b, t, s\]"):
        argmax_links(np.zeros((3, 4)), np.ones((2, 4), bool), np.ones((2, 3), bool))


# ---------------------------------------------------------------- special tokens


def test_trim_special_tokens_keeps_the_tokenizer_tokens():
    # Source [x0 x1 x2 eos pad], target [y0 y1 eos pad] (teacher forcing rows).
    source_ids = np.array([7, 8, 9, 2, 0])
    target_ids = np.array([5, 6, 2, 0])
    np.testing.assert_array_equal(real_token_mask(source_ids), [1, 1, 1, 0, 0])
    # A decoded row: bos skipped, everything after the first eos dropped.
    np.testing.assert_array_equal(real_token_mask(np.array([1, 5, 2, 6, 0])), [0, 1, 0, 0, 0])
    attention = np.arange(20.0).reshape(4, 5)
    np.testing.assert_array_equal(
        trim_special_tokens(attention, source_ids, target_ids), [[0, 1, 2], [5, 6, 7]]
    )
    with pytest.raises(ValueError, match=r"attention \(4, 5\) must be \[t, s\].*\(4, 4\)"):
        trim_special_tokens(attention, source_ids[:4], target_ids)


# ---------------------------------------------------------------- sub-words


def test_merge_subwords_sums_source_pieces_and_averages_target_pieces():
    # Source '▁un believ able ▁day </s>' = words [unbelievable, day]; target
    # '▁jour ▁in croy able </s>' = words [jour, incroyable].
    source_words = sentencepiece_word_ids(["▁un", "believ", "able", "▁day", "</s>"])
    target_words = sentencepiece_word_ids(["▁jour", "▁in", "croy", "able", "</s>"])
    np.testing.assert_array_equal(source_words, [0, 0, 0, 1, -1])
    np.testing.assert_array_equal(target_words, [0, 1, 1, 1, -1])
    attention = np.array(
        [
            [0.1, 0.0, 0.1, 0.7, 0.1],  # jour: word sums 0.2, 0.7
            [0.3, 0.2, 0.1, 0.3, 0.1],  # in: 0.6, 0.3 (a piece-level tie 0.3 / 0.3)
            [0.2, 0.4, 0.2, 0.1, 0.1],  # croy: 0.8, 0.1
            [0.1, 0.1, 0.6, 0.1, 0.1],  # able: 0.8, 0.1
            [0.0, 0.0, 0.0, 0.0, 1.0],  # eos: no word
        ]
    )
    # incroyable = mean of its 3 rows: (0.6 + 0.8 + 0.8) / 3 = 2.2/3, (0.3 + 0.1 + 0.1) / 3 = 0.5/3.
    np.testing.assert_allclose(
        merge_subwords(attention, source_words, target_words), [[0.2, 0.7], [2.2 / 3, 0.5 / 3]]
    )
    # (source word, target word): jour <- day, incroyable <- unbelievable.
    assert word_argmax_links(attention, source_words, target_words) == {(1, 0), (0, 1)}
    with pytest.raises(ValueError, match=r"words \[1\] have no token"):
        merge_subwords(attention, np.array([0, 0, 2, 2, -1]), target_words)
    with pytest.raises(ValueError, match=r"attention \(5, 5\) must be \[t, s\]"):
        merge_subwords(attention, source_words[:4], target_words)


# ---------------------------------------------------------------- Pharaoh files


def test_pharaoh_round_trip(tmp_path):
    assert to_pharaoh({(2, 1), (0, 0), (0, 3)}) == "0-0 0-3 2-1"
    assert to_pharaoh([(0, 0)], possible=[(0, 0), (1, 2)]) == "0-0 1?2"
    alignments = [
        GoldAlignment(sure=frozenset({(0, 0), (2, 1)}), possible=frozenset({(1, 2)})),
        GoldAlignment(frozenset(), frozenset()),
        {(3, 4), (1, 1)},
    ]
    path = tmp_path / "links.txt"
    write_pharaoh(path, alignments)
    assert path.read_text() == "0-0 1?2 2-1\n\n1-1 3-4\n"
    read = read_pharaoh(path, index_base=0)
    assert read[:2] == alignments[:2]
    assert read[0].possible == {(0, 0), (2, 1), (1, 2)}  # P includes S
    assert read[2].sure == alignments[2] and read[2].possible == alignments[2]


def test_zero_and_one_based_files_give_the_same_links(tmp_path):
    zero = tmp_path / "zero.txt"
    one = tmp_path / "one.txt"
    # Both suffix styles: 'i?j' and 'i-j-P' possible, 'i-j' and 'i-j-S' sure.
    zero.write_text("0-0 1?2 2-1-S 0-1-P\n\n1-1\n")
    one.write_text("1-1 2?3 3-2-S 1-2-P\n\n2-2\n")
    expected = [
        GoldAlignment(frozenset({(0, 0), (2, 1)}), frozenset({(1, 2), (0, 1)})),
        GoldAlignment(frozenset(), frozenset()),
        GoldAlignment(frozenset({(1, 1)}), frozenset()),
    ]
    assert read_pharaoh(zero, index_base=0) == expected
    assert read_pharaoh(one, index_base=1) == expected
    # The same file read with the other base shifts every link: the base is never guessed.
    assert read_pharaoh(one, index_base=0)[2].sure == {(2, 2)}
    with pytest.raises(TypeError):
        read_pharaoh(one)  # index_base is required
    with pytest.raises(ValueError, match="index_base must be 0 or 1"):
        read_pharaoh(one, index_base=2)


def test_pharaoh_errors_name_file_and_line(tmp_path):
    path = tmp_path / "gold.txt"
    path.write_text("0-0 1-2\n1-1 3-x\n")
    with pytest.raises(ValueError, match=r"gold.txt:2: '3-x' is not i-j"):
        read_pharaoh(path, index_base=0)
    path.write_text("1-1\n2-2 0-3\n")
    with pytest.raises(ValueError, match=r"gold.txt:2: '0-3' has index 0 .*1-based.*looks 0-based"):
        read_pharaoh(path, index_base=1)
    path.write_text("1-2-X\n")
    with pytest.raises(ValueError, match=r"gold.txt:1: '1-2-X' is not"):
        read_pharaoh(path, index_base=0)
