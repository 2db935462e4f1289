"""MultiStepAttention against Gehring et al. (2017), sec. 3.3-3.4, written out in NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.layers.multi_step import MultiStepAttention

C, E = 6, 4  # decoder channels, embedding size


def numpy_multi_step(module, h, g, z, values, mask):
    """d = W_d h + b_d + g; a = softmax_j(d . z_j); c = sqrt(m) sum_j a_j (z_j + e_j); out."""
    wd = np.asarray(module.query_kernel[...], np.float64)  # [C, E]
    bd = np.asarray(module.query_bias[...], np.float64)
    wo = np.asarray(module.out_kernel[...], np.float64)  # [E, C]
    bo = np.asarray(module.out_bias[...], np.float64)
    batch, t, _ = h.shape
    out = np.zeros((batch, t, C))
    weights = np.zeros((batch, t, z.shape[1]))
    for b in range(batch):
        real = [j for j in range(z.shape[1]) if mask[b, j]]
        m = len(real)
        for i in range(t):
            d = (h[b, i] @ wd + bd + g[b, i]) * module.query_scale
            context = np.zeros(E)
            if m:
                logits = np.array([d @ z[b, j] for j in real])
                a = np.exp(logits - logits.max())
                a /= a.sum()
                for w, j in zip(a, real, strict=True):
                    weights[b, i, j] = w
                    context += w * values[b, j]
                context *= m * math.sqrt(1.0 / m)  # sec. 3.4
            out[b, i] = (h[b, i] + context @ wo + bo) * module.residual_scale
    return out, weights


def _randomize_biases(module):
    rng = np.random.default_rng(7)
    for var in (module.query_bias, module.out_bias):
        var[...] = jnp.asarray(rng.standard_normal(var[...].shape, np.float32) * 0.3)
    return module


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    batch, t, s = 3, 5, 7
    h = rng.standard_normal((batch, t, C), np.float32)
    g = rng.standard_normal((batch, t, E), np.float32)
    z = rng.standard_normal((batch, s, E), np.float32)
    e = rng.standard_normal((batch, s, E), np.float32)
    # Example 0: full source; 1: three padded positions; 2: all padding.
    mask = np.ones((batch, s), bool)
    mask[1, 4:] = False
    mask[2] = False
    return h, g, z, z + e, mask


@pytest.fixture(scope="module", params=["paper", "fairseq"])
def module(request):
    query_scale = 1.0 if request.param == "paper" else math.sqrt(0.5)
    return _randomize_biases(MultiStepAttention(C, E, query_scale=query_scale, rngs=nnx.Rngs(1)))


def _forward(module):
    return jax.jit(lambda *a: module(*a, return_weights=True))


def test_matches_paper_formula_with_padding(module, inputs):
    h, g, z, values, mask = inputs
    out, weights = _forward(module)(h, g, z, values, mask)
    want_out, want_weights = numpy_multi_step(module, h, g, z, values, mask)
    np.testing.assert_allclose(weights, want_weights, atol=1e-5)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    assert out.shape == (3, 5, C) and weights.shape == (3, 5, 7)


def test_padding_gets_zero_weight_and_empty_source_no_nan(module, inputs):
    h, g, z, values, mask = inputs
    forward = _forward(module)
    out, weights = forward(h, g, z, values, mask)
    assert np.all(np.asarray(weights)[~np.broadcast_to(mask[:, None], weights.shape)] == 0)
    np.testing.assert_allclose(np.asarray(weights)[:2].sum(-1), 1.0, atol=1e-5)
    # What sits at padded positions cannot change the output.
    noisy_z = np.where(mask[..., None], z, 1e3)
    noisy_values = np.where(mask[..., None], values, -1e3)
    out2, _ = forward(h, g, noisy_z, noisy_values, mask)
    np.testing.assert_allclose(out2, out, atol=1e-5)
    # All padding: no context at all.
    bo = np.asarray(module.out_bias[...])
    np.testing.assert_allclose(out[2], (h[2] + bo) * module.residual_scale, atol=1e-6)


def test_incremental_steps_equal_full_sequence(module, inputs):
    h, g, z, values, mask = inputs
    full, full_weights = _forward(module)(h, g, z, values, mask)
    step = _forward(module)
    for i in range(h.shape[1]):
        out, weights = step(h[:, i : i + 1], g[:, i : i + 1], z, values, mask)
        np.testing.assert_allclose(out[:, 0], full[:, i], atol=1e-6)
        np.testing.assert_allclose(weights[:, 0], full_weights[:, i], atol=1e-6)


def test_gradients_finite_including_empty_source(module, inputs):
    h, g, z, values, mask = inputs

    def loss(m, h, z):
        return jnp.sum(m(h, g, z, values, mask) ** 2)

    grads, dh, dz = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))(module, jnp.asarray(h), z)
    for leaf in jax.tree.leaves(nnx.state(grads)) + [dh, dz]:
        assert np.isfinite(np.asarray(leaf)).all()
    assert np.abs(np.asarray(dz)[1, :4]).sum() > 0
    np.testing.assert_array_equal(np.asarray(dz)[1, 4:], 0.0)


def test_default_mask_sow_and_checks():
    module = MultiStepAttention(C, E, sow_weights=True, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(3)
    h = rng.standard_normal((2, 1, C), np.float32)
    g = rng.standard_normal((2, 1, E), np.float32)
    z = rng.standard_normal((2, 4, E), np.float32)

    run = nnx.jit(nnx.capture(lambda m: m(h, g, z, z, return_weights=True), nnx.Intermediate))
    (out, weights), sown = run(module)
    (captured,) = sown["attention_weights"].get_value()
    np.testing.assert_allclose(captured, weights)
    want, _ = numpy_multi_step(module, h, g, z, z, np.ones((2, 4), bool))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="target_embedding"):
        module(h, g[..., :3], z, z)
    with pytest.raises(ValueError, match="source_mask"):
        module(h, g, z, z, np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="decoder_state"):
        module(h[..., :2], g, z, z)
