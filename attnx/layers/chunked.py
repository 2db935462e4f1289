"""Memory-efficient softmax attention: blocks of queries x blocks of keys.

Rabe & Staats (2021), "Self-attention Does Not Need O(n^2) Memory": softmax
attention can be computed one block of keys at a time, keeping per query only
a running maximum `m`, a running sum `l` and an accumulator `acc`:

  m'   = max(m, max_j s_j)
  l'   = l * exp(m - m') + sum_j exp(s_j - m')
  acc' = acc * exp(m - m') + sum_j exp(s_j - m') v_j
  out  = acc / l

(their algorithm with the running maximum that keeps it numerically stable,
written in the "online softmax" form). The backward pass
follows FlashAttention (Dao et al. 2022, Alg. 4): the forward keeps only the
output and the log-sum-exp `lse = m + log(l)` of every query, and the backward
recomputes each block's weights `p = exp(s - lse)` from them. Neither pass
ever holds a `[q_length, kv_length]` array, so memory is O(length) in forward
AND backward (a `jax.custom_vjp`; plain autodiff of the loops would store every
block's weights). Only a dense mask or bias given by the caller is, naturally,
as large as it is (and a full-size bias gets a full-size gradient).

Masks are built block by block from the `attnx.layers.masks.MaskSpec` (causal,
local window, segment ids, slices of a dense mask); blocks that the causal /
local structure rules out entirely are not visited at all. Bias is sliced per block and gets
a gradient (relative position biases are learned). Dropout is applied to the
normalised weights in the accumulator's numerator only, with the keep-mask of
block (i, j) drawn from `fold_in(fold_in(rng, i), j)` so the backward pass can
redraw it (so the keep-mask differs from the 'reference' implementation's for
the same rng; both are exact inverted dropout).

Limitations: first-order reverse-mode only (no `jax.jvp`, no grad-of-grad).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnx.layers.masks import MaskSpec

Array = jax.Array

DEFAULT_QUERY_CHUNK_SIZE = 512
DEFAULT_KEY_CHUNK_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class _BlockConfig:
    """Static (hashable) parameters of one chunked-attention computation.

    `max_back` / `max_ahead` bound how far behind / ahead of its own position a
    query may look (from is_causal and local_window); they let the loops skip
    blocks that are masked out entirely.
    """

    scale: float
    dropout_rate: float
    query_chunk: int
    key_chunk: int
    kv_length: int  # unpadded: keys at positions >= kv_length are padding
    is_causal: bool
    local_window: tuple[int, int] | None
    max_back: int
    max_ahead: int


def _split_heads(x: Array, num_kv_heads: int, group: int) -> Array:
    """`[B, N, Q, K]` with N in (1, num_heads) -> `[B, kv_heads|1, group|1, Q, K]`."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], num_kv_heads, group, *x.shape[2:])


def _slice_block(x: Array, q_start: Array, q_size: int, k_start: Array, k_size: int) -> Array:
    """Slices the query/key axes (the last two) of `x` unless they are broadcast (size 1)."""
    if x.shape[-2] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, q_start, q_size, axis=-2)
    if x.shape[-1] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, k_start, k_size, axis=-1)
    return x


def _block_scores(config, q_block, k_block, bias, dense, q_seg, kv_seg, q_start, k_start):
    """Scaled, biased, masked scores of one block.

    Returns:
      `(scores, allowed)`: scores `[b, kv_heads, group, bq, bk]` float32 with -inf where
      masked, and the boolean mask (or None when every entry is allowed).
    """
    bq, bk = config.query_chunk, config.key_chunk
    num_kv_heads, group = q_block.shape[2], q_block.shape[3]
    scores = jnp.einsum("bqkgh,bskh->bkgqs", q_block, k_block, preferred_element_type=jnp.float32)
    scores = scores * config.scale
    if bias is not None:
        bias_block = _slice_block(bias, q_start, bq, k_start, bk).astype(jnp.float32)
        scores = scores + _split_heads(bias_block, num_kv_heads, group)
    spec = MaskSpec(dense, config.is_causal, q_seg, kv_seg, config.local_window)
    allowed = spec.block(q_start, bq, k_start, bk)
    if allowed is not None:
        allowed = _split_heads(allowed, num_kv_heads, group)
    if config.kv_length % bk:
        # Keys past kv_length are padding added by `chunked_attention`.
        real = (k_start + jnp.arange(bk) < config.kv_length)[None, None, None, None, :]
        allowed = real if allowed is None else allowed & real
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    return scores, allowed


