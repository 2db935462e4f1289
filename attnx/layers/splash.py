"""Splash attention: the Pallas TPU kernel behind `attention(implementation='splash')`.

Splash ("sparse flash") attention is FlashAttention for TPU whose masks are
described lazily (causal, local window) so that fully masked blocks are
skipped, plus dynamic segment ids for packed sequences
(`jax.experimental.pallas.ops.tpu.splash_attention`). This module adapts it
to attnx's `attention` contract:

* layout: attnx's `[batch, length, heads, head_dim]` becomes splash's
  `[heads, length, head_dim]`, vmapped over the batch;
* scale: splash has none, so the query is multiplied by `scale` first;
* masks: `is_causal` and `local_window` become one `CausalMask` / `LocalMask`
  / `FullMask` (the same for every head, combined with `MultiHeadMask`), segment
  ids become `SegmentIds`;
* GQA/MQA: splash's multi-head kernel reads key/value head `n // group` for
  query head n natively, the same convention as attnx;
* lengths: the kernel works on blocks of multiples of 128 keys; other lengths
  are padded to the next multiple of 128 and the padded keys masked through
  segment ids (padding costs a copy: prefer multiples of 128, which is what
  `select_implementation` requires before choosing splash);
* empty rows (segment 0, or a window that misses every key): the kernel
  returns garbage or NaN for them, so they are set to zero afterwards.

* meshes: the kernel is a per-device program, so under a mesh (`jax.set_mesh`)
  it runs inside `jax.shard_map`, each device on its rows of the batch and its
  heads. The logical axes 'batch' and 'heads' name the mesh axes through the
  logical-axis rules in context (`flax.nnx.logical_axis_rules`, which attnx's
  training steps set from `config.mesh.rules`); without rules the batch is
  split over every mesh axis. An axis stays whole where the mesh axes do not
  divide it (and the heads where they do not divide the key/value heads).

Off TPU the kernel runs in Pallas interpret mode (slow, for tests only). The
platform is the one compiled for (`attention.target_platform`), so a step
compiled ahead of time for a TPU topology gets the Mosaic kernel.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)

from attnx.layers.attention import target_platform
from attnx.layers.masks import MaskSpec
from attnx.layers.mesh_axes import mesh_axes

P = jax.sharding.PartitionSpec

Array = jax.Array

# The kernel computes on blocks of key lanes: multiples of 128.
LANES = 128
# Bigger blocks amortise the per-block overhead on TPU; use the largest that divides.
_BLOCK_CANDIDATES = (512, 256, 128)


def _pad_to(length: int) -> int:
    return -(-length // LANES) * LANES


def _block_size(length: int) -> int:
    return next(size for size in _BLOCK_CANDIDATES if length % size == 0)


def _structural_mask(spec: MaskSpec, q_length: int, kv_length: int) -> splash_mask.Mask:
    """One lazy splash mask for `is_causal` AND `local_window`."""
    shape = (q_length, kv_length)
    if spec.local_window is not None:
        left, right = spec.local_window
        # causal AND [i - left, i + right] is [i - left, i + min(right, 0)].
        if spec.is_causal:
            right = min(right, 0)
        return splash_mask.LocalMask(shape, (left, right), offset=0)
    if spec.is_causal:
        return splash_mask.CausalMask(shape)
    return splash_mask.FullMask(shape)


def _build_kernel(
    mask: splash_mask.Mask, num_heads: int, block_q: int, block_kv: int, interpret: bool
):
    """A splash multi-head kernel for `num_heads` heads sharing `mask`."""
    block_sizes = splash_kernel.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    return splash_kernel.make_splash_mha(
        splash_mask.MultiHeadMask([mask] * num_heads),
        block_sizes=block_sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


@functools.lru_cache(maxsize=64)
def _cached_kernel(
    mask: splash_mask.Mask, num_heads: int, block_q: int, block_kv: int, interpret: bool
):
    """`_build_kernel`, cached: building processes the mask block by block in NumPy."""
    # The kernel holds the processed mask as arrays; make them concrete constants even
    # when called under jit, so that the cached kernel does not keep a tracer alive.
    with jax.ensure_compile_time_eval():
        return _build_kernel(mask, num_heads, block_q, block_kv, interpret)


def _make_kernel(
    mask: splash_mask.Mask, num_heads: int, block_q: int, block_kv: int, interpret: bool
):
    """The kernel; cached, except under a mesh.

    Under a mesh, concrete arrays would be placed on the mesh's devices, which
    a topology compiled for ahead of time does not have; there the kernel is
    built in the trace (the mask processing keeps its own cache).
    """
    if jax.sharding.get_abstract_mesh().empty:
        return _cached_kernel(mask, num_heads, block_q, block_kv, interpret)
    return _build_kernel(mask, num_heads, block_q, block_kv, interpret)


def _rows_with_keys(spec: MaskSpec, q_length: int, kv_length: int) -> Array:
    """`[batch|1, q_length]`: whether each query row may attend at least one key.

    Computed one block of `LANES` queries at a time (q_length must be a multiple of
    it) so the `[q_length, kv_length]` mask never exists whole.
    """

    def row_block(i):
        allowed = spec.block(i * LANES, LANES, 0, kv_length)  # [b|1, 1, LANES, kv_length]
        return jnp.any(allowed[:, 0], axis=-1)

    blocks = jax.lax.map(row_block, jnp.arange(q_length // LANES))  # [nq, b|1, LANES]
    return jnp.moveaxis(blocks, 0, 1).reshape(blocks.shape[1], q_length)


def _apply_kernel(spec, q, k, v, q_ids, kv_ids, interpret: bool) -> Array:
    """The kernel over `[b, n, t, h]` blocks (padded lengths), vmapped over the batch."""
    kernel = _make_kernel(
        _structural_mask(spec, q.shape[2], k.shape[2]),
        q.shape[1],
        _block_size(q.shape[2]),
        _block_size(k.shape[2]),
        interpret,
    )
    if q_ids is None:
        return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, splash_kernel.SegmentIds(qi, ki)))(
        q, k, v, q_ids, kv_ids
    )


def _sharded_kernel(mesh, spec, q, k, v, q_ids, kv_ids, interpret: bool) -> Array:
    """The kernel under `jax.shard_map`: each device runs it on its rows and heads.

    Query head n reads key/value head `n // group`; splitting both head axes
    into the same number of contiguous blocks keeps that on every device, and
    a single key/value head (multi-query) is read whole by every device.
    """
    batch, num_heads = q.shape[:2]
    num_kv_heads = k.shape[1]
    batch_axes = mesh_axes(mesh, "batch", batch)
    head_axes = mesh_axes(mesh, "heads", num_heads)
    if head_axes is not None:
        used = set(batch_axes or ())
        shards = math.prod(mesh.shape[a] for a in head_axes)
        if used & set(head_axes) or (num_kv_heads % shards and num_kv_heads != 1):
            head_axes = None
    kv_head_axes = head_axes if num_kv_heads != 1 else None
    q_spec = P(batch_axes, head_axes, None, None)
    kv_spec = P(batch_axes, kv_head_axes, None, None)
    ids_spec = P(batch_axes, None)

    def local(q, k, v, q_ids, kv_ids):
        return _apply_kernel(spec, q, k, v, q_ids, kv_ids, interpret)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, q_ids, kv_ids)


def splash_attention(
    query: Array, key: Array, value: Array, *, spec: MaskSpec, scale: float
) -> Array:
    """Softmax attention through the Pallas splash attention kernel.

    Args:
      query: `[batch, q_length, num_heads, head_dim]`.
      key: `[batch, kv_length, num_kv_heads, head_dim]`, `num_kv_heads` dividing `num_heads`.
      value: `[batch, kv_length, num_kv_heads, value_dim]`.
      spec: structured masks only (`is_causal`, segment ids, `local_window`).
      scale: multiplies `q . k`.

    Returns:
      `[batch, q_length, num_heads, value_dim]`; zero for queries with no allowed key.
    """
    if spec.dense is not None:
        raise ValueError(
            "splash_attention: takes only structured masks (is_causal, segment_ids, "
            "local_window), not a dense mask"
        )
    batch, q_length = query.shape[:2]
    kv_length = key.shape[1]
    padded_q, padded_kv = _pad_to(q_length), _pad_to(kv_length)

    q_ids, kv_ids = spec.q_segment_ids, spec.kv_segment_ids
    if q_ids is None and (padded_q != q_length or padded_kv != kv_length):
        # Padding is masked through segment ids: every real token is in segment 1.
        q_ids = jnp.ones((batch, q_length), jnp.int32)
        kv_ids = jnp.ones((batch, kv_length), jnp.int32)
    if q_ids is not None:
        # Id 0 never matches a real (positive) id, so real queries ignore padded keys.
        q_ids = jnp.pad(q_ids.astype(jnp.int32), ((0, 0), (0, padded_q - q_length)))
        kv_ids = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, padded_kv - kv_length)))

    def pad_length(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))

    # [b, t, n, h] -> [b, n, t, h]; splash has no scale argument, so scale the query.
    q = jnp.swapaxes(pad_length(query * jnp.asarray(scale, query.dtype), padded_q), 1, 2)
    k = jnp.swapaxes(pad_length(key, padded_kv), 1, 2)
    v = jnp.swapaxes(pad_length(value, padded_kv), 1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    interpret = target_platform() != "tpu"
    if mesh.empty or mesh.size == 1:
        out = _apply_kernel(spec, q, k, v, q_ids, kv_ids, interpret)
    else:
        out = _sharded_kernel(mesh, spec, q, k, v, q_ids, kv_ids, interpret)
    out = jnp.swapaxes(out, 1, 2)[:, :q_length]  # [b, t, n, hv]

    if spec.is_empty:
        return out
    padded_spec = MaskSpec(None, spec.is_causal, q_ids, kv_ids, spec.local_window)
    has_key = _rows_with_keys(padded_spec, padded_q, padded_kv)[:, :q_length]
    return jnp.where(has_key[:, :, None, None], out, 0.0).astype(out.dtype)
