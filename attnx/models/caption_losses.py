"""Training objectives of Show, Attend and Tell (Xu et al. 2015): soft and hard attention.

Soft attention (sec. 4.2.1, eq. 14) minimises the negative log-likelihood
plus the doubly stochastic regulariser

  L_d = -log P(y | x) + lambda sum_i (1 - sum_t alpha_ti)^2          (eq. 14)

(`captioner_loss`). Hard attention (sec. 4.1) maximises a lower bound L_s on
log p(y | a) by sampling one location s_t per step; its gradient is estimated
by (eq. 12)

  dL_s/dW ≈ 1/N sum_n [ d log p(y | s^n, a)/dW
                        + lambda_r (log p(y | s^n, a) - b) d log p(s^n | a)/dW
                        + lambda_e d H[s^n]/dW ]

with the moving-average baseline b_k = 0.9 b_{k-1} + 0.1 log p(y | s_k, a)
(`update_baseline`). `hard_attention_loss` is the surrogate whose gradient is
exactly that estimate (the reward enters with a stop-gradient). The baseline
is a scalar the training state carries: start it at 0 (the authors' code)
and, after each step, replace it with
`update_baseline(b, metrics['log_likelihood'])`.

The losses take the `(logits, weights)` of `Captioner.decode(...,
return_weights=True)`; their attention terms, `doubly_stochastic_penalty` and
`location_entropy`, take the attention weights alone. All are pure and
jit-friendly.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

PAD = 0


def _token_weights(name: str, logits: Array, targets: Array, token_weights: Array | None) -> Array:
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"{name}: logits must be [batch, T, vocab] and targets [batch, T], "
            f"got {logits.shape} and {targets.shape}"
        )
    if token_weights is None:
        return (targets != PAD).astype(jnp.float32)
    token_weights = jnp.asarray(token_weights, jnp.float32)
    if token_weights.shape != targets.shape:
        raise ValueError(
            f"{name}: token_weights must be [batch, T] = {targets.shape}, got {token_weights.shape}"
        )
    return token_weights


def _normalizer(name: str, normalize: str, token_weights: Array) -> Array:
    """Divides summed per-token terms: by the tokens, or by the captions that have any."""
    if normalize == "tokens":
        return jnp.maximum(jnp.sum(token_weights), 1.0)
    if normalize == "captions":
        return jnp.maximum(jnp.sum(jnp.any(token_weights > 0, axis=-1)), 1).astype(jnp.float32)
    raise ValueError(f"{name}: normalize must be 'tokens' or 'captions', got {normalize!r}")


def _alignment(name: str, weights: dict[str, Array], targets: Array) -> Array:
    if "alignment" not in weights:
        raise ValueError(f"{name}: weights must be the dict of decode(..., return_weights=True)")
    alignment = weights["alignment"]
    if alignment.ndim != 3 or alignment.shape[:2] != targets.shape:
        raise ValueError(
            f"{name}: weights['alignment'] must be [batch, T, L] with [batch, T] = "
            f"{targets.shape}, got {alignment.shape}"
        )
    return alignment.astype(jnp.float32)


def doubly_stochastic_penalty(
    weights: Array,
    caption_mask: Array | None = None,
    lam: float = 1.0,
    location_mask: Array | None = None,
) -> Array:
    """Doubly stochastic attention regulariser (Xu et al. 2015, eq. 14).

      lambda * sum_i (1 - sum_t alpha_ti)^2

    pushes the model to look at every location about once over the caption.
    Only real caption steps enter the sum over t; with `location_mask`, only
    real locations enter the sum over i (a padded location always has weight
    0 and would add a constant). The per-example penalties are averaged over
    the examples that have at least one real caption step (a wholly padded
    example, e.g. filler in the last batch, adds nothing). Add it to the
    *mean* per-example negative log-likelihood; to match eq. 14 exactly with a
    per-token loss, rescale `lam`.

    Args:
      weights: `[batch, T, L]`, alpha_t for every step.
      caption_mask: `[batch, T]`, True at real caption steps; default all.
      lam: lambda.
      location_mask: `[batch, L]`, True at real locations; default all.

    Returns:
      A scalar.
    """
    weights = jnp.asarray(weights)
    if weights.ndim != 3:
        raise ValueError(
            f"doubly_stochastic_penalty: weights must be [batch, T, L], got {weights.shape}"
        )
    if caption_mask is None:
        caption_mask = jnp.ones(weights.shape[:2], bool)
    caption_mask = jnp.asarray(caption_mask)
    if caption_mask.shape != weights.shape[:2]:
        raise ValueError(
            f"doubly_stochastic_penalty: caption_mask must be [batch, T] = {weights.shape[:2]}, "
            f"got {caption_mask.shape}"
        )
    if location_mask is None:
        location_mask = jnp.ones((weights.shape[0], weights.shape[2]), bool)
    location_mask = jnp.asarray(location_mask)
    if location_mask.shape != (weights.shape[0], weights.shape[2]):
        raise ValueError(
            "doubly_stochastic_penalty: location_mask must be [batch, L] = "
            f"{(weights.shape[0], weights.shape[2])}, got {location_mask.shape}"
        )
    steps = caption_mask.astype(weights.dtype)
    attention_per_location = jnp.einsum("btl,bt->bl", weights, steps)  # sum_t alpha_ti
    deficit = jnp.where(location_mask, (1.0 - attention_per_location) ** 2, 0.0)
    per_example = lam * jnp.sum(deficit, axis=-1)
    has_steps = jnp.any(caption_mask.astype(bool), axis=-1)
    total = jnp.sum(jnp.where(has_steps, per_example, 0.0))
    return total / jnp.maximum(jnp.sum(has_steps), 1).astype(weights.dtype)


def _safe_log(weights: Array) -> Array:
    """log(w) where w > 0, else 0 (finite values and gradients at w = 0)."""
    positive = weights > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, weights, 1.0)), 0.0)


def location_entropy(weights: Array) -> Array:
    """H[alpha_t] = -sum_i alpha_ti log alpha_ti over the last axis (0 log 0 = 0).

    The entropy term of the hard-attention update (Xu et al. 2015, sec. 4.1);
    also a measure of how spread out a soft attention map is.

    Args:
      weights: `[..., L]`.

    Returns:
      `[...]`, finite with finite gradients even where weights are 0.
    """
    weights = jnp.asarray(weights)
    return -jnp.sum(weights * _safe_log(weights), axis=-1)


def sequence_log_likelihood(logits: Array, targets: Array, token_weights: Array) -> Array:
    """log p(y | a) = sum_t w_t log p(y_t | ...) per caption, `[batch]`."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_log_probs * token_weights, axis=-1)


