"""Normalizers: turn attention scores into weights along the key axis.

* `softmax`: the usual dense weights.
* `sparsemax` (Martins & Astudillo, 2016): Euclidean projection onto the
  simplex; exact zeros outside a data-dependent support.
* `entmax15` (Peters, Niculae & Martins, 2019): alpha-entmax with alpha = 1.5,
  between softmax and sparsemax; sparse and smooth.

All three take an optional boolean mask (True = may attend). A row whose every
entry is masked gets all-zero weights and zero gradients, never NaN. The
sparse normalizers use the exact sort-based algorithms and closed-form
Jacobian-vector products, so gradients are exact and finite.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Normalizer = Callable[..., Array]


def _prepare(scores: Array, mask: Array | None) -> tuple[Array, Array | None]:
    """Replaces masked scores with a finite floor far below every real score."""
    if mask is None:
        return scores, None
    mask = jnp.broadcast_to(mask, scores.shape)
    # A finite floor keeps sorts and cumulative sums free of inf - inf.
    floor = jnp.min(jnp.where(mask, scores, jnp.inf), axis=-1, keepdims=True)
    floor = jnp.where(jnp.isfinite(floor), floor, 0.0) - 1e4
    return jnp.where(mask, scores, jax.lax.stop_gradient(floor)), mask


def _finish(weights: Array, mask: Array | None) -> Array:
    """Zeroes masked entries, hence whole rows with no allowed key."""
    if mask is None:
        return weights
    return jnp.where(mask, weights, 0.0)


def softmax(scores: Array, mask: Array | None = None) -> Array:
    """Softmax over the last axis; masked entries and empty rows get weight 0.

    Args:
      scores: `[..., kv_length]`.
      mask: boolean, broadcastable to `scores`.
    """
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    mask = jnp.broadcast_to(mask, scores.shape)
    masked = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    # Masked entries go to exp(-inf) = 0 *inside* the exp, so that a huge
    # masked score can never overflow and turn the gradient into inf * 0.
    unnormalized = jnp.exp(jnp.where(mask, scores - row_max, -jnp.inf))
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    # Empty rows have total 0: divide by 1 instead, leaving zeros.
    return unnormalized / jnp.where(total > 0, total, 1.0)


def _sparsemax_threshold(z: Array) -> Array:
    """tau such that sum(max(z - tau, 0)) = 1, per row (last axis)."""
    z_sorted = jnp.flip(jnp.sort(z, axis=-1), axis=-1)
    k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cumulative = jnp.cumsum(z_sorted, axis=-1)
    in_support = 1.0 + k * z_sorted > cumulative
    support_size = jnp.sum(in_support, axis=-1, keepdims=True)
    tau_numerator = jnp.take_along_axis(cumulative, support_size.astype(jnp.int32) - 1, axis=-1)
    return (tau_numerator - 1.0) / support_size.astype(z.dtype)


@jax.custom_jvp
def _sparsemax(z: Array) -> Array:
    return jnp.maximum(z - _sparsemax_threshold(z), 0.0)


@_sparsemax.defjvp
def _sparsemax_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    p = _sparsemax(z)
    support = (p > 0).astype(z.dtype)
    # J = diag(s) - s s^T / |s|  (Martins & Astudillo 2016, eq. 12).
    mean_on_support = jnp.sum(dz * support, -1, keepdims=True) / jnp.sum(support, -1, keepdims=True)
    return p, support * (dz - mean_on_support)


def sparsemax(scores: Array, mask: Array | None = None) -> Array:
    """Sparsemax over the last axis (Martins & Astudillo 2016, Alg. 1).

    Args:
      scores: `[..., kv_length]`.
      mask: boolean, broadcastable to `scores`.
    """
    z, mask = _prepare(scores, mask)
    return _finish(_sparsemax(z), mask)


@jax.custom_jvp
def _entmax15(z: Array) -> Array:
    # Exact sort-based algorithm of Peters et al. (2019), Alg. 2, for alpha=1.5:
    # p_i = [z_i / 2 - tau]_+^2 with tau chosen so that sum(p) = 1.
    z = z / 2.0
    z = z - jnp.max(z, axis=-1, keepdims=True)
    z_sorted = jnp.flip(jnp.sort(z, axis=-1), axis=-1)
    k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean = jnp.cumsum(z_sorted, axis=-1) / k
    mean_sq = jnp.cumsum(z_sorted**2, axis=-1) / k
    delta = (1.0 - k * (mean_sq - mean**2)) / k
    tau = mean - jnp.sqrt(jnp.maximum(delta, 0.0))
    support_size = jnp.sum(tau <= z_sorted, axis=-1, keepdims=True)
    tau_star = jnp.take_along_axis(tau, support_size - 1, axis=-1)
    return jnp.maximum(z - tau_star, 0.0) ** 2


@_entmax15.defjvp
def _entmax15_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    p = _entmax15(z)
    # With g = p^(2 - alpha) = sqrt(p): J = diag(g) - g g^T / sum(g)
    # (Peters et al. 2019, Prop. 1; the 1/2 inside p = [z/2 - tau]^2 cancels the square's 2).
    g = jnp.sqrt(p)
    gv = jnp.sum(g * dz, -1, keepdims=True) / jnp.sum(g, -1, keepdims=True)
    return p, g * (dz - gv)


def entmax15(scores: Array, mask: Array | None = None) -> Array:
    """1.5-entmax over the last axis (Peters, Niculae & Martins 2019).

    Args:
      scores: `[..., kv_length]`.
      mask: boolean, broadcastable to `scores`.
    """
    z, mask = _prepare(scores, mask)
    return _finish(_entmax15(z), mask)


NORMALIZERS: dict[str, Normalizer] = {
    "softmax": softmax,
    "sparsemax": sparsemax,
    "entmax15": entmax15,
}


def register_normalizer(name: str, normalizer: Normalizer) -> None:
    """Adds `normalizer` under `name`: `config.model.attention.normalizer=name` then
    selects it in every architecture (as `'sparsemax'` does: with the weights computed
    by the 'reference' implementation).

    Args:
      name: a new name.
      normalizer: `(scores [..., kv_length], mask broadcastable or None) -> weights`,
        each row summing to 1 over its allowed keys, and all-zero (never NaN) on a
        row with no allowed key.

    Raises:
      ValueError: `name` is taken.
    """
    if name in NORMALIZERS:
        raise ValueError(f"register_normalizer: {name!r} is taken; choose another name")
    NORMALIZERS[name] = normalizer


def get_normalizer(normalizer: str | Normalizer) -> Normalizer:
    """Looks a normalizer up by name; a callable is returned unchanged."""
    if callable(normalizer):
        return normalizer
    try:
        return NORMALIZERS[normalizer]
    except KeyError:
        raise ValueError(
            f"unknown normalizer {normalizer!r}; choose one of {sorted(NORMALIZERS)}"
        ) from None
