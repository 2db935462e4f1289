"""The one-pass token log-probabilities agree with JAX's own log_softmax and its derivative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.training.log_probs import token_log_probs


def reference(logits, targets):
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return target, jnp.sum(log_probs, axis=-1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_match_autodiff_of_log_softmax(dtype):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    # Large logits: the normaliser must subtract the maximum to stay finite.
    logits = (jax.random.normal(k1, (3, 5, 11)) * 40.0).astype(dtype)
    targets = jax.random.randint(k2, (3, 5), 0, 11)
    target_weight = jax.random.normal(k3, (3, 5))
    total_weight = jax.random.normal(k4, (3, 5))

    def objective(fn):
        def f(x):
            target, total = fn(x, targets)[:2]
            return jnp.sum(target * target_weight + total * total_weight)

        return f

    ours, theirs = token_log_probs(logits, targets), reference(logits, targets)
    for a, b in zip(ours[:2], theirs, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    grad = jax.grad(objective(token_log_probs))(logits)
    expected = jax.grad(objective(reference))(logits)
    assert grad.dtype == dtype
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(grad, np.float32),
        np.asarray(expected, np.float32),
        rtol=tolerance,
        atol=tolerance * 11,
    )
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_jit_and_second_call_agree():
    logits = jax.random.normal(jax.random.key(1), (4, 7))
    targets = jnp.array([0, 6, 3, 3])
    eager = token_log_probs(logits, targets)
    jitted = jax.jit(token_log_probs)(logits, targets)
    np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6)
    np.testing.assert_allclose(eager[1], jitted[1], rtol=1e-6)
    np.testing.assert_array_equal(eager[2], jitted[2])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_target_is_argmax_agrees_with_jnp_argmax_including_ties(dtype):
    # Coarse integer logits tie often; jnp.argmax takes the first maximum, and
    # a target tied with an earlier maximum is not the argmax.
    logits = jax.random.randint(jax.random.key(2), (64, 6), 0, 3).astype(dtype)
    logits = logits.at[0].set(0.0)  # All tied (a zero-initialised output layer).
    targets = jax.random.randint(jax.random.key(3), (64,), 0, 6).at[0].set(3)
    _, _, is_argmax = jax.jit(token_log_probs)(logits, targets)
    expected = jnp.argmax(logits, axis=-1) == targets
    assert is_argmax.dtype == jnp.bool_
    np.testing.assert_array_equal(is_argmax, expected)
    assert not is_argmax[0]
    # Ties both ways occur in this sample, so the check is not vacuous.
    peak = np.max(np.asarray(logits, np.float32), axis=-1)
    target_logit = np.asarray(logits, np.float32)[np.arange(64), np.asarray(targets)]
    tied_at_peak = (target_logit == peak) & ~np.asarray(expected)
    assert tied_at_peak.sum() > 0 and np.asarray(expected).sum() > 0
