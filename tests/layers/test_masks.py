"""Mask builders against loops written out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnx.layers import masks


def test_padding_mask():
    q_valid = np.array([[1, 1, 0]])
    k_valid = np.array([[1, 0, 1, 1]])
    got = np.asarray(masks.padding_mask(q_valid, k_valid))
    assert got.shape == (1, 1, 3, 4)
    for i in range(3):
        for j in range(4):
            assert got[0, 0, i, j] == bool(q_valid[0, i] and k_valid[0, j])
    assert masks.padding_mask(None, k_valid).shape == (1, 1, 1, 4)


@pytest.mark.parametrize("offset", [0, 3])
def test_causal_mask(offset):
    got = np.asarray(masks.causal_mask(3, 6, offset=offset))[0, 0]
    want = np.array([[j <= i + offset for j in range(6)] for i in range(3)])
    np.testing.assert_array_equal(got, want)


def test_segment_mask_keeps_segments_apart_and_drops_padding():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    got = np.asarray(masks.segment_mask(seg))[0, 0]
    s = np.asarray(seg)[0]
    want = np.array([[s[i] == s[j] and s[i] > 0 for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("window", [1, (2, 0), (0, 1)])
def test_local_window_mask(window):
    left, right = (window, window) if isinstance(window, int) else window
    got = np.asarray(masks.local_window_mask(5, 7, window, offset=1))[0, 0]
    want = np.array([[i + 1 - left <= j <= i + 1 + right for j in range(7)] for i in range(5)])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="window"):
        masks.local_window_mask(3, 3, (-1, 2))


def test_combine_and_bias():
    a = masks.causal_mask(4)
    b = masks.padding_mask(None, jnp.array([[1, 1, 1, 0]]))
    combined = masks.combine_masks(a, None, b)
    np.testing.assert_array_equal(np.asarray(combined), np.asarray(a) & np.asarray(b))
    assert masks.combine_masks(None, None) is None
    bias = np.asarray(masks.mask_to_bias(combined))
    assert (bias[np.asarray(combined)] == 0).all()
    assert np.isfinite(bias).all() and (bias[~np.asarray(combined)] < -1e30).all()
    # Two biases added do not overflow.
    assert np.isfinite(bias + bias).all()
