"""Position information for attention: absolute, rotary and relative.

Attention is permutation-invariant, so order must be injected:

* `sinusoidal_positions` / `SinusoidalPositions`: fixed sinusoids added to
  the inputs (Vaswani et al. 2017, sec. 3.5).
* `LearnedPositions`: a trained `[max_length, dim]` table added to the inputs
  (Gehring et al. 2017, sec. 3.1; Devlin et al. 2019).
* `apply_rotary`: rotary position embeddings applied to queries and keys
  (Su et al. 2021, RoFormer, eq. 34), so that q_m . k_n depends on m - n only.
* `RelativePositionBias`: a learned per-head scalar added to the attention
  logits, indexed by the bucketed distance k - q (Raffel et al. 2020, T5,
  sec. 2.1; with `num_buckets=None`, Shaw et al. 2018 clipping).

Every function takes explicit integer positions, so that packed sequences
(positions restart at 0 in each segment) and incremental decoding (the new
token sits at the cache index) get the same embeddings as a full pass.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnx.layers.params import Initializer, param

Array = jax.Array


def _default_positions(name: str, inputs: Array, positions: Array | None) -> Array:
    """`[batch, length]` positions; `arange(length)` for every example when None."""
    if inputs.ndim != 3:
        raise ValueError(f"{name}: inputs must be [batch, length, dim], got {inputs.shape}")
    batch, length = inputs.shape[:2]
    if positions is None:
        return jnp.broadcast_to(jnp.arange(length), (batch, length))
    positions = jnp.asarray(positions)
    if positions.ndim not in (1, 2) or positions.shape[-1] != length:
        raise ValueError(
            f"{name}: positions must be [batch, length={length}] or [length={length}], "
            f"got {positions.shape}"
        )
    return jnp.broadcast_to(positions, (batch, length))


# ---------------------------------------------------------------- sinusoidal


def sinusoidal_positions(
    length: int | None,
    dim: int,
    *,
    positions: Array | None = None,
    base: float = 10000.0,
    dtype: jnp.dtype = jnp.float32,
) -> Array:
    """Sinusoidal position encodings (Vaswani et al. 2017, sec. 3.5).

      PE(pos, 2i)     = sin(pos / base^(2i / dim))
      PE(pos, 2i + 1) = cos(pos / base^(2i / dim))

    Sines and cosines are interleaved exactly as in the formula (even feature
    indices hold sines, odd ones cosines), not concatenated as in tensor2tensor.
    An odd `dim` keeps the last sine, as the formula does.

    Args:
      length: number of positions `0 .. length - 1`; may be None when
        `positions` is given (it must then equal `positions.shape[-1]`).
      dim: encoding size d_model.
      positions: optional integer positions of any shape, e.g. `[batch, length]`
        for packed sequences or `[batch, 1]` at a decode step.
      base: 10000 in the paper.
      dtype: output dtype (computed in float32).

    Returns:
      `[length, dim]`, or `[*positions.shape, dim]` when `positions` is given.
    """
    if dim < 1:
        raise ValueError(f"sinusoidal_positions: dim must be >= 1, got {dim}")
    if positions is None:
        if length is None or length < 0:
            raise ValueError(f"sinusoidal_positions: give length >= 0 or positions, got {length}")
        positions = jnp.arange(length)
    else:
        positions = jnp.asarray(positions)
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(
                f"sinusoidal_positions: positions must be integers, got {positions.dtype}"
            )
        if length is not None and positions.shape[-1:] != (length,):
            raise ValueError(
                f"sinusoidal_positions: positions {positions.shape} do not end in length={length}"
            )
    # 2i / d for i = 0 .. ceil(d / 2) - 1, computed in float32 for every dtype.
    even_index = jnp.arange(0, dim, 2, dtype=jnp.float32)
    inverse_timescale = jnp.asarray(base, jnp.float32) ** (-even_index / dim)
    angle = positions.astype(jnp.float32)[..., None] * inverse_timescale
    # Stack (sin, cos) on a trailing axis and flatten: sin0, cos0, sin1, cos1, ...
    interleaved = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)
    interleaved = interleaved.reshape(*angle.shape[:-1], 2 * angle.shape[-1])
    return interleaved[..., :dim].astype(dtype)


class SinusoidalPositions(nnx.Module):
    """Adds fixed sinusoidal encodings to the inputs (Vaswani et al. 2017, sec. 3.5).

    No parameters; a module so that models can swap it with `LearnedPositions`.
    The Transformer scales its embeddings by sqrt(d_model) *before* this
    addition (sec. 3.4); that is the caller's job.

    Args:
      dim: feature size of the inputs.
      base: 10000 in the paper.
    """

    def __init__(self, dim: int, *, base: float = 10000.0):
        if dim < 1:
            raise ValueError(f"SinusoidalPositions: dim must be >= 1, got {dim}")
        self.dim = dim
        self.base = base

    def embed(self, positions: Array) -> Array:
        """Integer positions `[...]` -> encodings `[..., dim]` (float32)."""
        return sinusoidal_positions(None, self.dim, positions=positions, base=self.base)

    def __call__(self, inputs: Array, positions: Array | None = None) -> Array:
        """inputs + PE.

        Args:
          inputs: `[batch, length, dim]`.
          positions: `[batch, length]` (or `[length]`) integer positions;
            default `0 .. length - 1`. Pass the cache index at a decode step.

        Returns:
          `[batch, length, dim]` in the inputs' dtype.
        """
        positions = _default_positions("SinusoidalPositions", inputs, positions)
        if inputs.shape[-1] != self.dim:
            raise ValueError(
                f"SinusoidalPositions: inputs have dim {inputs.shape[-1]}, expected {self.dim}"
            )
        return inputs + self.embed(positions).astype(inputs.dtype)


# ------------------------------------------------------------------- learned


class LearnedPositions(nnx.Module):
    """Adds a learned position embedding to the inputs.

    One trained vector per absolute position, as in ConvS2S (Gehring et al.
    2017, sec. 3.1: e = (w_1 + p_1, ..., w_m + p_m)) and BERT.

    Positions outside `[0, max_length)` cannot be checked inside `jit`; they
    look up NaN vectors (`jnp.take(..., mode='fill')`), so the mistake shows
    instead of being silently clamped to the last row.

    Attributes:
      embedding: `[max_length, dim]`, logical axes `('positions', 'embed')`.
    """

    def __init__(
        self,
        max_length: int,
        dim: int,
        *,
        embedding_init: Initializer = nnx.initializers.normal(stddev=0.02),
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if max_length < 1 or dim < 1:
            raise ValueError(
                f"LearnedPositions: max_length and dim must be >= 1, got {max_length}, {dim}"
            )
        self.max_length = max_length
        self.dim = dim
        self.dtype = dtype
        self.embedding = param(
            rngs, embedding_init, (max_length, dim), ("positions", "embed"), param_dtype
        )

    def embed(self, positions: Array) -> Array:
        """Integer positions `[...]` -> embeddings `[..., dim]` in the compute dtype."""
        table = self.embedding[...].astype(self.dtype)
        positions = jnp.asarray(positions)
        # jnp.take wraps negative indices around; send them out of range instead.
        positions = jnp.where(positions < 0, self.max_length, positions)
        return jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)

    def __call__(self, inputs: Array, positions: Array | None = None) -> Array:
        """inputs + P[positions].

        Args:
          inputs: `[batch, length, dim]`.
          positions: `[batch, length]` (or `[length]`) integer positions;
            default `0 .. length - 1` (then `length <= max_length` is checked).

        Returns:
          `[batch, length, dim]`.
        """
        if positions is None and inputs.ndim == 3 and inputs.shape[1] > self.max_length:
            raise ValueError(
                f"LearnedPositions: inputs have length {inputs.shape[1]} > "
                f"max_length={self.max_length}"
            )
        positions = _default_positions("LearnedPositions", inputs, positions)
        if inputs.shape[-1] != self.dim:
            raise ValueError(
                f"LearnedPositions: inputs have dim {inputs.shape[-1]}, expected {self.dim}"
            )
        return (inputs + self.embed(positions)).astype(self.dtype)


# -------------------------------------------------------------------- rotary


def apply_rotary(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotary position embedding (Su et al. 2021, RoFormer, eq. 34).

    Feature pairs (x_{2i}, x_{2i+1}) -- adjacent, *interleaved* pairs as in the
    paper, not GPT-NeoX's "rotate half" pairs (x_i, x_{i + d/2}) -- are rotated by
    the angle m * theta_i, theta_i = base^(-2i / d), at position m:

      out_{2i}     = x_{2i} cos(m theta_i) - x_{2i+1} sin(m theta_i)
      out_{2i+1}   = x_{2i+1} cos(m theta_i) + x_{2i} sin(m theta_i)

    Applied to queries at m and keys at n, (R_m q) . (R_n k) = q^T R_{n-m} k
    depends on the offset only (eq. 16). The two pairings differ by a fixed
    permutation of the head features, so they are equally expressive but
    their trained weights are not interchangeable.

    Args:
      x: `[batch, length, heads, head_dim]` queries or keys; `head_dim` even.
      positions: integer positions `[batch, length]` (or `[length]`); at a
        decode step, the cache index of each new token.
      base: 10000 in the paper.

    Returns:
      `x` rotated, same shape and dtype (angles computed in float32).
    """
    if x.ndim != 4 or x.shape[-1] % 2:
        raise ValueError(
            f"apply_rotary: x must be [batch, length, heads, head_dim] with an even head_dim, "
            f"got {x.shape}"
        )
    positions = jnp.asarray(positions)
    if positions.ndim not in (1, 2) or positions.shape[-1] != x.shape[1]:
        raise ValueError(
            f"apply_rotary: positions must be [batch, length={x.shape[1]}] or [length], "
            f"got {positions.shape}"
        )
    positions = jnp.broadcast_to(positions, x.shape[:2])
    half = x.shape[-1] // 2
    theta = jnp.asarray(base, jnp.float32) ** (
        -jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1]
    )
    angle = positions.astype(jnp.float32)[:, :, None, None] * theta  # [b, t, 1, d/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], half, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


