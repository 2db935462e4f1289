"""Multi-head attention (Vaswani et al. 2017, sec. 3.2.2) as an NNX module.

  MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,
  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

with optional grouped-query attention (Ainslie et al. 2023: `num_kv_heads`
divides `num_heads`; 1 is multi-query attention, Shazeer 2019), rotary
positions (Su et al. 2021), attention dropout, and a cache for incremental
decoding (one token at a time, or a prefill of several).

The key and value projections are fused into one kernel `[features, 2, kv_heads,
head_dim]`: one matrix product reads the input once for both.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.layers import masks as masks_lib
from attnx.layers.attention import attention
from attnx.layers.params import param

Array = jax.Array


class MultiHeadAttention(nnx.Module):
    """Self- or cross-attention with several heads.

    Args:
      num_heads: number of query heads.
      in_features: size of the query input's last axis.
      kv_features: size of the key/value input's last axis (cross-attention);
        defaults to `in_features`.
      head_dim: per-head size; defaults to `in_features // num_heads`.
      out_features: output size; defaults to `in_features`.
      num_kv_heads: key/value heads (divides `num_heads`); defaults to `num_heads`.
      dropout_rate: dropout on the attention weights (active unless `deterministic`).
      use_bias: biases on the four projections (the paper's count has them).
      implementation: passed to `attnx.layers.attention` (None = automatic) on
        calls that do not ask for the weights; a call that does, and a decode
        step through the cache (a dense offset mask), use the automatic choice,
        which computes the weights ('reference') or takes the mask.
      normalizer: 'softmax', 'sparsemax' or 'entmax15'.
      scale: multiplies `q . k` before normalizing; default `1 / sqrt(head_dim)`
        (eq. 1 of Vaswani et al.); 1.0 is the unscaled dot product.
      rotary_base: if set, rotary position embeddings with this base on queries and keys.
      sow_weights: sow the attention weights into `nnx.Intermediate` as
        'attention_weights' on every call.
      dtype: compute dtype; parameters stay `param_dtype`.

    Attributes:
      skip_weights: False (the default): a call asking for the weights computes
        them. True: such a call keeps `implementation` and returns a NaN
        placeholder instead; attention traces set it on a copy of a model, on
        the layers they do not select (`attnx.interpret.traces`), so that asking
        the model for its weights materialises only the traced layers.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        kv_features: int | None = None,
        head_dim: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        dropout_rate: float = 0.0,
        use_bias: bool = True,
        implementation: str | None = None,
        normalizer: str = "softmax",
        scale: float | None = None,
        rotary_base: float | None = None,
        sow_weights: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: nnx.Initializer = nnx.initializers.xavier_uniform(),
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"MultiHeadAttention: num_heads={num_heads} is not a multiple of "
                f"num_kv_heads={num_kv_heads}"
            )
        if head_dim is None:
            if in_features % num_heads:
                raise ValueError(
                    f"MultiHeadAttention: in_features={in_features} is not divisible by "
                    f"num_heads={num_heads}; pass head_dim"
                )
            head_dim = in_features // num_heads
        if rotary_base is not None and head_dim % 2:
            raise ValueError(f"MultiHeadAttention: rotary needs an even head_dim, got {head_dim}")
        kv_features = in_features if kv_features is None else kv_features
        out_features = in_features if out_features is None else out_features
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.in_features, self.kv_features, self.out_features = (
            in_features,
            kv_features,
            out_features,
        )
        self.dropout_rate = dropout_rate
        self.implementation = implementation
        self.normalizer = normalizer
        self.scale = scale
        self.rotary_base = rotary_base
        self.sow_weights = sow_weights
        # Static (part of the graphdef): flipping it recompiles, never mutates a caller's state.
        self.skip_weights = False
        self.deterministic = False
        self.dtype = dtype

        self.query_kernel = param(
            rngs,
            kernel_init,
            (in_features, num_heads, head_dim),
            ("embed", "heads", "kv"),
            param_dtype,
        )
        self.key_value_kernel = param(
            rngs,
            kernel_init,
            (kv_features, 2, num_kv_heads, head_dim),
            ("embed", None, "heads", "kv"),
            param_dtype,
        )
        self.out_kernel = param(
            rngs,
            kernel_init,
            (num_heads, head_dim, out_features),
            ("heads", "kv", "embed"),
            param_dtype,
        )
        zeros = nnx.initializers.zeros_init()
        if use_bias:
            self.query_bias = param(
                rngs, zeros, (num_heads, head_dim), ("heads", "kv"), param_dtype
            )
            self.key_value_bias = param(
                rngs, zeros, (2, num_kv_heads, head_dim), (None, "heads", "kv"), param_dtype
            )
            self.out_bias = param(rngs, zeros, (out_features,), ("embed",), param_dtype)
        else:
            self.query_bias = self.key_value_bias = self.out_bias = nnx.data(None)
        self.rngs = rngs["dropout"].fork() if dropout_rate > 0 else nnx.data(None)
        # Decode cache; created by init_cache.
        self.cached_key = self.cached_value = self.cache_index = nnx.data(None)

    # -- projections --------------------------------------------------------

    def project_query(self, inputs_q: Array) -> Array:
        """`[b, t, in_features]` -> `[b, t, num_heads, head_dim]`."""
        q = jnp.einsum(
            "bte,enh->btnh", inputs_q.astype(self.dtype), self.query_kernel[...].astype(self.dtype)
        )
        if self.query_bias is not None:
            q = q + self.query_bias[...].astype(self.dtype)
        return q

    def project_key_value(self, inputs_kv: Array) -> tuple[Array, Array]:
        """`[b, s, kv_features]` -> key and value, each `[b, s, num_kv_heads, head_dim]`.

        Cross-attention callers compute this once per source and pass it as
        `projected_kv`, so that decoding does not re-project the source every step.
        """
        if inputs_kv.shape[-1] != self.kv_features:
            raise ValueError(
                f"MultiHeadAttention: key/value input has {inputs_kv.shape[-1]} features, "
                f"expected kv_features={self.kv_features}"
            )
        kv = jnp.einsum(
            "bse,ezkh->zbskh",
            inputs_kv.astype(self.dtype),
            self.key_value_kernel[...].astype(self.dtype),
        )
        if self.key_value_bias is not None:
            kv = kv + self.key_value_bias[...].astype(self.dtype)[:, None, None]
        return kv[0], kv[1]

    def _rotate(self, x: Array, positions: Array) -> Array:
        from attnx.layers.positions import apply_rotary

        return apply_rotary(x, positions, base=self.rotary_base)

    # -- decoding cache -----------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype | None = None) -> None:
        """Creates an empty key/value cache of `max_length` positions for self-attention decoding."""
        dtype = self.dtype if dtype is None else dtype
        shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    # -- forward ------------------------------------------------------------

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        projected_kv: tuple[Array, Array] | None = None,
        mask: Array | None = None,
        bias: Array | None = None,
        is_causal: bool = False,
        segment_ids: Array | tuple[Array, Array] | None = None,
        positions: Array | None = None,
        local_window: int | tuple[int, int] | None = None,
        decode: bool = False,
        return_weights: bool = False,
        deterministic: bool | None = None,
    ) -> Array | tuple[Array, Array]:
        """Attends `inputs_q` over `inputs_kv` (self-attention when None).

        Args:
          inputs_q: `[batch, q_length, in_features]`.
          inputs_kv: `[batch, kv_length, kv_features]`, or None for self-attention.
          projected_kv: key and value from `project_key_value`, instead of `inputs_kv`.
          mask: boolean, broadcastable to `[batch, heads, q_length, kv_length]`
            (with `decode=True`, kv_length is the cache length).
          bias: additive, broadcastable likewise (e.g. a relative position bias).
          is_causal: causal self-attention (implied by `decode=True`).
          segment_ids: packed-sequence ids, see `attnx.layers.attention`.
          positions: `[batch, q_length]` token positions for rotary embeddings
            (default: 0.. in training, the cache index onwards when decoding).
          local_window: `D` or `(left, right)`: query i attends keys in
            `[i - left, i + right]` only (with `decode=True`, i is the token's
            position in the cache).
          decode: self-attention through the cache: the `q_length` new tokens
            are written at the cache index and attend every cached token up to
            their own position. `init_cache` must have been called.
          return_weights: also return `[batch, heads, q_length, kv_length]` weights
            (with `skip_weights` set on the module: a NaN placeholder of that shape,
            never computed; under `jit` XLA drops it when nothing reads it).
          deterministic: no dropout; defaults to the module's `deterministic` flag.

        Returns:
          `[batch, q_length, out_features]`, and the weights if asked.
        """
        if inputs_q.ndim != 3 or inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"MultiHeadAttention: inputs_q must be [batch, length, {self.in_features}], "
                f"got {inputs_q.shape}"
            )
        deterministic = self.deterministic if deterministic is None else deterministic
        q_length = inputs_q.shape[1]
        query = self.project_query(inputs_q)
        if projected_kv is not None:
            key, value = projected_kv
        else:
            key, value = self.project_key_value(inputs_q if inputs_kv is None else inputs_kv)

        if decode:
            if inputs_kv is not None or projected_kv is not None:
                raise ValueError("MultiHeadAttention: decode=True is for self-attention only")
            if self.cache_index is None:
                raise ValueError("MultiHeadAttention: decode=True before init_cache")
            index = self.cache_index[...]
            if positions is None:
                positions = jnp.broadcast_to(index + jnp.arange(q_length), inputs_q.shape[:2])
            if self.rotary_base is not None:
                query, key = self._rotate(query, positions), self._rotate(key, positions)
            cached_key = jax.lax.dynamic_update_slice_in_dim(
                self.cached_key[...], key.astype(self.cached_key[...].dtype), index, axis=1
            )
            cached_value = jax.lax.dynamic_update_slice_in_dim(
                self.cached_value[...], value.astype(self.cached_value[...].dtype), index, axis=1
            )
            self.cached_key[...], self.cached_value[...] = cached_key, cached_value
            self.cache_index[...] = index + q_length
            key, value = cached_key, cached_value
            # New token i sits at absolute position index + i: it sees the cache up to there.
            mask = masks_lib.combine_masks(
                mask,
                masks_lib.causal_mask(q_length, key.shape[1], offset=index),
                None
                if local_window is None
                else masks_lib.local_window_mask(q_length, key.shape[1], local_window, index),
            )
            is_causal, local_window = False, None
        elif self.rotary_base is not None:
            if inputs_kv is not None or projected_kv is not None:
                raise ValueError("MultiHeadAttention: rotary positions are for self-attention")
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(q_length), inputs_q.shape[:2])
            query, key = self._rotate(query, positions), self._rotate(key, positions)

        skipped = return_weights and self.skip_weights
        want_weights = (return_weights and not skipped) or self.sow_weights
        dropout_rate = 0.0 if deterministic else self.dropout_rate
        implementation = None if want_weights or decode else self.implementation
        result = attention(
            query,
            key,
            value,
            mask=mask,
            bias=bias,
            is_causal=is_causal,
            segment_ids=segment_ids,
            local_window=local_window,
            scale=self.scale,
            normalizer=self.normalizer,
            dropout_rate=dropout_rate,
            dropout_rng=self.rngs() if dropout_rate > 0 else None,
            implementation=implementation,
            return_weights=want_weights,
        )
        context, weights = result if want_weights else (result, None)
        if self.sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        if skipped and weights is None:
            shape = (query.shape[0], self.num_heads, q_length, key.shape[1])
            weights = jnp.full(shape, jnp.nan, context.dtype)
        output = jnp.einsum("btnh,nho->bto", context, self.out_kernel[...].astype(self.dtype))
        if self.out_bias is not None:
            output = output + self.out_bias[...].astype(self.dtype)
        return (output, weights) if return_weights else output
