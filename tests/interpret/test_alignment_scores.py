"""Scoring attention against gold: AER, span and box pointing, sweeps, the dates format."""

import datetime

import numpy as np
import pytest

from attnx.interpret.alignment_scores import (
    DATES_TARGET_FIELDS,
    DATES_TARGET_LENGTH,
    AlignmentScores,
    alignment_scores,
    box_pointing,
    cell_pixel_boxes,
    char_spans_to_byte_spans,
    dates_span_gold,
    span_pointing,
    sweep_alignment_error,
    sweep_box_pointing,
    sweep_span_pointing,
    tokens_in,
)
from attnx.interpret.alignments import GoldAlignment, lengths_to_mask

# ---------------------------------------------------------------- AER


def gold(sure, possible=()):
    return GoldAlignment(frozenset(sure), frozenset(possible))


def test_aer_precision_recall_by_hand():
    # S = {0-0, 1-1, 2-2}; P = S + {2-3, 3-3}; A = {0-0, 1-1, 2-3, 3-2}.
    # |A| = 4, |S| = 3, A∩S = {0-0, 1-1} (2), A∩P = {0-0, 1-1, 2-3} (3).
    # precision = 3/4, recall = 2/3, AER = 1 - (2 + 3)/(4 + 3) = 2/7.
    reference = gold({(0, 0), (1, 1), (2, 2)}, {(2, 3), (3, 3)})
    predicted = {(0, 0), (1, 1), (2, 3), (3, 2)}
    scores = alignment_scores([predicted], [reference])
    assert scores == AlignmentScores(predicted=4, sure=3, predicted_sure=2, predicted_possible=3)
    assert scores.precision == pytest.approx(3 / 4)
    assert scores.recall == pytest.approx(2 / 3)
    assert scores.aer == pytest.approx(2 / 7)
    # A perfect prediction of S: AER 0 (P links may be left out).
    assert alignment_scores([reference.sure], [reference]).aer == 0.0


def test_aer_is_corpus_level():
    # Sentence 2 is perfect: |A| = |S| = |A∩S| = |A∩P| = 1. Summed counts:
    # |A| = 5, |S| = 4, A∩S = 3, A∩P = 4 -> precision 4/5, recall 3/4,
    # AER = 1 - 7/9 = 2/9, not the mean (2/7 + 0)/2 = 1/7 of sentence AERs.
    references = [gold({(0, 0), (1, 1), (2, 2)}, {(2, 3), (3, 3)}), gold({(0, 0)})]
    predicted = [{(0, 0), (1, 1), (2, 3), (3, 2)}, {(0, 0)}]
    scores = alignment_scores(predicted, references)
    assert (scores.precision, scores.recall) == pytest.approx((4 / 5, 3 / 4))
    assert scores.aer == pytest.approx(2 / 9)
    # Counts add up across batches.
    total = alignment_scores(predicted[:1], references[:1]) + alignment_scores(
        predicted[1:], references[1:]
    )
    assert total == scores
    with pytest.raises(ValueError, match="2 predicted alignments but 1 gold"):
        alignment_scores(predicted, references[:1])


# ---------------------------------------------------------------- spans


def test_span_pointing_and_mass_by_hand():
    attention = np.array(
        [
            [
                [0.3, 0.3, 0.4, 0.0, 0.0],  # span [0, 2): argmax 2 misses; mass 0.6
                [0.0, 0.0, 0.0, 0.0, 1.0],  # no span: not scored
                [0.1, 0.0, 0.0, 0.5, 0.4],  # span [3, 5): argmax 3 hits; mass 0.9
            ]
        ]
    )
    start, end = np.array([[0, -1, 3]]), np.array([[2, -1, 5]])
    source_mask = np.ones((1, 5), bool)
    scores = span_pointing(attention, start, end, source_mask, fields=("a", None, "b"))
    assert (scores.count, scores.hits) == (2, 1)
    assert (scores.accuracy, scores.mass) == pytest.approx((0.5, 0.75))
    assert (scores.by_field["a"].accuracy, scores.by_field["a"].mass) == pytest.approx((0.0, 0.6))
    assert (scores.by_field["b"].accuracy, scores.by_field["b"].mass) == pytest.approx((1.0, 0.9))
    assert scores.worst_field_accuracy == 0.0
    # A span leaving the real source (4 tokens) is refused, as are shapes that disagree.
    with pytest.raises(ValueError, match=r"example 0, target token 2: span \[3, 5\).*4 real"):
        span_pointing(attention, start, end, lengths_to_mask(np.array([4]), 5))
    with pytest.raises(ValueError, match=r"needs start and end \[b, t\]; got start \(1, 2\)"):
        span_pointing(attention, start[:, :2], end[:, :2], source_mask)
    with pytest.raises(ValueError, match="fields has 2 entries"):
        span_pointing(attention, start, end, source_mask, fields=("a", "b"))