def captioner_loss(
    logits: Array,
    targets: Array,
    weights: dict[str, Array],
    *,
    lam: float = 1.0,
    token_weights: Array | None = None,
    normalize: str = "tokens",
) -> tuple[Array, dict[str, Array]]:
    """Negative log-likelihood plus the doubly stochastic penalty (eq. 14).

    Args:
      logits: `[batch, T, vocab]` from `Captioner.decode`.
      targets: int `[batch, T]` (the caption, eos last, 0 = padding).
      weights: the weights dict of the same decode (uses 'alignment' `[batch, T, L]`).
      lam: lambda of eq. 14 (the paper and authors use 1).
      token_weights: `[batch, T]` loss weights; default `targets != 0`. Steps
        with weight 0 also leave the penalty's sum over t.
      normalize: 'tokens' (NLL per real token, as attnx's other models and the
        PyTorch peer) or 'captions' (NLL summed over a caption and averaged
        over captions: eq. 14 exactly).

    Returns:
      `(loss, {'nll': ..., 'penalty': ...})`, scalars; the penalty is
      `doubly_stochastic_penalty(alignment, token_weights > 0, lam)` (a mean over captions).
    """
    token_weights = _token_weights("captioner_loss", logits, targets, token_weights)
    alignment = _alignment("captioner_loss", weights, targets)
    nll = -jnp.sum(sequence_log_likelihood(logits, targets, token_weights)) / _normalizer(
        "captioner_loss", normalize, token_weights
    )
    penalty = doubly_stochastic_penalty(alignment, token_weights > 0, lam)
    return nll + penalty, {"nll": nll, "penalty": penalty}


