"""SpatialAttention and its helpers against Xu et al. (2015), written out in NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.layers.spatial import SpatialAttention, sample_location

C, D, A = 5, 6, 4  # feature channels, decoder state size, f_att hidden size
H, W = 2, 3


def numpy_spatial(module, features, hidden, mask):
    """eq. 4-6 and 4.2.1: e_i = v.tanh(W_a a_i + W_h h + b), alpha = softmax, z = beta sum alpha a."""
    wa = np.asarray(module.feature_kernel[...], np.float64)
    wh = np.asarray(module.hidden_kernel[...], np.float64)
    v = np.asarray(module.v[...], np.float64)
    b = np.zeros(A) if module.bias is None else np.asarray(module.bias[...], np.float64)
    batch = features.shape[0]
    flat = features.reshape(batch, -1, C)
    flat_mask = mask.reshape(batch, -1)
    contexts = np.zeros((batch, C))
    weights = np.zeros(flat_mask.shape)
    for n in range(batch):
        real = [i for i in range(flat.shape[1]) if flat_mask[n, i]]
        if real:
            e = np.array([v @ np.tanh(flat[n, i] @ wa + hidden[n] @ wh + b) for i in real])
            alpha = np.exp(e - e.max())
            alpha /= alpha.sum()
            for a, i in zip(alpha, real, strict=True):
                weights[n, i] = a
                contexts[n] += a * flat[n, i]
        if module.gate:
            logit = hidden[n] @ np.asarray(module.gate_kernel[...]) + float(module.gate_bias[...])
            contexts[n] *= 1.0 / (1.0 + math.exp(-logit))
    return contexts, weights


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((3, H, W, C), np.float32)
    hidden = rng.standard_normal((3, D), np.float32)
    mask = np.ones((3, H, W), bool)
    mask[1, 1, 1:] = False  # two padded locations
    mask[2] = False  # no real location at all
    return features, hidden, mask


@pytest.fixture(scope="module", params=[True, False], ids=["gate", "no_gate"])
def module(request):
    module = SpatialAttention(C, D, A, gate=request.param, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(5)
    module.bias[...] = jnp.asarray(rng.standard_normal(A, np.float32))
    if module.gate:
        module.gate_bias[...] = jnp.asarray(0.7, jnp.float32)
    return module


def _step(module):
    @jax.jit
    def step(features, hidden, mask):
        memory = module.prepare_features(features, mask)
        context, weights = module(hidden, memory, return_weights=True)
        return context, weights, memory.as_grid(weights)

    return step


def test_matches_paper_formula_with_location_mask(module, data):
    features, hidden, mask = data
    context, weights, grid_weights = _step(module)(features, hidden, mask)
    want_context, want_weights = numpy_spatial(module, features, hidden, mask)
    np.testing.assert_allclose(weights, want_weights, atol=1e-5)
    np.testing.assert_allclose(context, want_context, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grid_weights, want_weights.reshape(3, H, W), atol=1e-5)
    # Padding: zero weight; the all-masked example has zero weights and context, no NaN.
    assert np.all(np.asarray(grid_weights)[~mask] == 0)
    np.testing.assert_array_equal(context[2], 0.0)
    np.testing.assert_allclose(np.asarray(weights)[:2].sum(-1), 1.0, atol=1e-5)


def test_flat_features_equal_grid(module, data):
    features, hidden, mask = data
    step = jax.jit(lambda f, h, m: module(h, module.prepare_features(f, m), return_weights=True))
    context, weights = step(features.reshape(3, H * W, C), hidden, mask.reshape(3, H * W))
    want_context, want_weights, _ = _step(module)(features, hidden, mask)
    np.testing.assert_allclose(context, want_context, atol=1e-6)
    np.testing.assert_allclose(weights, want_weights, atol=1e-6)


def test_hoisted_memory_inside_scan_equals_step_by_step(module, data):
    features, _, mask = data
    hiddens = np.random.default_rng(4).standard_normal((4, 3, D), np.float32)  # [T, b, D]

    @jax.jit
    def scanned(features, hiddens):
        memory = module.prepare_features(features, mask)

        def body(carry, hidden):
            return carry, module(hidden, memory, return_weights=True)

        return jax.lax.scan(body, None, hiddens)[1]

    contexts, weights = scanned(features, hiddens)
    for t in range(4):
        want_context, want_weights = numpy_spatial(module, features, hiddens[t], mask)
        np.testing.assert_allclose(contexts[t], want_context, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(weights[t], want_weights, atol=1e-5)


def test_gradients_finite(module, data):
    features, hidden, mask = data

    def loss(m, features, hidden):
        memory = m.prepare_features(features, mask)
        return jnp.sum(m(hidden, memory) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))(module, features, hidden)
    leaves = jax.tree.leaves(nnx.state(grads[0])) + list(grads[1:])
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
    assert np.abs(np.asarray(grads[0].hidden_kernel[...])).sum() > 0


def test_sow_only_when_asked_and_input_checks(data):
    features, hidden, _ = data
    for sow in (True, False):
        module = SpatialAttention(C, D, A, sow_weights=sow, rngs=nnx.Rngs(0))
        run = nnx.jit(
            nnx.capture(
                lambda m: m(hidden, m.prepare_features(features), return_weights=True),
                nnx.Intermediate,
            )
        )
        (_, weights), sown = run(module)
        if sow:
            (captured,) = sown["attention_weights"].get_value()
            np.testing.assert_allclose(captured, weights)
        else:
            assert "attention_weights" not in sown
    with pytest.raises(ValueError, match="features"):
        module.prepare_features(features[..., :2])
    with pytest.raises(ValueError, match="mask"):
        module.prepare_features(features, np.ones((3, H * W), bool))
    with pytest.raises(ValueError, match="hidden"):
        module(hidden[:, :2], module.prepare_features(features))
    with pytest.raises(ValueError, match="flat"):
        module.prepare_features(features.reshape(3, -1, C)).as_grid(jnp.zeros((3, H * W)))


def test_sample_location_distribution_and_log_prob():
    weights = jnp.array([[0.1, 0.6, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]])
    keys = jax.random.split(jax.random.key(0), 4000)
    samples, log_probs = jax.jit(jax.vmap(sample_location, in_axes=(None, 0)))(weights, keys)
    samples, log_probs = np.asarray(samples), np.asarray(log_probs)
    assert np.all(samples[:, 0].sum(-1) == 1) and np.all(samples[:, 1] == 0)
    np.testing.assert_allclose(samples[:, 0].mean(0), [0.1, 0.6, 0.0, 0.3], atol=0.03)
    chosen = samples[:, 0].argmax(-1)
    np.testing.assert_allclose(log_probs[:, 0], np.log(np.asarray(weights)[0, chosen]), rtol=1e-6)
    np.testing.assert_array_equal(log_probs[:, 1], 0.0)
    # REINFORCE needs d log p / d alpha = 1 / alpha at the sample, finite elsewhere.
    sample, grad = jax.jit(
        lambda w: (
            sample_location(w, keys[0])[0],
            jax.grad(lambda w: sample_location(w, keys[0])[1].sum())(w),
        )
    )(weights)
    sample = np.asarray(sample)
    np.testing.assert_allclose(grad, np.where(sample > 0, 1.0 / np.maximum(weights, 1e-9), 0.0))
