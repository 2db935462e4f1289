"""Attention score functions (pure JAX).

Queries are `[batch, q_length, heads, head_dim]` and keys
`[batch, kv_length, heads, head_dim]`, as in `jax.nn.dot_product_attention`;
every function returns scores `[batch, heads, q_length, kv_length]`.

The functions that need parameters take them as arguments so that modules
can hoist projections out of recurrent loops (project the keys once, the
query once per step).

References:
  Bahdanau, Cho & Bengio (2014), "Neural Machine Translation by Jointly
    Learning to Align and Translate", eq. (6) and appendix A.1.2.
  Luong, Pham & Manning (2015), "Effective Approaches to Attention-based
    Neural Machine Translation", eq. (8) (dot, general, concat) and (9) (location).
  Vaswani et al. (2017), "Attention Is All You Need", eq. (1).
"""

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_qk(name: str, query: Array, key: Array) -> None:
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(
            f"{name}: query and key must be [batch, length, heads, head_dim], "
            f"got {query.shape} and {key.shape}"
        )
    if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{name}: batch and heads of query {query.shape} and key {key.shape} differ"
        )


def dot_scores(query: Array, key: Array) -> Array:
    """score(h_t, h_s) = h_t . h_s  (Luong eq. 8, 'dot')."""
    _check_qk("dot_scores", query, key)
    return jnp.einsum("bqhd,bkhd->bhqk", query, key)


def scaled_dot_scores(query: Array, key: Array, scale: float | None = None) -> Array:
    """score(q, k) = q . k / sqrt(d_k)  (Vaswani eq. 1); `scale` overrides 1/sqrt(d_k)."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return dot_scores(query, key) * scale


def general_scores(query: Array, key: Array, kernel: Array) -> Array:
    """score(h_t, h_s) = h_t^T W_a h_s  (Luong eq. 8, 'general').

    Args:
      query: `[batch, q_length, heads, d_q]`.
      key: `[batch, kv_length, heads, d_k]`.
      kernel: `[heads, d_q, d_k]`, the bilinear map W_a of each head.
    """
    _check_qk("general_scores", query, key)
    if kernel.shape != (query.shape[2], query.shape[3], key.shape[3]):
        raise ValueError(
            f"general_scores: kernel must be [heads, d_q, d_k] = "
            f"{(query.shape[2], query.shape[3], key.shape[3])}, got {kernel.shape}"
        )
    return jnp.einsum("bqhd,hde,bkhe->bhqk", query, kernel, key)


def additive_scores(projected_query: Array, projected_key: Array, v: Array) -> Array:
    """score(q, k) = v^T tanh(W q + U k)  (Bahdanau eq. 6 / A.1.2; Luong 'concat').

    The projections W q and U k are computed by the caller (once for the
    keys, outside any decoder loop).

    Args:
      projected_query: `[batch, q_length, heads, attn_dim]`, W q.
      projected_key: `[batch, kv_length, heads, attn_dim]`, U k.
      v: `[heads, attn_dim]`.
    """
    _check_qk("additive_scores", projected_query, projected_key)
    if projected_query.shape[-1] != projected_key.shape[-1]:
        raise ValueError(
            "additive_scores: projected query and key dims differ: "
            f"{projected_query.shape} vs {projected_key.shape}"
        )
    if v.shape != (projected_query.shape[2], projected_query.shape[3]):
        raise ValueError(
            f"additive_scores: v must be [heads, attn_dim] = {projected_query.shape[2:]}, "
            f"got {v.shape}"
        )
    hidden = jnp.tanh(projected_query[:, :, None] + projected_key[:, None, :])
    return jnp.einsum("bqkhd,hd->bhqk", hidden, v)


def location_scores(query: Array, kernel: Array, kv_length: int) -> Array:
    """a_t = W_a h_t: scores from the query alone  (Luong eq. 9, 'location').

    The scores depend only on the decoder state; the kernel has one output
    per source position up to a maximum length, of which the first
    `kv_length` are used.

    Args:
      query: `[batch, q_length, heads, d_q]`.
      kernel: `[heads, d_q, max_kv_length]`.
      kv_length: number of source positions actually present.
    """
    if query.ndim != 4:
        raise ValueError(f"location_scores: query must be 4-D, got {query.shape}")
    if kernel.ndim != 3 or kernel.shape[:2] != query.shape[2:]:
        raise ValueError(
            f"location_scores: kernel must be [heads, d_q, max_kv_length] with "
            f"[heads, d_q] = {query.shape[2:]}, got {kernel.shape}"
        )
    if kv_length > kernel.shape[2]:
        raise ValueError(
            f"location_scores: kv_length {kv_length} exceeds the kernel's maximum "
            f"source length {kernel.shape[2]}"
        )
    return jnp.einsum("bqhd,hdk->bhqk", query, kernel[:, :, :kv_length])
