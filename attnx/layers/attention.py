"""`attention`: one entry point over several implementations of softmax attention.

Shapes follow `jax.nn.dot_product_attention`:

  query  `[batch, q_length, num_heads, head_dim]`
  key    `[batch, kv_length, num_kv_heads, head_dim]`
  value  `[batch, kv_length, num_kv_heads, value_dim]`
  output `[batch, q_length, num_heads, value_dim]`
  weights (with `return_weights=True`) `[batch, num_heads, q_length, kv_length]`

`num_kv_heads` may divide `num_heads` (grouped-query / multi-query attention):
query head n reads key/value head `n // (num_heads // num_kv_heads)`.

Masks are boolean (True = may attend) and broadcast to
`[batch, num_heads, q_length, kv_length]`. Besides a dense `mask`, three
structured masks can be given by description (`is_causal`, `segment_ids`,
`local_window`): the memory-efficient implementations build them block by
block instead of materialising a `[q_length, kv_length]` array (all of them
travel as one `attnx.layers.masks.MaskSpec`). All given masks are combined
with AND. A query row with no allowed key returns a zero output and zero
weights on every implementation.

Implementations:
  'reference'  einsum + normalizer; the only one that returns weights or
               supports the sparse normalizers.
  'xla'/'cudnn' `jax.nn.dot_product_attention`.
  'chunked'    blocks of queries and keys with an online softmax
               (Rabe & Staats 2021): O(length) memory in forward and backward.
  'splash'     Pallas splash attention (TPU; interpret mode elsewhere).
  None         picks one for the target platform and the arguments.
The target platform is that of the devices of the mesh in context
(`jax.set_mesh`), else JAX's default backend (`target_platform`): a step
compiled ahead of time for a TPU topology on a CPU machine picks, and
lowers, the TPU kernels.
Inside an `attnx.layers.interventions.attention_edit` block every call uses
'reference' and hands its weights to the edit right after normalisation.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnx.layers import interventions
from attnx.layers import masks as masks_lib
from attnx.layers.chunked import chunked_attention
from attnx.layers.masks import MaskSpec
from attnx.layers.normalizers import Normalizer, get_normalizer

Array = jax.Array

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "chunked", "splash")


def _check_shapes(query: Array, key: Array, value: Array) -> None:
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "attention: query, key and value must be [batch, length, heads, head_dim]; got "
            f"{query.shape}, {key.shape}, {value.shape}"
        )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"attention: key {key.shape} and value {value.shape} differ in batch, length or heads"
        )
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"attention: query batch {query.shape[0]} != key batch {key.shape[0]}")
    if query.shape[3] != key.shape[3]:
        raise ValueError(
            f"attention: query head_dim {query.shape[3]} != key head_dim {key.shape[3]}"
        )
    if query.shape[2] % key.shape[2]:
        raise ValueError(
            f"attention: num_heads {query.shape[2]} is not a multiple of num_kv_heads "
            f"{key.shape[2]}"
        )


def _check_broadcast(name: str, array: Array, target: tuple[int, ...]) -> None:
    if array.ndim != 4 or any(a not in (1, t) for a, t in zip(array.shape, target, strict=True)):
        raise ValueError(
            f"attention: {name} of shape {array.shape} does not broadcast to "
            f"[batch, heads, q_length, kv_length] = {target}"
        )


def make_mask_spec(
    query: Array,
    key: Array,
    *,
    mask: Array | None,
    is_causal: bool,
    segment_ids: Array | tuple[Array, Array] | None,
    local_window: int | tuple[int, int] | None,
) -> MaskSpec:
    """Validates the mask arguments of `attention` and bundles them."""
    batch, q_length, num_heads, _ = query.shape
    kv_length = key.shape[1]
    target = (batch, num_heads, q_length, kv_length)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(
                f"attention: mask must be boolean (True = may attend), got {mask.dtype}"
            )
        _check_broadcast("mask", mask, target)
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg, kv_seg = (
            segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        )
        if q_seg.shape != (batch, q_length) or kv_seg.shape != (batch, kv_length):
            raise ValueError(
                f"attention: segment ids must be [batch, q_length] = {(batch, q_length)} and "
                f"[batch, kv_length] = {(batch, kv_length)}; got {q_seg.shape}, {kv_seg.shape}"
            )
    window = None if local_window is None else masks_lib.normalize_window(local_window)
    return MaskSpec(mask, bool(is_causal), q_seg, kv_seg, window)


def _group_heads(query: Array, num_kv_heads: int) -> Array:
    """`[b, t, n, h]` -> `[b, t, kv_heads, n // kv_heads, h]`."""
    b, t, n, h = query.shape
    return query.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def apply_dropout(weights: Array, rate: float, rng: Array) -> Array:
    """Inverted dropout on attention weights."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0).astype(weights.dtype)