def test_a_perfect_diagonal_scores_one():
    attention = np.eye(6)[None].repeat(2, axis=0)
    start = np.arange(6)[None].repeat(2, axis=0)
    scores = span_pointing(attention, start, start + 1, np.ones((2, 6), bool))
    assert (scores.count, scores.accuracy, scores.mass) == (12, 1.0, 1.0)


# ---------------------------------------------------------------- boxes


def test_cell_pixel_boxes_tile_the_image_row_major():
    cells = cell_pixel_boxes((8, 8), stride=8)
    assert cells.shape == (64, 4)
    np.testing.assert_array_equal(cells[0], [0, 0, 8, 8])
    np.testing.assert_array_equal(cells[1], [0, 8, 8, 16])  # next column
    np.testing.assert_array_equal(cells[8], [8, 0, 16, 8])  # next row
    np.testing.assert_array_equal(cells[63], [56, 56, 64, 64])
    covered = np.zeros((64, 64), int)
    for ymin, xmin, ymax, xmax in cells:
        covered[ymin:ymax, xmin:xmax] += 1
    assert np.all(covered == 1)


def test_the_digits_encoder_moves_features_one_cell_per_stride_pixels():
    # The mapping cell -> pixels of `cell_pixel_boxes`, checked on the real encoder:
    # moving the image content by one cell's pixels (stride = 8) moves the
    # features by one cell of the row-major flattening the captioner uses.
    import jax
    from flax import nnx

    from attnx.models.captioner_config import digits_small
    from attnx.models.image_encoders import ConvEncoder

    config = digits_small()
    assert config.encoder == "conv" and config.pool_last_block
    # The digits layout's blocks and pools with 4 channels each (the mapping
    # depends on the pools only). Built abstractly and filled with NumPy draws:
    # eager initialisation compiles every initializer and takes seconds. Zero
    # biases keep the blank background at exactly zero features, so that the
    # shifted images' features match exactly, borders included.
    abstract = nnx.eval_shape(
        lambda: ConvEncoder(1, [(4,)] * len(config.conv_blocks), rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: (
            rng.normal(size=x.shape).astype(x.dtype) if x.ndim == 4 else np.zeros(x.shape, x.dtype)
        ),
        state,
    )
    encoder = nnx.merge(graphdef, state)
    stride = 2**encoder.num_pools
    assert (stride, encoder.grid_shape(64, 64)) == (8, (8, 8))
    images = np.zeros((3, 64, 64, 1), np.float32)
    images[0, 20:30, 17:25] = 1.0  # a blob
    images[1, 20:30, 17 + stride : 25 + stride] = 1.0  # one cell to the right
    images[2, 20 + stride : 30 + stride, 17:25] = 1.0  # one cell down
    flat = np.asarray(nnx.jit(lambda e, x: e(x))(encoder, images)).reshape(
        3, 64, -1
    )  # as SpatialAttention flattens
    assert np.abs(flat[0]).max() > 0
    cells = cell_pixel_boxes((8, 8), stride=stride)
    right = [k for k in range(64) if k % 8 < 7]
    np.testing.assert_allclose(flat[1][[k + 1 for k in right]], flat[0][right], atol=1e-5)
    np.testing.assert_array_equal(cells[[k + 1 for k in right]] - cells[right], [[0, 8, 0, 8]] * 56)
    np.testing.assert_allclose(flat[2][8:], flat[0][:56], atol=1e-5)
    np.testing.assert_array_equal(cells[8:] - cells[:56], [[8, 0, 8, 0]] * 56)


def test_box_pointing_and_mass_by_hand():
    # A 2 x 2 grid of 4-pixel cells on an 8 x 8 image:
    # cell 0 [0,0,4,4], cell 1 [0,4,4,8], cell 2 [4,0,8,4], cell 3 [4,4,8,8].
    # Box A [0,0,4,6]: all of cell 0, half of cell 1 (x 4..6 of 4..8).
    # Box B [2,4,8,8]: half of cell 1 (y 2..4 of 0..4), all of cell 3.
    boxes = np.array([[[0, 0, 4, 6], [2, 4, 8, 8], [0, 0, 0, 0]]])  # the last row is padding
    attention = np.array(
        [
            [
                [0.2, 0.6, 0.1, 0.1],  # digit 1 (box A): argmax cell 1, centre (2, 6) is
                #                        outside A (x 6 is A's exclusive max): miss;
                #                        mass 0.2 * 1 + 0.6 * 0.5 = 0.5
                [0.25, 0.25, 0.25, 0.25],  # a separator: not scored
                [0.1, 0.2, 0.3, 0.4],  # digit 2 (box B): argmax cell 3, centre (6, 6) in B: hit;
                #                        mass 0.2 * 0.5 + 0.4 * 1 = 0.5
                [1.0, 0.0, 0.0, 0.0],  # eos: not scored
            ]
        ]
    )
    token_mask = np.array([[True, False, True, False]])
    scores = box_pointing(attention, boxes, np.array([2]), token_mask, grid_shape=(2, 2), stride=4)
    assert (scores.count, scores.hits) == (2, 1)
    assert scores.mass == pytest.approx(0.5)
    # Everything on a cell fully inside each box: 1.0.
    perfect = np.zeros_like(attention)
    perfect[0, 0, 0] = perfect[0, 2, 3] = 1.0
    scores = box_pointing(perfect, boxes, np.array([2]), token_mask, grid_shape=(2, 2), stride=4)
    assert (scores.accuracy, scores.mass) == (1.0, 1.0)
    with pytest.raises(ValueError, match=r"examples \[0\]: scored tokens \[2\] vs boxes \[3\]"):
        box_pointing(attention, boxes, np.array([3]), token_mask, grid_shape=(2, 2), stride=4)
    with pytest.raises(ValueError, match=r"L = 3 x 3"):
        box_pointing(attention, boxes, np.array([2]), token_mask, grid_shape=(3, 3), stride=4)


def test_tokens_in_selects_real_digit_tokens():
    # ids 4..13 are digits; 20 a separator; 2 eos; after eos nothing counts.
    target_ids = np.array([[4, 20, 9, 2, 5, 0]])
    np.testing.assert_array_equal(tokens_in(target_ids, range(4, 14)), [[1, 0, 1, 0, 0, 0]])


# ---------------------------------------------------------------- sweeps


def sweep_weights():
    """2 layers x 3 heads; only layer 1 head 2 attends where the gold says (b=2, t=4, s=5 with eos)."""
    rng = np.random.default_rng(0)
    order = np.array([2, 0, 3, 1])  # target t comes from source order[t]
    right = np.zeros((2, 4, 5))
    right[:, np.arange(4), order] = 0.9
    right[:, :, 4] = 0.1  # some weight on eos
    wrong = np.zeros((2, 4, 5))
    wrong[:, np.arange(4), order[::-1]] = 1.0
    layers = []
    for layer in range(2):
        heads = [wrong, rng.dirichlet(np.ones(5), size=(2, 4)), wrong]
        if layer == 1:
            heads[2] = right
        layers.append(np.stack(heads, axis=1))
    weights = {f"decoder/layer_{i}/cross_attention": layers[i] for i in range(2)}
    return weights, order


def test_the_sweep_finds_the_right_head():
    weights, order = sweep_weights()
    source_mask = lengths_to_mask(np.array([4, 4]), 5)
    target_mask = np.ones((2, 4), bool)
    references = [gold({(int(s), t) for t, s in enumerate(order)})] * 2
    by_aer = sweep_alignment_error(weights, references, source_mask, target_mask)
    assert [(e.layer, e.head) for e in by_aer.entries] == [
        (i, h) for i in range(2) for h in range(3)
    ]
    assert (by_aer.best.layer, by_aer.best.head, by_aer.best.scores.aer) == (1, 2, 0.0)
    assert "aer" in by_aer.table() and by_aer.table().splitlines()[6].endswith("*")

    start = np.tile(order, (2, 1))
    by_span = sweep_span_pointing(weights, start, start + 1, source_mask, fields=("x",) * 4)
    best = by_span.best
    assert (best.layer, best.head, best.scores.accuracy) == (1, 2, 1.0)
    assert best.scores.mass == pytest.approx(0.9)


def test_box_sweep_on_a_captioner_weights_dict():
    attention = np.zeros((1, 3, 4))
    attention[0, 0, 0] = attention[0, 1, 3] = attention[0, 2, 1] = 1.0
    weights = {"decoder/spatial_attention": attention, "gate": np.ones((1, 3))}
    boxes = np.array([[[0, 0, 4, 4], [4, 4, 8, 8]]])
    result = sweep_box_pointing(
        weights, boxes, np.array([2]), np.array([[True, True, False]]), grid_shape=(2, 2), stride=4
    )
    assert [(e.layer, e.head) for e in result.entries] == [(0, 0)]
    assert result.best.scores.accuracy == 1.0


# ---------------------------------------------------------------- the dates format


@pytest.mark.parametrize(
    "locale, pattern, date, fields",
    [
        ("de_DE", "EEEE, d. MMMM y", datetime.date(1987, 11, 23), ("1987", "November", "23")),
        ("de_DE", "dd.MM.y", datetime.date(2005, 1, 2), ("2005", "01", "02")),
        ("ja_JP", "y年M月d日", datetime.date(2005, 1, 2), ("2005", "1", "2")),
        ("en_US", "M/d/yy", datetime.date(2005, 1, 2), ("05", "1", "2")),
        ("ru_RU", "d MMMM y\u202f'г'.", datetime.date(2005, 1, 2), ("2005", "января", "2")),
    ],
)
def test_dates_spans_point_at_the_written_fields(locale, pattern, date, fields):
    from attnx.data import dates

    assert dates.TARGET_LENGTH == DATES_TARGET_LENGTH
    source, alignment_start, alignment_end = dates.format_with_alignment(
        date, dates.parse_date_pattern(locale, pattern)
    )
    target = date.isoformat()
    # Maps of a teacher-forced model: 10 characters + eos rows, len(source) + eos columns.
    start, end, names = dates_span_gold(alignment_start[None], alignment_end[None], 11)
    assert names == DATES_TARGET_FIELDS + (None,)
    written = dict(zip(("year", "month", "day"), fields, strict=True))
    for t, name in enumerate(names):
        if name is None:
            assert start[0, t] == -1  # dashes and eos: not scored
        else:
            assert source[start[0, t] : end[0, t]] == written[name], (t, name)
    assert target[4] == target[7] == "-" and names[4] is names[7] is None

    # Character tokens: source position j is character j (no bos, eos last).
    source_mask = lengths_to_mask(np.array([len(source)]), len(source) + 1)
    attention = np.zeros((1, 11, len(source) + 1))
    attention[0, :, -1] = 1.0  # rows without a span look at eos
    for t in np.flatnonzero(start[0] >= 0):
        attention[0, t] = 0.0
        attention[0, t, start[0, t] : end[0, t]] = 1.0 / (end[0, t] - start[0, t])
    scores = span_pointing(attention, start, end, source_mask, fields=names)
    assert scores.count == 8
    assert {name: s.count for name, s in scores.by_field.items()} == {
        "year": 4,
        "month": 2,
        "day": 2,
    }
    assert (scores.worst_field_accuracy, scores.mass) == (1.0, pytest.approx(1.0))


def test_dates_span_gold_refuses_other_shapes():
    start = np.array([[0, 0, 0, 0, -1, 5, 5, -1, 7, 7]])
    end = start + 1
    with pytest.raises(ValueError, match="target_length 9 < the 10"):
        dates_span_gold(start, end, 9)
    with pytest.raises(ValueError, match=r"must be \[b, 10\]"):
        dates_span_gold(start[:, :9], end[:, :9], 11)
    broken = start.copy()
    broken[0, 4] = 3  # a dash with a span
    with pytest.raises(ValueError, match="not the dates alignment format"):
        dates_span_gold(broken, end, 11)


def test_char_spans_to_byte_spans():
    # 'é' takes 2 UTF-8 bytes, '日' 3: character 2 starts at byte 3, character 3 at byte 6.
    start, end = char_spans_to_byte_spans("aé日5", np.array([0, 2, -1]), np.array([2, 4, -1]))
    np.testing.assert_array_equal(start, [0, 3, -1])
    np.testing.assert_array_equal(end, [3, 7, -1])