def hard_attention_loss(
    logits: Array,
    targets: Array,
    weights: dict[str, Array],
    baseline: Array | float,
    *,
    reward_weight: float = 0.1,
    entropy_weight: float = 0.002,
    lam: float = 0.0,
    token_weights: Array | None = None,
    normalize: str = "tokens",
) -> tuple[Array, dict[str, Array]]:
    """REINFORCE surrogate of hard attention (Xu et al. 2015, sec. 4.1, eq. 12), to minimise.

      loss = sum_n [ -log p(y_n | s_n, a)
                     - lambda_r (log p(y_n | s_n, a) - b) sum_t log alpha_{t, s_t}   (sampled n)
                     - lambda_e sum_t H[alpha_t] ] / normaliser + penalty

    The reward log p(y | s, a) - b has no gradient. Captions that trained on
    the expectation (weights['sampled'] False, sec. 4.1's 0.5 trick) get no
    REINFORCE term: their gradient flows through alpha directly.

    Args:
      logits, targets, token_weights, normalize: as in `captioner_loss`.
      weights: the weights dict of `Captioner.decode(..., train=True,
        return_weights=True)` with attention='hard' ('alignment', 'location', 'sampled').
      baseline: b, the moving average of log p(y | s, a) (a scalar).
      reward_weight: lambda_r. entropy_weight: lambda_e. The paper gives no
        values; the defaults are the authors' code's (arctic-captions,
        capgen.py: the REINFORCE gradient divided by 10, alpha_entropy_c
        0.002). With lambda_r = 1 and lambda_e = 0.01 the digits captioner's
        attention drifts to uniform and never learns to read.
      lam: weight of the doubly stochastic penalty (sec. 4.2.1 introduces it
        for soft attention; off by default here).

    Returns:
      `(loss, metrics)`: metrics 'nll', 'penalty', 'reinforce', 'entropy'
      (mean location entropy per real step) are scalars; 'log_likelihood' is
      `[batch]` log p(y | s, a), the input of `update_baseline`.
    """
    name = "hard_attention_loss"
    token_weights = _token_weights(name, logits, targets, token_weights)
    alignment = _alignment(name, weights, targets)
    if "location" not in weights or "sampled" not in weights:
        raise ValueError(
            f"{name}: weights need 'location' and 'sampled': decode with attention='hard' "
            "and train=True"
        )
    location = jax.lax.stop_gradient(weights["location"].astype(jnp.float32))
    sampled = weights["sampled"].astype(jnp.float32)
    normalizer = _normalizer(name, normalize, token_weights)

    log_likelihood = sequence_log_likelihood(logits, targets, token_weights)  # [b]
    picked = location > 0
    # log alpha_{t, s_t} for a one-hot location; zero-safe where alpha is 0 elsewhere.
    log_alpha = jnp.where(picked, jnp.log(jnp.where(picked, alignment, 1.0)), 0.0)
    location_log_prob = jnp.sum(jnp.sum(location * log_alpha, axis=-1) * token_weights, axis=-1)
    advantage = jax.lax.stop_gradient(log_likelihood - baseline)
    reinforce = -reward_weight * jnp.sum(sampled * advantage * location_log_prob) / normalizer
    entropy = location_entropy(alignment) * token_weights  # [b, T]
    penalty = (
        doubly_stochastic_penalty(alignment, token_weights > 0, lam)
        if lam
        else jnp.zeros((), jnp.float32)
    )
    nll = -jnp.sum(log_likelihood) / normalizer
    loss = nll + reinforce - entropy_weight * jnp.sum(entropy) / normalizer + penalty
    metrics = {
        "nll": nll,
        "penalty": penalty,
        "reinforce": reinforce,
        "entropy": jnp.sum(entropy) / jnp.maximum(jnp.sum(token_weights), 1.0),
        "log_likelihood": log_likelihood,
    }
    return loss, metrics


def update_baseline(baseline: Array | float, log_likelihood: Array, decay: float = 0.9) -> Array:
    """b_k = decay * b_{k-1} + (1 - decay) * mean_n log p(y_n | s_n, a) (sec. 4.1, decay 0.9).

    Args:
      baseline: b_{k-1}, a scalar (0 before the first step).
      log_likelihood: `[batch]`, `metrics['log_likelihood']` of `hard_attention_loss`.
    """
    log_likelihood = jax.lax.stop_gradient(jnp.asarray(log_likelihood, jnp.float32))
    if log_likelihood.ndim != 1:
        raise ValueError(
            f"update_baseline: log_likelihood must be [batch], got {log_likelihood.shape}"
        )
    return decay * jnp.asarray(baseline, jnp.float32) + (1.0 - decay) * jnp.mean(log_likelihood)
