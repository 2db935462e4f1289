"""softmax, sparsemax and entmax-1.5 against closed forms and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnx.layers import normalizers

SPARSE = [normalizers.sparsemax, normalizers.entmax15]


def numpy_sparsemax(z):
    """Martins & Astudillo (2016), Algorithm 1, one row."""
    z_sorted = np.sort(z)[::-1]
    cumulative = np.cumsum(z_sorted)
    k = np.arange(1, len(z) + 1)
    support = k[1 + k * z_sorted > cumulative].max()
    tau = (cumulative[support - 1] - 1) / support
    return np.maximum(z - tau, 0)


def bisection_entmax15(z, iterations=200):
    """alpha-entmax by bisection on tau (Peters et al. 2019, eq. 9): p = [z/2 - tau]_+^2."""
    x = z / 2
    lo, hi = x.max() - 1.0, x.max()
    for _ in range(iterations):
        tau = (lo + hi) / 2
        if np.sum(np.maximum(x - tau, 0) ** 2) > 1:
            lo = tau
        else:
            hi = tau
    return np.maximum(x - (lo + hi) / 2, 0) ** 2


def test_sparsemax_hand_computed_cases():
    # z = (1, 0): tau = 0 -> (1, 0). z = (0.5, 0.2, 0.1): all in support, tau = -0.2/3.
    np.testing.assert_allclose(normalizers.sparsemax(jnp.array([1.0, 0.0])), [1.0, 0.0])
    np.testing.assert_allclose(
        normalizers.sparsemax(jnp.array([0.5, 0.2, 0.1])),
        [0.5 + 0.2 / 3, 0.2 + 0.2 / 3, 0.1 + 0.2 / 3],
        atol=1e-6,
    )
    # z = (2, 1, -1): support {0, 1}: tau = (3 - 1)/2 = 1 -> (1, 0, 0)... 1 + 2*1 = 3 > 3 fails.
    np.testing.assert_allclose(normalizers.sparsemax(jnp.array([2.0, 1.0, -1.0])), [1, 0, 0])
    np.testing.assert_allclose(
        normalizers.sparsemax(jnp.array([1.2, 1.0, -1.0])), [0.6, 0.4, 0.0], atol=1e-6
    )


def test_entmax15_hand_computed_cases():
    # Two equal scores share the mass: p = (1/2, 1/2).
    np.testing.assert_allclose(normalizers.entmax15(jnp.array([3.0, 3.0])), [0.5, 0.5], atol=1e-6)
    # z = (2, 0): x = (1, 0); one-element support p = (1 - tau)^2 = 1 -> tau = 0, so 0 is out.
    np.testing.assert_allclose(normalizers.entmax15(jnp.array([2.0, 0.0])), [1.0, 0.0], atol=1e-6)
    # z = (1, 0): x = (0.5, 0): (0.5 - tau)^2 + (-tau)^2 = 1 -> tau = (0.5 - sqrt(1.75)) / 2.
    tau = (0.5 - np.sqrt(1.75)) / 2
    np.testing.assert_allclose(
        normalizers.entmax15(jnp.array([1.0, 0.0])), [(0.5 - tau) ** 2, tau**2], atol=1e-6
    )


@pytest.mark.parametrize("seed", range(3))
def test_random_rows_match_independent_algorithms(seed):
    z = np.random.default_rng(seed).normal(size=(6, 9)) * 2
    got_sparse = np.asarray(normalizers.sparsemax(jnp.asarray(z)))
    got_entmax = np.asarray(normalizers.entmax15(jnp.asarray(z)))
    for row in range(6):
        np.testing.assert_allclose(got_sparse[row], numpy_sparsemax(z[row]), atol=1e-5)
        np.testing.assert_allclose(got_entmax[row], bisection_entmax15(z[row]), atol=1e-5)
    for weights in (got_sparse, got_entmax):
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert (weights == 0).any(), "scaled normal scores should give exact zeros"


@pytest.mark.parametrize("fn", [normalizers.softmax, *SPARSE])
def test_masked_entries_and_empty_rows(fn):
    z = jnp.array([[0.3, 2.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    mask = jnp.array([[True, False, True, True], [False] * 4])
    weights = np.asarray(fn(z, mask))
    assert weights[0, 1] == 0.0
    np.testing.assert_allclose(weights[0].sum(), 1.0, atol=1e-6)
    np.testing.assert_array_equal(weights[1], 0.0)
    # The masked row equals the normalizer over the allowed entries only.
    np.testing.assert_allclose(
        weights[0, [0, 2, 3]], np.asarray(fn(z[0, jnp.array([0, 2, 3])])), atol=1e-6
    )
    grads = jax.grad(lambda z: jnp.sum(fn(z, mask) * jnp.arange(4.0)))(z)
    assert np.isfinite(np.asarray(grads)).all()
    np.testing.assert_array_equal(np.asarray(grads)[1], 0.0)


def test_huge_masked_scores_do_not_poison_gradients():
    z = jnp.array([[1.0, 1e30, 0.0]])
    mask = jnp.array([[True, False, True]])
    grads = jax.grad(lambda z: jnp.sum(normalizers.softmax(z, mask)[:, 0]))(z)
    assert np.isfinite(np.asarray(grads)).all()


@pytest.mark.parametrize("fn", SPARSE)
def test_gradients_by_finite_differences(fn):
    # Away from support changes, where the maps are differentiable.
    z = jnp.array([[0.9, 0.1, -0.8, 0.35], [0.2, -0.3, 0.05, 1.5]])
    mask = jnp.array([[True, True, True, True], [True, True, False, True]])
    check_grads(lambda z: fn(z, mask), (z,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fn", SPARSE)
def test_jacobian_matches_closed_form(fn):
    z = jnp.array([0.9, 0.1, -0.8, 0.35])
    p = np.asarray(fn(z))
    jac = np.asarray(jax.jacobian(fn)(z))
    if fn is normalizers.sparsemax:
        s = (p > 0).astype(float)
        want = np.diag(s) - np.outer(s, s) / s.sum()
    else:
        g = np.sqrt(p)
        want = np.diag(g) - np.outer(g, g) / g.sum()
    np.testing.assert_allclose(jac, want, atol=1e-5)


def test_unknown_normalizer_is_named():
    with pytest.raises(ValueError, match="'softermax'"):
        normalizers.get_normalizer("softermax")