def _keep_scale(config, rng, i, j, shape) -> Array | None:
    """Dropout keep-mask of block (i, j), already divided by the keep probability."""
    if config.dropout_rate == 0.0:
        return None
    block_rng = jax.random.fold_in(jax.random.fold_in(rng, i), j)
    # Drawn flat and reshaped: same distribution, but XLA:CPU compiles the counter-based
    # generator for a rank-5 shape about ten times slower than for a flat one.
    keep = jax.random.bernoulli(block_rng, 1.0 - config.dropout_rate, (math.prod(shape),))
    keep = keep.reshape(shape)
    return jnp.where(keep, 1.0 / (1.0 - config.dropout_rate), 0.0)


def _key_block_range(config, i, num_key_blocks):
    """Key blocks `[lo, hi)` that query block i may see (others are fully masked)."""
    bq, bk = config.query_chunk, config.key_chunk
    q_start = i * bq
    lo = jnp.maximum(0, (q_start - config.max_back) // bk)
    hi = jnp.minimum(num_key_blocks, (q_start + bq - 1 + config.max_ahead) // bk + 1)
    return lo, hi


def _query_block_range(config, j, num_query_blocks):
    """Query blocks `[lo, hi)` that may see key block j."""
    bq, bk = config.query_chunk, config.key_chunk
    k_start = j * bk
    lo = jnp.maximum(0, (k_start - config.max_ahead) // bq)
    hi = jnp.minimum(num_query_blocks, (k_start + bk - 1 + config.max_back) // bq + 1)
    return lo, hi


def _forward(config, query, key, value, bias, dense, q_seg, kv_seg, rng):
    """Online-softmax forward pass.

    Args:
      query: `[b, Tq, kv_heads, group, h]`, Tq a multiple of the query chunk.
      key: `[b, Tk, kv_heads, h]`; value `[b, Tk, kv_heads, hv]`, Tk a multiple of the key chunk.

    Returns:
      `(output [b, Tq, kv_heads, group, hv], lse [b, kv_heads, group, Tq])`.
    """
    b, tq, kh, g, _ = query.shape
    tk, hv = key.shape[1], value.shape[-1]
    bq, bk = config.query_chunk, config.key_chunk
    num_q_blocks, num_k_blocks = tq // bq, tk // bk

    def query_block(i):
        q_start = i * bq
        q_block = jax.lax.dynamic_slice_in_dim(query, q_start, bq, axis=1)

        def key_block(j, carry):
            m, total, acc = carry
            k_start = j * bk
            k_block = jax.lax.dynamic_slice_in_dim(key, k_start, bk, axis=1)
            v_block = jax.lax.dynamic_slice_in_dim(value, k_start, bk, axis=1)
            scores, _ = _block_scores(
                config, q_block, k_block, bias, dense, q_seg, kv_seg, q_start, k_start
            )
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            # A row that has seen no allowed key yet keeps m = -inf; shift by 0 instead
            # so that exp(-inf - shift) = 0 rather than NaN.
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(scores - shift[..., None])
            correction = jnp.exp(m - shift)
            total = total * correction + jnp.sum(p, axis=-1)
            keep = _keep_scale(config, rng, i, j, p.shape)
            numerator = p if keep is None else p * keep
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bskd->bkgqd",
                numerator.astype(value.dtype),
                v_block,
                preferred_element_type=jnp.float32,
            )
            return m_new, total, acc

        init = (
            jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, hv), jnp.float32),
        )
        lo, hi = _key_block_range(config, i, num_k_blocks)
        m, total, acc = jax.lax.fori_loop(lo, hi, key_block, init)
        has_key = total > 0
        safe_total = jnp.where(has_key, total, 1.0)
        out = jnp.where(has_key[..., None], acc / safe_total[..., None], 0.0)
        # Empty rows get lse = 0: every score of theirs is -inf, so the backward
        # pass recomputes p = exp(-inf - 0) = 0 for them.
        lse = jnp.where(has_key, m + jnp.log(safe_total), 0.0)
        return out, lse

    out, lse = jax.lax.map(query_block, jnp.arange(num_q_blocks))
    # out: [nq, b, kh, g, bq, hv] -> [b, Tq, kh, g, hv]; lse: [nq, b, kh, g, bq] -> [b, kh, g, Tq]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, tq, kh, g, hv)
    lse = jnp.transpose(lse, (1, 2, 3, 0, 4)).reshape(b, kh, g, tq)
    return out.astype(value.dtype), lse


def _reduce_to_bias_block(ds: Array, bias_shape: tuple[int, ...]) -> Array:
    """Sums `ds` `[b, kh, g, bq, bk]` down to the broadcast shape of a bias block."""
    b, kh, g, bq, bk = ds.shape
    grad = ds.reshape(b, kh * g, bq, bk)
    for axis, size in enumerate(bias_shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = jnp.sum(grad, axis=axis, keepdims=True)
    return grad


def _backward(config, residuals, d_out):
    """FlashAttention backward: recompute each block's weights from the saved lse."""
    query, key, value, bias, dense, q_seg, kv_seg, rng, out, lse = residuals
    b, tq, kh, g, _ = query.shape
    tk = key.shape[1]
    bq, bk = config.query_chunk, config.key_chunk
    num_q_blocks, num_k_blocks = tq // bq, tk // bk

    d_out = d_out.astype(jnp.float32)
    # D_i = sum_d dO_id O_id = sum_j W_ij dW_ij: the softmax Jacobian's row term
    # (also with dropout, since O already holds the dropped-out weights).
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", d_out, out.astype(jnp.float32))

    def key_block(j, carry):
        dq, dk, dv, dbias = carry
        k_start = j * bk
        k_block = jax.lax.dynamic_slice_in_dim(key, k_start, bk, axis=1)
        v_block = jax.lax.dynamic_slice_in_dim(value, k_start, bk, axis=1)

        def query_block(i, inner):
            dk_j, dv_j, dq, dbias = inner
            q_start = i * bq
            q_block = jax.lax.dynamic_slice_in_dim(query, q_start, bq, axis=1)
            do_block = jax.lax.dynamic_slice_in_dim(d_out, q_start, bq, axis=1)
            lse_block = jax.lax.dynamic_slice_in_dim(lse, q_start, bq, axis=3)
            delta_block = jax.lax.dynamic_slice_in_dim(delta, q_start, bq, axis=3)
            scores, _ = _block_scores(
                config, q_block, k_block, bias, dense, q_seg, kv_seg, q_start, k_start
            )
            p = jnp.exp(scores - lse_block[..., None])  # masked entries: exp(-inf) = 0
            keep = _keep_scale(config, rng, i, j, p.shape)
            weights = p if keep is None else p * keep
            dv_j = dv_j + jnp.einsum("bkgqs,bqkgd->bskd", weights, do_block)
            d_weights = jnp.einsum(
                "bqkgd,bskd->bkgqs", do_block, v_block, preferred_element_type=jnp.float32
            )
            dp = d_weights if keep is None else d_weights * keep
            ds = p * (dp - delta_block[..., None])
            dq_i = config.scale * jnp.einsum(
                "bkgqs,bskh->bqkgh", ds, k_block, preferred_element_type=jnp.float32
            )
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, q_start, bq, axis=1) + dq_i, q_start, axis=1
            )
            dk_j = dk_j + config.scale * jnp.einsum(
                "bkgqs,bqkgh->bskh", ds, q_block, preferred_element_type=jnp.float32
            )
            if dbias is not None:
                starts = (
                    0,
                    0,
                    q_start if dbias.shape[2] != 1 else 0,
                    k_start if dbias.shape[3] != 1 else 0,
                )
                grad = _reduce_to_bias_block(ds, dbias.shape)
                current = jax.lax.dynamic_slice(dbias, starts, grad.shape)
                dbias = jax.lax.dynamic_update_slice(dbias, current + grad, starts)
            return dk_j, dv_j, dq, dbias

        init = (
            jnp.zeros((b, bk, kh, key.shape[-1]), jnp.float32),
            jnp.zeros((b, bk, kh, value.shape[-1]), jnp.float32),
            dq,
            dbias,
        )
        lo, hi = _query_block_range(config, j, num_q_blocks)
        dk_j, dv_j, dq, dbias = jax.lax.fori_loop(lo, hi, query_block, init)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, k_start, axis=1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, k_start, axis=1)
        return dq, dk, dv, dbias

    init = (
        jnp.zeros(query.shape, jnp.float32),
        jnp.zeros(key.shape, jnp.float32),
        jnp.zeros(value.shape, jnp.float32),
        None if bias is None else jnp.zeros(bias.shape, jnp.float32),
    )
    dq, dk, dv, dbias = jax.lax.fori_loop(0, num_k_blocks, key_block, init)
    return (
        dq.astype(query.dtype),
        dk.astype(key.dtype),
        dv.astype(value.dtype),
        None if bias is None else dbias.astype(bias.dtype),
        _no_cotangent(dense),
        _no_cotangent(q_seg),
        _no_cotangent(kv_seg),
        _no_cotangent(rng),
    )


