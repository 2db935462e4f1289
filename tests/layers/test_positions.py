"""Position encodings against the papers' formulas written out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.layers import positions as positions_lib
from attnx.layers.positions import LearnedPositions, RelativePositionBias, SinusoidalPositions

# Jitted once per shape: eager dispatch compiles every small op separately, which is slower.
sinusoidal_positions = jax.jit(positions_lib.sinusoidal_positions, static_argnums=(0, 1))
apply_rotary = jax.jit(positions_lib.apply_rotary, static_argnames="base")
relative_position_bucket = jax.jit(
    positions_lib.relative_position_bucket,
    static_argnames=("bidirectional", "num_buckets", "max_distance"),
)

# ---------------------------------------------------------------- sinusoidal


@pytest.mark.parametrize("dim", [8, 7])
def test_sinusoidal_matches_paper_formula(dim):
    got = np.asarray(sinusoidal_positions(11, dim))
    want = np.zeros((11, dim))
    for pos in range(11):
        for j in range(dim):
            i = j // 2  # feature j = 2i (sin) or 2i + 1 (cos)
            angle = pos / 10000 ** (2 * i / dim)
            want[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sinusoidal_explicit_positions_for_packed_sequences_and_decode():
    table = np.asarray(sinusoidal_positions(10, 6))
    positions = np.array([[0, 1, 2, 0, 1], [4, 5, 6, 7, 8]])
    got = np.asarray(sinusoidal_positions(5, 6, positions=positions))
    np.testing.assert_allclose(got, table[positions], atol=1e-6)
    with pytest.raises(ValueError, match="length=4"):
        positions_lib.sinusoidal_positions(4, 6, positions=positions)
    with pytest.raises(ValueError, match="integers"):
        positions_lib.sinusoidal_positions(None, 6, positions=positions.astype(float))


def test_sinusoidal_module_adds_encoding_and_decode_step_equals_full_pass():
    module = SinusoidalPositions(6)
    x = np.random.default_rng(0).standard_normal((2, 5, 6), np.float32)
    full = jax.jit(module)(x)
    np.testing.assert_allclose(
        full - x, np.broadcast_to(sinusoidal_positions(5, 6), x.shape), atol=1e-6
    )
    step = jax.jit(lambda x, p: module(x, p))(x[:, 3:4], jnp.full((2, 1), 3))
    np.testing.assert_allclose(step, full[:, 3:4], atol=1e-6)
    with pytest.raises(ValueError, match="dim 5"):
        module(x[..., :5])


# ------------------------------------------------------------------- learned


def test_learned_positions_lookup_axes_and_decode():
    module = LearnedPositions(8, 4, rngs=nnx.Rngs(0))
    assert module.embedding.out_sharding == ("positions", "embed")
    table = np.asarray(module.embedding[...])
    x = np.random.default_rng(1).standard_normal((2, 5, 4), np.float32)
    call = jax.jit(lambda x, p=None: module(x, p))
    np.testing.assert_allclose(call(x), np.asarray(x) + table[:5], atol=1e-6)
    positions = jnp.array([[3], [7]])
    np.testing.assert_allclose(call(x[:, :1], positions), np.asarray(x[:, :1]) + table[[[3], [7]]])
    # Out-of-range positions show up as NaN rather than a silently clamped row.
    assert np.isnan(np.asarray(jax.jit(module.embed)(jnp.array([8, -1])))).all()
    with pytest.raises(ValueError, match="max_length=8"):
        module(jnp.zeros((1, 9, 4)))


def test_learned_positions_gradient_reaches_only_used_rows():
    module = LearnedPositions(6, 3, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 4, 3))

    def loss(m):
        return jnp.sum(m(x, jnp.array([[0, 2, 2, 5]])) ** 2)

    grads = nnx.jit(nnx.grad(loss))(module)
    g = np.asarray(grads.embedding[...])
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(np.abs(g).sum(-1) > 0, [True, False, True, False, False, True])


# -------------------------------------------------------------------- rotary


def numpy_rotary(x, positions, base=10000.0):
    """RoFormer eq. 34: block-diagonal 2x2 rotations R_{Theta, m}, built as a matrix."""
    b, t, h, d = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    for bi in range(b):
        for ti in range(t):
            m = positions[bi, ti]
            rotation = np.zeros((d, d))
            for i in range(d // 2):
                theta = base ** (-2 * i / d)
                c, s = math.cos(m * theta), math.sin(m * theta)
                rotation[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, -s], [s, c]]
            out[bi, ti] = x[bi, ti] @ rotation.T
    return out


def test_rotary_matches_paper_rotation_matrix():
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 8), np.float32)
    positions = np.array([[0, 1, 5], [7, 3, 100]])
    np.testing.assert_allclose(apply_rotary(x, positions), numpy_rotary(x, positions), atol=1e-4)


def test_rotary_dot_product_depends_only_on_offset():
    q = np.random.default_rng(1).standard_normal((1, 1, 1, 16), np.float32)
    k = np.random.default_rng(2).standard_normal((1, 1, 1, 16), np.float32)

    def score(m, n):
        rq = apply_rotary(q, jnp.array([[m]]))
        rk = apply_rotary(k, jnp.array([[n]]))
        return float(jnp.sum(rq * rk))

    for offset in (0, 3, -4):
        scores = [score(m, m + offset) for m in (0, 5, 17, 60)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    # ... and does depend on it (otherwise the test above would prove nothing).
    assert abs(score(0, 3) - score(0, 0)) > 1e-3
    # Rotations keep norms.
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rotary(q, jnp.array([[9]]))), jnp.linalg.norm(q), rtol=1e-5
    )


def test_rotary_keeps_dtype_and_rejects_odd_dim():
    x = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
    assert apply_rotary(x, jnp.arange(2)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="even head_dim"):
        positions_lib.apply_rotary(jnp.ones((1, 2, 1, 5)), jnp.arange(2))
    with pytest.raises(ValueError, match="positions"):
        positions_lib.apply_rotary(jnp.ones((1, 2, 1, 4)), jnp.arange(3))


# ---------------------------------------------------------- relative bias


def t5_bucket_reference(relative_position, bidirectional, num_buckets, max_distance):
    """T5's `_relative_position_bucket`, one integer at a time in plain Python."""
    n = -relative_position
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize(
    "bidirectional,num_buckets,max_distance", [(True, 32, 128), (False, 32, 128), (True, 10, 20)]
)
def test_t5_buckets_match_reference(bidirectional, num_buckets, max_distance):
    relative = np.arange(-300, 301)
    got = np.asarray(
        relative_position_bucket(
            relative,
            bidirectional=bidirectional,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
    )
    want = [t5_bucket_reference(int(r), bidirectional, num_buckets, max_distance) for r in relative]
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() == num_buckets - 1


def test_clipped_buckets_shaw():
    relative = np.arange(-6, 7)
    got = relative_position_bucket(relative, bidirectional=True, num_buckets=None, max_distance=3)
    np.testing.assert_array_equal(got, np.clip(relative, -3, 3) + 3)
    got = relative_position_bucket(relative, bidirectional=False, num_buckets=None, max_distance=3)
    np.testing.assert_array_equal(got, [3, 3, 3, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0])


@pytest.fixture(scope="module")
def bias_module():
    return RelativePositionBias(3, num_buckets=8, max_distance=16, rngs=nnx.Rngs(0))


def test_relative_bias_values_and_shape(bias_module):
    table = np.asarray(bias_module.embedding[...])  # [buckets, heads]
    got = np.asarray(jax.jit(bias_module, static_argnums=(0, 1))(5, 7))
    assert got.shape == (1, 3, 5, 7)
    for q in range(5):
        for k in range(7):
            bucket = t5_bucket_reference(k - q, True, 8, 16)
            np.testing.assert_allclose(got[0, :, q, k], table[bucket])


def test_relative_bias_decode_offset_equals_full_rows(bias_module):
    full = jax.jit(bias_module, static_argnums=(0, 1))(6, 6)
    step = jax.jit(lambda i: bias_module(1, 6, q_positions=i + jnp.arange(1)))(jnp.asarray(4))
    np.testing.assert_allclose(step, full[:, :, 4:5])
    batched = jax.jit(lambda q: bias_module(2, 6, q_positions=q))(jnp.array([[0, 1], [3, 4]]))
    assert batched.shape == (2, 3, 2, 6)
    np.testing.assert_allclose(batched[1], full[0, :, 3:5])
    with pytest.raises(ValueError, match="q_positions"):
        bias_module(2, 6, q_positions=jnp.arange(3))


def test_relative_bias_gradient_finite_and_argument_checks(bias_module):
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(4, 4) ** 2)))(bias_module)
    assert np.isfinite(np.asarray(grads.embedding[...])).all()
    with pytest.raises(ValueError, match="max_distance"):
        RelativePositionBias(2, num_buckets=32, max_distance=8, rngs=nnx.Rngs(0))
    clipped = RelativePositionBias(2, num_buckets=None, max_distance=2, rngs=nnx.Rngs(0))
    assert clipped.embedding[...].shape == (5, 2)
