"""Boolean attention masks (True = may attend), built whole or described.

Every mask here broadcasts to `[batch, heads, q_length, kv_length]`, the layout
of `jax.nn.dot_product_attention`. Masks are combined with logical AND
(`combine_masks`) and turned into additive biases with `mask_to_bias` for code
that wants one.

`MaskSpec` describes a mask instead of holding it (a dense part plus causal,
packed-segment and local-window structure): `attnx.layers.attention` builds
one from its arguments, and each implementation either materialises it whole
(`MaskSpec.materialize`) or one block at a time (`MaskSpec.block`, used by
`attnx.layers.chunked` and `attnx.layers.splash`).
"""

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


def padding_mask(query_valid: Array | None, key_valid: Array) -> Array:
    """Mask of real (non-padding) query/key pairs.

    Args:
      query_valid: `[batch, q_length]`, true (or non-zero) at real query tokens,
        or None to allow every query (cross-attention over a padded source).
      key_valid: `[batch, kv_length]`, true (or non-zero) at real key tokens.

    Returns:
      `[batch, 1, q_length, kv_length]` if `query_valid` is given, else
      `[batch, 1, 1, kv_length]`.
    """
    key_valid = jnp.asarray(key_valid).astype(bool)
    if key_valid.ndim != 2:
        raise ValueError(
            f"padding_mask: key_valid must be [batch, kv_length], got {key_valid.shape}"
        )
    mask = key_valid[:, None, None, :]
    if query_valid is not None:
        query_valid = jnp.asarray(query_valid).astype(bool)
        if query_valid.ndim != 2:
            raise ValueError(
                f"padding_mask: query_valid must be [batch, q_length], got {query_valid.shape}"
            )
        mask = mask & query_valid[:, None, :, None]
    return mask


def causal_mask(q_length: int, kv_length: int | None = None, offset: int | Array = 0) -> Array:
    """Query i may attend key j when j <= i + offset.

    With `offset=0` and `q_length == kv_length` this is the usual lower
    triangle. During incremental decoding the queries are the tokens at
    absolute positions `offset .. offset + q_length - 1` of a cache of
    `kv_length` keys, so `offset` is the cache index (it may be traced).

    Returns:
      `[1, 1, q_length, kv_length]`.
    """
    kv_length = q_length if kv_length is None else kv_length
    q_pos = jnp.arange(q_length)[:, None] + offset
    k_pos = jnp.arange(kv_length)[None, :]
    return (k_pos <= q_pos)[None, None]


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array | None = None) -> Array:
    """Tokens attend only within their own segment (packed sequences).

    Segment id 0 marks padding: it attends nothing and nothing attends it.

    Args:
      q_segment_ids: `[batch, q_length]` integer ids.
      kv_segment_ids: `[batch, kv_length]`; defaults to `q_segment_ids`.

    Returns:
      `[batch, 1, q_length, kv_length]`.
    """
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    if q_segment_ids.ndim != 2 or kv_segment_ids.ndim != 2:
        raise ValueError(
            "segment_mask: segment ids must be [batch, length], got "
            f"{q_segment_ids.shape} and {kv_segment_ids.shape}"
        )
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = (q_segment_ids[:, :, None] > 0) & (kv_segment_ids[:, None, :] > 0)
    return (same & real)[:, None]


def normalize_window(window: int | tuple[int, int]) -> tuple[int, int]:
    """`D` -> `(D, D)`; `(left, right)` is returned as is after checks."""
    if isinstance(window, int):
        window = (window, window)
    left, right = window
    if left < 0 or right < 0:
        raise ValueError(f"local window sizes must be >= 0, got {window}")
    return int(left), int(right)


