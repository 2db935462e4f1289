"""The one-pass token log-probabilities agree with JAX's own log_softmax and its derivative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.training.log_probs import target_and_total_log_probs


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
            target, total = fn(x, targets)
            return jnp.sum(target * target_weight + total * total_weight)

        return f

    ours, theirs = target_and_total_log_probs(logits, targets), reference(logits, targets)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    grad = jax.grad(objective(target_and_total_log_probs))(logits)
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
    eager = target_and_total_log_probs(logits, targets)
    jitted = jax.jit(target_and_total_log_probs)(logits, targets)
    np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6)
    np.testing.assert_allclose(eager[1], jitted[1], rtol=1e-6)
