"""The source memory of RNN attention and the helpers its modules share.

An RNN decoder attends over the same source at every output step. The
source-side work (projecting every encoder state) does not depend on the
step, so each module does it once in its `prepare_memory`, which returns an
`AttentionMemory`; the per-step `__call__` only projects the query. Inside a
`jax.lax.scan` over decoder steps, pass the memory in (it is a pytree) and
the source is never re-projected.

Every module built on it (`attnx.layers.recurrent_attention`,
`attnx.layers.luong_attention`) accepts either one decoder step or a whole
sequence of queries (teacher forcing):

  query `[batch, query_dim]`        -> context `[batch, value_dim]`,
                                       weights `[batch, kv_length]`;
  query `[batch, q_length, query_dim]` -> context `[batch, q_length, value_dim]`,
                                       weights `[batch, q_length, kv_length]`.

The memory's mask is a padding mask `[batch, kv_length]`, True at real source
positions; padded positions get weight 0, and an example with no real
position gets a zero context and zero weights (never NaN).

Here: `AttentionMemory`; `check_memory_inputs` and `query_as_sequence`, the
argument checks of `prepare_memory` and `__call__`; `normalize_scores` and
`weighted_sum`, scores -> weights -> context; `scoring_vector_init`, N(0, 1/n)
for a scoring vector such as Bahdanau's v_a, Luong's v_a and v_p, or the v and
f_beta of `attnx.layers.spatial`.
"""

import jax
import jax.numpy as jnp
from flax import struct

from attnx.layers.normalizers import Normalizer

Array = jax.Array


@struct.dataclass
class AttentionMemory:
    """The source an RNN decoder attends to, with its step-independent projections.

    Attributes:
      keys: `[batch, kv_length, key_dim]`, the encoder states h_j scored against the query.
      values: `[batch, kv_length, value_dim]`, what the context averages (usually the keys).
      mask: `[batch, kv_length]` bool, True at real (non-padding) positions.
      projected_keys: the module's key-side projection (e.g. U_a h_j,
        `[batch, kv_length, heads, attention_dim]`), or None when the score
        needs none (Luong 'dot' and 'location').
    """

    keys: Array
    values: Array
    mask: Array
    projected_keys: Array | None = None

    @property
    def lengths(self) -> Array:
        """`[batch]` number of real source positions."""
        return jnp.sum(self.mask, axis=-1)


def check_memory_inputs(
    name: str,
    keys: Array,
    values: Array | None,
    mask: Array | None,
    key_dim: int,
    value_dim: int | None = None,
) -> tuple[Array, Array, Array]:
    """Validates the arguments of a `prepare_memory` and fills in the defaults.

    Returns `(keys, values, mask)` with `values = keys` and an all-True mask
    when they are not given.
    """
    keys = jnp.asarray(keys)
    if keys.ndim != 3 or keys.shape[-1] != key_dim:
        raise ValueError(
            f"{name}.prepare_memory: keys must be [batch, kv_length, key_dim={key_dim}], "
            f"got {keys.shape}"
        )
    values = keys if values is None else jnp.asarray(values)
    if values.ndim != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"{name}.prepare_memory: values must be [batch, kv_length, value_dim] with "
            f"[batch, kv_length] = {keys.shape[:2]} as the keys, got {values.shape}"
        )
    if value_dim is not None and values.shape[-1] != value_dim:
        raise ValueError(
            f"{name}.prepare_memory: values have dim {values.shape[-1]}, "
            f"the module was built for value_dim={value_dim}"
        )
    if mask is None:
        mask = jnp.ones(keys.shape[:2], bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != keys.shape[:2]:
            raise ValueError(
                f"{name}.prepare_memory: mask must be [batch, kv_length] = {keys.shape[:2]} "
                f"(True at real source positions), got {mask.shape}"
            )
        mask = mask.astype(bool)
    return keys, values, mask


def query_as_sequence(name: str, query: Array, query_dim: int, batch: int) -> tuple[Array, bool]:
    """`[batch, query_dim]` or `[batch, q_length, query_dim]` -> the 3-D form.

    Returns the query as `[batch, q_length, query_dim]` and whether it was a
    single step (so the caller can drop the `q_length` axis again).
    """
    query = jnp.asarray(query)
    if query.ndim not in (2, 3) or query.shape[-1] != query_dim or query.shape[0] != batch:
        raise ValueError(
            f"{name}: query must be [batch={batch}, query_dim={query_dim}] (one step) or "
            f"[batch={batch}, q_length, query_dim={query_dim}] (a sequence), got {query.shape}"
        )
    single_step = query.ndim == 2
    return (query[:, None] if single_step else query), single_step


def normalize_scores(normalizer: Normalizer, scores: Array, mask: Array) -> Array:
    """Scores `[batch, heads, q_length, kv_length]` -> weights, in float32.

    `mask` broadcasts to the scores. Normalising in float32 keeps low-precision
    compute dtypes from rounding small weights to zero.
    """
    return normalizer(scores.astype(jnp.float32), mask)


def weighted_sum(weights: Array, values: Array) -> Array:
    """c = sum_j alpha_j v_j: weights `[batch, heads, q, kv]`, values `[batch, kv, dim]`.

    Returns `[batch, q_length, heads, dim]`.
    """
    return jnp.einsum("bhqk,bkd->bqhd", weights.astype(values.dtype), values)


def scoring_vector_init(
    key: Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32
) -> Array:
    """N(0, 1/n) for the scoring vector v (its last axis has n entries)."""
    return jax.random.normal(key, shape, dtype) / jnp.sqrt(jnp.asarray(shape[-1], dtype))
