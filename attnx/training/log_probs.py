"""The two log-probabilities a token loss needs, with a gradient written in one pass.

`token_log_probs(logits, targets)` returns log p(target) and sum_v log p(v)
of each token's softmax, the two terms of the (label-smoothed) cross-entropy
(`metrics._token_losses`), and whether the target is the logits' argmax (token
accuracy) from the same maximum the normaliser needs. JAX's own derivative of
`log_softmax` followed by `take_along_axis` materialises the [..., V]
log-probabilities, scatters the target's cotangent into a [..., V] array and
combines them in separate passes: on the cpu-small Transformer step
(vocabulary 8000, 2048 tokens) those passes took about 250 ms of a 1.2 s step
(`python -m benchmarks.profile_step --models transformer`). Here the forward
pass keeps only the per-token log-normaliser, and the backward pass writes
the logits' gradient in one elementwise pass:

  d log p_t / d x_v       = [v = t] - p_v
  d sum_u log p_u / d x_v = 1 - V p_v

so with cotangents g_t and g_s the gradient is
  g_t [v = t] + g_s - (g_t + V g_s) p_v,    p_v = exp(x_v - logsumexp(x)).

The argmax is the first index holding the maximum, as `jnp.argmax` defines
it, found by an integer min over the positions equal to the maximum that the
normaliser already took: `jnp.argmax`'s own (value, index) reduction was
another 62 ms pass over the Transformer's [2048, 8000] logits.
"""

import jax
import jax.numpy as jnp


def _positions(x: jax.Array) -> jax.Array:
    """Each entry's index along the last axis, int32, x's shape."""
    return jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)


@jax.custom_vjp
def token_log_probs(
    logits: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p(targets), sum over the vocabulary of log p, targets == argmax).

    Args:
      logits: [..., V] (any float dtype; computed in float32).
      targets: [...] int ids in [0, V).

    Returns:
      Two float32 [...] arrays and a bool [...] array (no gradient flows
      through the last).
    """
    return _forward(logits, targets)[0]


def _forward(logits, targets):
    x = logits.astype(jnp.float32)
    vocab = x.shape[-1]
    peak = jnp.max(x, axis=-1, keepdims=True)
    normalizer = (peak + jnp.log(jnp.sum(jnp.exp(x - peak), axis=-1, keepdims=True)))[..., 0]
    first_peak = jnp.min(jnp.where(x == peak, _positions(x), vocab), axis=-1)
    target_logit = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    outputs = (
        target_logit - normalizer,
        jnp.sum(x, axis=-1) - vocab * normalizer,
        first_peak == targets,
    )
    return outputs, (logits, targets, normalizer)


def _backward(residuals, cotangents):
    logits, targets, normalizer = residuals
    target_cotangent, total_cotangent, _ = cotangents
    vocab = logits.shape[-1]
    probs = jnp.exp(logits.astype(jnp.float32) - normalizer[..., None])
    is_target = _positions(logits) == targets[..., None]
    gradient = (
        jnp.where(is_target, target_cotangent[..., None], 0.0)
        + total_cotangent[..., None]
        - (target_cotangent + vocab * total_cotangent)[..., None] * probs
    )
    # Integer targets have no gradient: their cotangent is float0.
    return gradient.astype(logits.dtype), None


token_log_probs.defvjp(_forward, _backward)