def local_window_mask(
    q_length: int,
    kv_length: int | None = None,
    window: int | tuple[int, int] = 0,
    offset: int | Array = 0,
) -> Array:
    """Query i may attend key j when `i + offset - left <= j <= i + offset + right`.

    `window=D` is the symmetric window `[i - D, i + D]` of Luong et al.'s local
    attention; `(left, 0)` is sliding-window causal attention.

    Returns:
      `[1, 1, q_length, kv_length]`.
    """
    kv_length = q_length if kv_length is None else kv_length
    left, right = normalize_window(window)
    q_pos = jnp.arange(q_length)[:, None] + offset
    k_pos = jnp.arange(kv_length)[None, :]
    return ((k_pos >= q_pos - left) & (k_pos <= q_pos + right))[None, None]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the given masks, skipping None; None if all are None."""
    masks = [jnp.asarray(m).astype(bool) for m in masks if m is not None]
    if not masks:
        return None
    combined = masks[0]
    for m in masks[1:]:
        combined = combined & m
    return combined


def mask_to_bias(mask: Array, dtype: jnp.dtype = jnp.float32) -> Array:
    """0 where allowed, a large negative number where masked.

    The negative value is finite (a fraction of the dtype's lowest value) so
    that adding a few biases never overflows to -inf, and softmax over a row
    of masked entries stays finite.
    """
    big_negative = jnp.asarray(jnp.finfo(dtype).min / 4, dtype)
    return jnp.where(mask, jnp.asarray(0.0, dtype), big_negative)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Everything that restricts which keys a query may attend, undigested.

    Attributes:
      dense: boolean array broadcastable to `[batch, heads, q_length, kv_length]`, or None.
      is_causal: query i sees keys j <= i (top-left aligned, as in jax).
      q_segment_ids / kv_segment_ids: `[batch, length]` ids of packed sequences
        (0 = padding), or None.
      local_window: `(left, right)`: query i sees keys in `[i - left, i + right]`, or None.
    """

    dense: Array | None = None
    is_causal: bool = False
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    local_window: tuple[int, int] | None = None

    @property
    def is_empty(self) -> bool:
        return (
            self.dense is None
            and not self.is_causal
            and self.q_segment_ids is None
            and self.local_window is None
        )

    def materialize(self, q_length: int, kv_length: int) -> Array | None:
        """The combined boolean mask, `[batch|1, heads|1, q_length, kv_length]`, or None."""
        parts = [self.dense]
        if self.is_causal:
            parts.append(causal_mask(q_length, kv_length))
        if self.q_segment_ids is not None:
            parts.append(segment_mask(self.q_segment_ids, self.kv_segment_ids))
        if self.local_window is not None:
            parts.append(local_window_mask(q_length, kv_length, self.local_window))
        return combine_masks(*parts)

    def block(
        self, q_start: Array | int, q_size: int, k_start: Array | int, k_size: int
    ) -> Array | None:
        """The combined mask of one `[q_size, k_size]` block, starting at the given offsets.

        Used by the chunked and splash implementations so that the full mask is never
        built.
        """
        parts = []
        q_pos = q_start + jnp.arange(q_size)[:, None]
        k_pos = k_start + jnp.arange(k_size)[None, :]
        if self.is_causal:
            parts.append((k_pos <= q_pos)[None, None])
        if self.local_window is not None:
            left, right = self.local_window
            parts.append(((k_pos >= q_pos - left) & (k_pos <= q_pos + right))[None, None])
        if self.q_segment_ids is not None:
            q_seg = jax.lax.dynamic_slice_in_dim(self.q_segment_ids, q_start, q_size, axis=1)
            kv_seg = jax.lax.dynamic_slice_in_dim(self.kv_segment_ids, k_start, k_size, axis=1)
            parts.append(segment_mask(q_seg, kv_seg))
        if self.dense is not None:
            dense = self.dense
            if dense.shape[-2] != 1:
                dense = jax.lax.dynamic_slice_in_dim(dense, q_start, q_size, axis=-2)
            if dense.shape[-1] != 1:
                dense = jax.lax.dynamic_slice_in_dim(dense, k_start, k_size, axis=-1)
            parts.append(dense)
        return combine_masks(*parts)
