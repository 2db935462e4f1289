"""The two log-probabilities a token loss needs, with a gradient written in one pass.

`target_and_total_log_probs(logits, targets)` returns log p(target) and
sum_v log p(v) of each token's softmax, the two terms of the (label-smoothed)
cross-entropy (`metrics._token_losses`). JAX's own derivative of
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
"""

import jax
import jax.numpy as jnp


def _log_normalizer(logits: jax.Array) -> jax.Array:
    """logsumexp over the last axis, float32, [...]."""
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return (peak + jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1, keepdims=True)))[..., 0]


@jax.custom_vjp
def target_and_total_log_probs(
    logits: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(log p(targets), sum over the vocabulary of log p), both float32 [...].

    Args:
      logits: [..., V] (any float dtype; computed in float32).
      targets: [...] int ids in [0, V).
    """
    return _forward(logits, targets)[0]


def _forward(logits, targets):
    x = logits.astype(jnp.float32)
    normalizer = _log_normalizer(x)
    target_logit = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    vocab = x.shape[-1]
    outputs = (target_logit - normalizer, jnp.sum(x, axis=-1) - vocab * normalizer)
    return outputs, (logits, targets, normalizer)


def _backward(residuals, cotangents):
    logits, targets, normalizer = residuals
    target_cotangent, total_cotangent = cotangents
    vocab = logits.shape[-1]
    probs = jnp.exp(logits.astype(jnp.float32) - normalizer[..., None])
    is_target = (
        jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == (targets[..., None])
    )
    gradient = (
        jnp.where(is_target, target_cotangent[..., None], 0.0)
        + total_cotangent[..., None]
        - (target_cotangent + vocab * total_cotangent)[..., None] * probs
    )
    # Integer targets have no gradient: their cotangent is float0.
    return gradient.astype(logits.dtype), None


target_and_total_log_probs.defvjp(_forward, _backward)