# ---------------------------------------------------------- relative bias


def t5_bucket_table(num_buckets: int, max_distance: int, bidirectional: bool) -> np.ndarray:
    """Bucket of every backward distance n = q - k in `[0, max_distance]` (T5).

    Raffel et al. (2020), sec. 2.1 and the Mesh TensorFlow code: half of the
    buckets hold exact distances 0 .. max_exact - 1; the rest cover
    max_exact .. max_distance logarithmically; farther distances share the
    last bucket. With `bidirectional`, the bucket count is split between
    keys behind and ahead of the query (see `relative_position_bucket`).

    Computed once on the host in float64, so bucket boundaries are exact
    and nothing transcendental runs on the device.

    Returns:
      int32 `[max_distance + 1]`, the bucket of |distance| within one direction.
    """
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_direction // 2
    table = np.zeros(max_distance + 1, np.int32)
    for n in range(max_distance + 1):
        if n < max_exact:
            table[n] = n
        else:
            log_ratio = math.log(n / max_exact) / math.log(max_distance / max_exact)
            table[n] = min(
                max_exact + int(log_ratio * (per_direction - max_exact)), per_direction - 1
            )
    return table


def relative_position_bucket(
    relative_position: Array,
    *,
    bidirectional: bool,
    num_buckets: int | None,
    max_distance: int,
) -> Array:
    """Maps relative positions k - q to bucket ids.

    * `num_buckets` given: T5's log buckets (Raffel et al. 2020). Bidirectional:
      keys ahead of the query (k > q) use buckets `num_buckets // 2 ..`, keys
      at or behind it `0 .. num_buckets // 2 - 1`. Unidirectional: keys ahead
      all fall in bucket 0 (a causal mask hides them anyway).
    * `num_buckets=None`: Shaw et al. (2018) clipping, one bucket per distance
      in `[-max_distance, max_distance]` (bucket = clip(k - q) + max_distance;
      `2 * max_distance + 1` buckets), or, unidirectional, per backward
      distance `min(q - k, max_distance)` (`max_distance + 1` buckets).

    Args:
      relative_position: integer array of k - q (memory position minus query position).

    Returns:
      int32 bucket ids, same shape.
    """
    relative_position = jnp.asarray(relative_position).astype(jnp.int32)
    if num_buckets is None:
        if bidirectional:
            return jnp.clip(relative_position, -max_distance, max_distance) + max_distance
        return jnp.clip(-relative_position, 0, max_distance)
    table = jnp.asarray(t5_bucket_table(num_buckets, max_distance, bidirectional))
    backward = -relative_position  # n = q - k >= 0 for keys at or behind the query
    if bidirectional:
        offset = jnp.where(backward < 0, num_buckets // 2, 0)
        distance = jnp.abs(backward)
    else:
        offset = 0
        distance = jnp.maximum(backward, 0)
    return offset + table[jnp.minimum(distance, max_distance)]


class RelativePositionBias(nnx.Module):
    """A learned per-head scalar bias on the attention logits, by relative position.

    logits_{h,q,k} += b_h[bucket(k - q)]  (Raffel et al. 2020, T5, sec. 2.1), with
    T5's logarithmic buckets, or with `num_buckets=None` one bucket per
    distance clipped at `max_distance` (the clipping of Shaw et al. 2018,
    who learn vectors a^K_{ij} per clipped distance; here one scalar per head).

    Query and key positions are explicit, so a decode step at cache index i
    passes `q_positions = i + arange(q_length)` against the cache's key
    positions and gets the same bias rows as a full pass.

    Attributes:
      embedding: `[num_buckets, heads]`, logical axes `(None, 'heads')`.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        num_buckets: int | None = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        embedding_init: Initializer = nnx.initializers.normal(stddev=0.02),
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads < 1:
            raise ValueError(f"RelativePositionBias: num_heads must be >= 1, got {num_heads}")
        if num_buckets is not None:
            min_buckets = 4 if bidirectional else 2
            if num_buckets < min_buckets:
                raise ValueError(
                    f"RelativePositionBias: num_buckets must be >= {min_buckets} "
                    f"(bidirectional={bidirectional}), got {num_buckets}"
                )
            per_direction = num_buckets // 2 if bidirectional else num_buckets
            if max_distance <= per_direction // 2:
                raise ValueError(
                    f"RelativePositionBias: max_distance={max_distance} must exceed the "
                    f"{per_direction // 2} exact buckets of num_buckets={num_buckets}"
                )
            size = num_buckets
        else:
            if max_distance < 0:
                raise ValueError(
                    f"RelativePositionBias: max_distance must be >= 0, got {max_distance}"
                )
            size = 2 * max_distance + 1 if bidirectional else max_distance + 1
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.dtype = dtype
        self.embedding = param(
            rngs, embedding_init, (size, num_heads), (None, "heads"), param_dtype
        )

    def __call__(
        self,
        q_length: int,
        kv_length: int,
        *,
        q_positions: Array | None = None,
        k_positions: Array | None = None,
    ) -> Array:
        """The bias to add to the attention logits.

        Args:
          q_length, kv_length: numbers of queries and keys.
          q_positions: `[q_length]` or `[batch, q_length]` integer positions;
            default `0 .. q_length - 1` (at a decode step: the cache index).
          k_positions: `[kv_length]` or `[batch, kv_length]`; default `0 .. kv_length - 1`.

        Returns:
          `[1, heads, q_length, kv_length]`, or `[batch, heads, q_length, kv_length]`
          when batched positions are given.
        """
        q_positions = jnp.arange(q_length) if q_positions is None else jnp.asarray(q_positions)
        k_positions = jnp.arange(kv_length) if k_positions is None else jnp.asarray(k_positions)
        for arg, pos, length in [
            ("q_positions", q_positions, q_length),
            ("k_positions", k_positions, kv_length),
        ]:
            if pos.ndim not in (1, 2) or pos.shape[-1] != length:
                raise ValueError(
                    f"RelativePositionBias: {arg} must be [{length}] or [batch, {length}], "
                    f"got {pos.shape}"
                )
        q_positions = jnp.atleast_2d(q_positions)  # [1 or batch, q]
        k_positions = jnp.atleast_2d(k_positions)
        relative = k_positions[:, None, :] - q_positions[:, :, None]  # [b, q, k]
        buckets = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias = jnp.take(self.embedding[...].astype(self.dtype), buckets, axis=0)  # [b, q, k, h]
        return jnp.transpose(bias, (0, 3, 1, 2))
