"""Pointing totals over batches: corpus-level sums, the best head, and the named maps."""

import numpy as np

from attnx.interpret.alignment_scores import span_pointing
from attnx.interpret.pointing_totals import PointingTotals


def one_hot(positions, s):
    """[b, t, s] attention with all weight on `positions` [b, t]."""
    positions = np.asarray(positions)
    return np.eye(s)[positions]


def weights_dict(head_maps):
    """A Transformer-style weights dict: layer 0 with the given heads [b, t, s] each."""
    return {"decoder/layer_0/cross_attention": np.stack(head_maps, axis=1)}


def test_totals_over_two_batches_equal_one_batch_of_both():
    s = 5
    start = np.array([[0, 2], [1, 3]])
    end = start + 1
    mask = np.ones((2, s), bool)
    right = one_hot(start, s)
    wrong = one_hot((start + 1) % s, s)
    totals = PointingTotals()
    for rows in (slice(0, 1), slice(1, 2)):

        def score(attention, rows=rows):
            return span_pointing(attention, start[rows], end[rows], mask[rows])

        totals.add_weights(weights_dict([wrong[rows], right[rows]]), score)
        totals.add("rollout", right[rows], score)
    whole = span_pointing(right, start, end, mask)
    assert totals.heads[(0, 1)].hits == whole.hits == 4 and totals.heads[(0, 0)].hits == 0
    (layer, head), best = totals.best()
    assert (layer, head) == (0, 1) and best.accuracy == 1.0
    table = totals.as_dict()
    assert list(table) == ["layer_0/head_0", "layer_0/head_1", "rollout"]
    assert table["rollout"]["accuracy"] == 1.0 and table["layer_0/head_0"]["accuracy"] == 0.0
    assert totals.grid() == {(0, 0): 0.0, (0, 1): 1.0}


def test_no_scored_token_has_no_best():
    assert PointingTotals().best() is None
    assert PointingTotals().as_dict() == {}
