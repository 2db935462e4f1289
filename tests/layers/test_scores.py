"""Score functions against the papers' formulas written with NumPy loops."""

import jax
import numpy as np
import pytest

from attnx.layers import scores

B, T, S, H, D = 2, 3, 4, 2, 5


@pytest.fixture(scope="module")
def qk():
    rng = np.random.default_rng(0)
    return rng.normal(size=(B, T, H, D)).astype(np.float32), rng.normal(size=(B, S, H, D)).astype(
        np.float32
    )


def loop(fn):
    out = np.zeros((B, H, T, S))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for s in range(S):
                    out[b, h, t, s] = fn(b, h, t, s)
    return out


def test_dot_and_scaled(qk):
    q, k = qk
    want = loop(lambda b, h, t, s: q[b, t, h] @ k[b, s, h])
    np.testing.assert_allclose(scores.dot_scores(q, k), want, atol=1e-5)
    np.testing.assert_allclose(scores.scaled_dot_scores(q, k), want / np.sqrt(D), atol=1e-5)


def test_general(qk):
    q, k = qk
    w = np.random.default_rng(1).normal(size=(H, D, D)).astype(np.float32)
    want = loop(lambda b, h, t, s: q[b, t, h] @ w[h] @ k[b, s, h])
    np.testing.assert_allclose(scores.general_scores(q, k, w), want, atol=1e-4)
    with pytest.raises(ValueError, match="kernel"):
        scores.general_scores(q, k, w[:, :2])


def test_additive(qk):
    q, k = qk
    v = np.random.default_rng(2).normal(size=(H, D)).astype(np.float32)
    want = loop(lambda b, h, t, s: v[h] @ np.tanh(q[b, t, h] + k[b, s, h]))
    np.testing.assert_allclose(scores.additive_scores(q, k, v), want, atol=1e-5)


def test_location(qk):
    q, _ = qk
    w = np.random.default_rng(3).normal(size=(H, D, 10)).astype(np.float32)
    want = loop(lambda b, h, t, s: (q[b, t, h] @ w[h])[s])
    np.testing.assert_allclose(scores.location_scores(q, w, S), want, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        scores.location_scores(q, w, 11)


def test_shape_errors_name_the_problem(qk):
    q, k = qk
    with pytest.raises(ValueError, match="batch, length, heads"):
        scores.dot_scores(q[0], k)
    with pytest.raises(ValueError, match="heads"):
        scores.dot_scores(q, k[:, :, :1])
    assert jax.jit(scores.dot_scores)(q, k).shape == (B, H, T, S)