def _no_cotangent(x: Array | None):
    """The cotangent of a non-differentiable (boolean, integer or key) input."""
    return None if x is None else np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(config, query, key, value, bias, dense, q_seg, kv_seg, rng):
    return _forward(config, query, key, value, bias, dense, q_seg, kv_seg, rng)[0]


def _blocked_attention_fwd(config, query, key, value, bias, dense, q_seg, kv_seg, rng):
    out, lse = _forward(config, query, key, value, bias, dense, q_seg, kv_seg, rng)
    return out, (query, key, value, bias, dense, q_seg, kv_seg, rng, out, lse)


_blocked_attention.defvjp(_blocked_attention_fwd, _backward)


def _pad_axis(x: Array | None, axis: int, length: int, value=0) -> Array | None:
    """Pads `x` along `axis` to `length` (broadcast axes of size 1 are left alone)."""
    if x is None or x.shape[axis] in (1, length):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _chunk_size(requested: int | None, default: int, length: int) -> int:
    """The requested chunk size (capped to the length), or a default that pads little.

    The default splits `length` into `ceil(length / default)` equal chunks, so that e.g.
    600 queries make two chunks of 300 rather than 512 + 512 with 424 of padding.
    """
    if requested is not None:
        return min(requested, length)
    num_chunks = -(-length // default)
    return -(-length // num_chunks)


def chunked_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    spec: MaskSpec,
    bias: Array | None,
    scale: float,
    dropout_rate: float,
    dropout_rng: Array | None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> Array:
    """Softmax attention in O(length) memory (Rabe & Staats 2021; FlashAttention backward).

    Args:
      query: `[batch, q_length, num_heads, head_dim]`.
      key: `[batch, kv_length, num_kv_heads, head_dim]`, `num_kv_heads` dividing `num_heads`.
      value: `[batch, kv_length, num_kv_heads, value_dim]`.
      spec: the masks; built block by block, never materialised whole.
      bias: added to the scores, broadcastable to `[batch, num_heads, q_length, kv_length]`.
      scale: multiplies `q . k`.
      dropout_rate: dropout on the normalised weights.
      dropout_rng: PRNG key, needed when `dropout_rate > 0`.
      query_chunk_size: queries per block; default at most 512 (equal chunks).
      key_chunk_size: keys per block; default at most 1024 (equal chunks).
        Lengths need not be multiples of the chunk sizes: the tails are padded and masked.

    Returns:
      `[batch, q_length, num_heads, value_dim]`; zero for queries with no allowed key.
    """
    batch, q_length, num_heads, _ = query.shape
    kv_length, num_kv_heads = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    for name, size in (("query_chunk_size", query_chunk_size), ("key_chunk_size", key_chunk_size)):
        if size is not None and size < 1:
            raise ValueError(f"chunked_attention: {name} must be >= 1, got {size}")
    query_chunk = _chunk_size(query_chunk_size, DEFAULT_QUERY_CHUNK_SIZE, q_length)
    key_chunk = _chunk_size(key_chunk_size, DEFAULT_KEY_CHUNK_SIZE, kv_length)
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("chunked_attention: dropout_rate > 0 needs a dropout_rng")

    padded_q = -(-q_length // query_chunk) * query_chunk
    padded_kv = -(-kv_length // key_chunk) * key_chunk
    # Padded queries are sliced off at the end; padded keys are masked out by position
    # (and, with segment ids, by segment 0, which attends nothing).
    query = _pad_axis(query, 1, padded_q)
    key = _pad_axis(key, 1, padded_kv)
    value = _pad_axis(value, 1, padded_kv)
    if bias is not None:
        bias = _pad_axis(_pad_axis(jnp.asarray(bias), 2, padded_q), 3, padded_kv)
    dense = _pad_axis(_pad_axis(spec.dense, 2, padded_q, False), 3, padded_kv, False)
    q_seg = _pad_axis(spec.q_segment_ids, 1, padded_q)
    kv_seg = _pad_axis(spec.kv_segment_ids, 1, padded_kv)

    unbounded = padded_q + padded_kv
    max_back, max_ahead = unbounded, unbounded
    if spec.local_window is not None:
        max_back, max_ahead = spec.local_window
    if spec.is_causal:
        max_ahead = min(max_ahead, 0)
    config = _BlockConfig(
        scale=float(scale),
        dropout_rate=float(dropout_rate),
        query_chunk=query_chunk,
        key_chunk=key_chunk,
        kv_length=kv_length,
        is_causal=spec.is_causal,
        local_window=spec.local_window,
        max_back=max_back,
        max_ahead=max_ahead,
    )
    grouped = query.reshape(batch, padded_q, num_kv_heads, group, query.shape[-1])
    rng = dropout_rng if dropout_rate > 0.0 else None
    out = _blocked_attention(config, grouped, key, value, bias, dense, q_seg, kv_seg, rng)
    out = out.reshape(batch, padded_q, num_heads, value.shape[-1])
    return out[:, :q_length]