def reference_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None,
    bias: Array | None,
    scale: float,
    normalizer: Normalizer,
    dropout_rate: float,
    dropout_rng: Array | None,
) -> tuple[Array, Array]:
    """Einsum attention. Returns `(output, weights)`; weights are before dropout."""
    b, t, n, _ = query.shape
    s, k = key.shape[1], key.shape[2]
    grouped = _group_heads(query, k)
    scores = jnp.einsum("btkgh,bskh->bkgts", grouped, key).reshape(b, n, t, s)
    # Normalise in float32 even under bfloat16 compute: the sums are long.
    scores = scores.astype(jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    weights = normalizer(scores, mask)
    if mask is None:
        # Without a mask a -inf bias can still empty a row; keep the contract.
        weights = jnp.where(jnp.isnan(weights), 0.0, weights)
    weights = interventions.apply(weights, mask, "attention")  # identity unless an edit is on
    attended = weights
    if dropout_rate > 0.0:
        attended = apply_dropout(weights, dropout_rate, dropout_rng)
    attended = attended.astype(value.dtype).reshape(b, k, n // k, t, s)
    output = jnp.einsum("bkgts,bskh->btkgh", attended, value).reshape(b, t, n, value.shape[-1])
    return output, weights.astype(value.dtype)


def _zero_empty_rows(output: Array, mask: Array | None) -> Array:
    """Zeroes outputs of query rows that may attend no key ([b, t, n, h])."""
    if mask is None:
        return output
    has_key = jnp.any(mask, axis=-1)  # [b|1, n|1, t]
    return jnp.where(jnp.swapaxes(has_key, 1, 2)[..., None], output, 0.0).astype(output.dtype)


def _dot_product_attention(query, key, value, *, spec, bias, scale, implementation):
    """`jax.nn.dot_product_attention` with attnx's mask contract."""
    q_length, kv_length = query.shape[1], key.shape[1]
    mask = spec.materialize(q_length, kv_length)
    output = jax.nn.dot_product_attention(
        query, key, value, bias=bias, mask=mask, scale=scale, implementation=implementation
    )
    return _zero_empty_rows(output, mask)


def target_platform() -> str:
    """The platform being compiled for: the context mesh's devices', else the default backend.

    Under `jax.set_mesh(mesh)` the mesh's devices decide, so that a program
    compiled ahead of time for a TPU topology on a CPU machine (attnx's
    `--mode=compile`) makes the choices a TPU would: 'tpu', 'gpu' or 'cpu'.
    """
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def select_implementation(
    query: Array,
    key: Array,
    value: Array,
    *,
    spec: MaskSpec,
    bias: Array | None,
    normalizer: str | Callable,
    dropout_rate: float,
    return_weights: bool,
    backend: str | None = None,
) -> str:
    """The implementation `attention(implementation=None)` uses for these arguments.

    Weights or a sparse normalizer need 'reference'. On TPU, splash attention
    when its structural masks describe everything (no dense mask, no bias,
    no dropout, lengths multiples of 128). On GPU, cuDNN flash attention for
    half precision. Elsewhere 'xla', or 'chunked' once a score matrix would
    be large (its memory is O(length)).
    """
    if return_weights or normalizer != "softmax":
        return "reference"
    backend = backend or target_platform()
    q_length, kv_length = query.shape[1], key.shape[1]
    structural_only = spec.dense is None and bias is None and dropout_rate == 0.0
    if (
        backend == "tpu"
        and structural_only
        and q_length % 128 == 0
        and kv_length % 128 == 0
        and query.shape[-1] == value.shape[-1]
    ):
        return "splash"
    if (
        backend == "gpu"
        and dropout_rate == 0.0
        and query.dtype in (jnp.bfloat16, jnp.float16)
        and query.shape[-1] == value.shape[-1]
        and query.shape[-1] <= 128
        and query.shape[-1] % 8 == 0
        and spec.q_segment_ids is None
    ):
        return "cudnn"
    if q_length * kv_length >= 2048 * 2048:
        return "chunked"
    if dropout_rate > 0.0 or query.shape[-1] != value.shape[-1]:
        return "reference"
    return "xla"


def attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    normalizer: str | Normalizer = "softmax",
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
    is_causal: bool = False,
    segment_ids: Array | tuple[Array, Array] | None = None,
    local_window: int | tuple[int, int] | None = None,
) -> Array | tuple[Array, Array]:
    """Attention of `query` over `key`/`value` (Vaswani et al. 2017, eq. 1, generalised).

    Args:
      query: `[batch, q_length, num_heads, head_dim]`.
      key: `[batch, kv_length, num_kv_heads, head_dim]`; `num_kv_heads` divides `num_heads`.
      value: `[batch, kv_length, num_kv_heads, value_dim]`.
      mask: boolean, True = may attend, broadcastable to `[batch, num_heads, q_length, kv_length]`.
      bias: float, added to the scores, broadcastable likewise.
      scale: multiplies `q . k`; default `1 / sqrt(head_dim)`.
      normalizer: 'softmax', 'sparsemax', 'entmax15' or a callable `(scores, mask) -> weights`.
      dropout_rate: dropout on the attention weights; needs `dropout_rng` when > 0.
      dropout_rng: PRNG key for dropout.
      implementation: one of `IMPLEMENTATIONS`, or None to choose automatically.
      return_weights: also return the weights `[batch, num_heads, q_length, kv_length]`.
      is_causal: query i attends keys j <= i.
      segment_ids: `[batch, length]` ids of packed sequences for self-attention, or a
        pair `(q_segment_ids, kv_segment_ids)`; 0 marks padding.
      local_window: `D` or `(left, right)`: query i attends keys in `[i - left, i + right]`.

    Returns:
      `output`, or `(output, weights)` with `return_weights=True`.
    """
    _check_shapes(query, key, value)
    spec = make_mask_spec(
        query,
        key,
        mask=mask,
        is_causal=is_causal,
        segment_ids=segment_ids,
        local_window=local_window,
    )
    target = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
    if bias is not None:
        _check_broadcast("bias", jnp.asarray(bias), target)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"attention: dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("attention: dropout_rate > 0 needs a dropout_rng")
    normalizer_fn = get_normalizer(normalizer)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale

    if implementation is None:
        implementation = select_implementation(
            query,
            key,
            value,
            spec=spec,
            bias=bias,
            normalizer=normalizer,
            dropout_rate=dropout_rate,
            return_weights=return_weights,
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention: unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}"
        )
    if interventions.active():
        # Only the materialising path forms the weights an edit acts on.
        implementation = "reference"
    if implementation != "reference":
        if return_weights:
            raise ValueError(
                f"attention: implementation {implementation!r} cannot return weights; "
                "use 'reference' or implementation=None"
            )
        if normalizer != "softmax":
            raise ValueError(
                f"attention: implementation {implementation!r} supports only the softmax "
                f"normalizer, got {normalizer!r}; use 'reference'"
            )

    if implementation == "reference":
        output, weights = reference_attention(
            query,
            key,
            value,
            mask=spec.materialize(query.shape[1], key.shape[1]),
            bias=bias,
            scale=scale,
            normalizer=normalizer_fn,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
        )
        return (output, weights) if return_weights else output
    if implementation in ("xla", "cudnn"):
        if dropout_rate > 0.0:
            raise ValueError(f"attention: implementation {implementation!r} has no dropout")
        if value.shape[-1] != query.shape[-1]:
            raise ValueError(
                f"attention: implementation {implementation!r} needs value_dim == head_dim, got "
                f"{value.shape[-1]} and {query.shape[-1]}; use 'reference' or 'chunked'"
            )
        return _dot_product_attention(
            query, key, value, spec=spec, bias=bias, scale=scale, implementation=implementation
        )
    if implementation == "chunked":
        return chunked_attention(
            query,
            key,
            value,
            spec=spec,
            bias=bias,
            scale=scale,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
        )
    # Imported on first use: it loads Pallas and its TPU kernels.
    from attnx.layers.splash import splash_attention

    if spec.dense is not None or bias is not None or dropout_rate > 0.0:
        raise ValueError(
            "attention: 'splash' takes only structured masks (is_causal, segment_ids, "
            "local_window); no dense mask, bias or dropout"
        )
    return splash_attention(query, key, value, spec=spec, scale=scale)
