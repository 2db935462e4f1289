"""The layers of the Transformer's encoder and decoder stacks (Vaswani et al. 2017, sec. 3).

* `FeedForward`: the position-wise feed-forward network, eq. (2),
    FFN(x) = max(0, x W_1 + b_1) W_2 + b_2.
* `EncoderLayer`: multi-head self-attention, then the FFN (sec. 3.1).
* `DecoderLayer`: masked (causal) multi-head self-attention, multi-head
  attention over the encoder output, then the FFN (sec. 3.1).

Each sub-layer is wrapped in a residual connection and layer normalisation.
Post-LN (the paper, sec. 3.1): x <- LayerNorm(x + Dropout(Sublayer(x))).
Pre-LN (Xiong et al. 2020): x <- x + Dropout(Sublayer(LayerNorm(x))), and
the stack ends with a LayerNorm (see `attnx.models.transformer`). The
dropout is the residual dropout of sec. 5.4.

Every parameter carries logical axis names: attention kernels as in
`attnx.layers.multi_head`, FFN kernels ('embed', 'mlp') / ('mlp', 'embed'),
layer-norm scales and biases ('embed',).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.layers.multi_head import MultiHeadAttention

Array = jax.Array
Weights = Array | None

# tensor2tensor and fairseq initialise every projection with Glorot/Xavier uniform.
_kernel_init = nnx.initializers.xavier_uniform()


def logical(*axes: str | None) -> dict:
    """Variable metadata giving logical axis names to a parameter of an nnx layer."""
    return {"out_sharding": axes, "eager_sharding": False}


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """An `nnx.Linear` `[in, out]` whose kernel has logical axes `axes` (bias: `axes[1]`)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_kernel_init,
        kernel_metadata=logical(*axes),
        bias_metadata=logical(axes[1]),
        rngs=rngs,
    )


def layer_norm(
    features: int, *, epsilon: float, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
) -> nnx.LayerNorm:
    """Layer normalisation (Ba et al. 2016) over the last axis, scale and bias ('embed',)."""
    return nnx.LayerNorm(
        features,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_metadata=logical("embed"),
        bias_metadata=logical("embed"),
        rngs=rngs,
    )


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    # No random stream is kept when the rate is 0: nothing would ever draw from it.
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


class FeedForward(nnx.Module):
    """Position-wise feed-forward network, eq. (2): max(0, x W_1 + b_1) W_2 + b_2.

    Dropout on the ReLU output (`relu_dropout_rate`, tensor2tensor's
    `relu_dropout`) is off in the paper's configuration.

    Args:
      d_model: input and output size.
      d_ff: inner size (2048 in the base model).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        relu_dropout_rate: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.inner = dense(d_model, d_ff, ("embed", "mlp"), **kw)
        self.outer = dense(d_ff, d_model, ("mlp", "embed"), **kw)
        self.relu_dropout = _dropout(relu_dropout_rate, rngs)

    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        """`[batch, length, d_model]` -> `[batch, length, d_model]`."""
        hidden = jax.nn.relu(self.inner(x))
        return self.outer(self.relu_dropout(hidden, deterministic=deterministic))


class _ResidualLayer(nnx.Module):
    """Shared residual wiring of the encoder and decoder layers."""

    pre_ln: bool

    def _residual(
        self,
        x: Array,
        norm: nnx.LayerNorm,
        sublayer: Callable[[Array], tuple[Array, Weights]],
        deterministic: bool,
    ) -> tuple[Array, Weights]:
        """Post-LN: LayerNorm(x + Dropout(Sublayer(x))) (sec. 3.1, 5.4);
        pre-LN: x + Dropout(Sublayer(LayerNorm(x)))."""
        if self.pre_ln:
            y, weights = sublayer(norm(x))
            return x + self.dropout(y, deterministic=deterministic), weights
        y, weights = sublayer(x)
        return norm(x + self.dropout(y, deterministic=deterministic)), weights

    def _feed_forward(self, x: Array, deterministic: bool) -> Array:
        x, _ = self._residual(
            x,
            self.feed_forward_norm,
            lambda h: (self.feed_forward(h, deterministic=deterministic), None),
            deterministic,
        )
        return x


def _attention(num_heads, d_model, *, num_kv_heads, rate, use_bias, implementation, sow, **kw):
    return MultiHeadAttention(
        num_heads,
        d_model,
        num_kv_heads=num_kv_heads,
        dropout_rate=rate,
        use_bias=use_bias,
        implementation=implementation,
        sow_weights=sow,
        kernel_init=_kernel_init,
        **kw,
    )


class EncoderLayer(_ResidualLayer):
    """One encoder layer (sec. 3.1): self-attention, then the FFN, each with a residual
    connection and layer normalisation.

    Args:
      d_model, num_heads, d_ff: sizes (sec. 3.1, 3.2.2, eq. 2).
      num_kv_heads: key/value heads of the attention (None = `num_heads`).
      dropout_rate: residual dropout (sec. 5.4).
      attention_dropout_rate: dropout on the attention weights.
      relu_dropout_rate: dropout inside the FFN.
      pre_ln: pre-LN instead of the paper's post-LN.
      use_bias: biases on the attention projections.
      implementation: attention implementation (see `attnx.layers.attention`).
      sow_weights: the attention sows its weights into `nnx.Intermediate`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        num_kv_heads: int | None = None,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        relu_dropout_rate: float = 0.0,
        pre_ln: bool = False,
        use_bias: bool = True,
        layer_norm_epsilon: float = 1e-6,
        implementation: str | None = None,
        sow_weights: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm_kw = dict(epsilon=layer_norm_epsilon, **kw)
        self.pre_ln = pre_ln
        self.self_attention = _attention(
            num_heads,
            d_model,
            num_kv_heads=num_kv_heads,
            rate=attention_dropout_rate,
            use_bias=use_bias,
            implementation=implementation,
            sow=sow_weights,
            **kw,
        )
        self.self_attention_norm = layer_norm(d_model, **norm_kw)
        self.feed_forward = FeedForward(d_model, d_ff, relu_dropout_rate=relu_dropout_rate, **kw)
        self.feed_forward_norm = layer_norm(d_model, **norm_kw)
        self.dropout = _dropout(dropout_rate, rngs)

    def __call__(
        self,
        x: Array,
        *,
        segment_ids: Array | None = None,
        deterministic: bool = True,
        return_weights: bool = False,
    ) -> tuple[Array, Weights]:
        """Encodes `x` `[batch, src_len, d_model]`.

        Args:
          segment_ids: `[batch, src_len]`, 0 at padding; tokens attend only within
            their own segment (padding mask, and packed sequences).
          deterministic: no dropout.
          return_weights: also return the self-attention weights `[batch, heads, s, s]`.

        Returns:
          `(x, weights)`, weights None unless asked.
        """

        def attend(h):
            out = self.self_attention(
                h,
                segment_ids=segment_ids,
                deterministic=deterministic,
                return_weights=return_weights,
            )
            return out if return_weights else (out, None)

        x, weights = self._residual(x, self.self_attention_norm, attend, deterministic)
        return self._feed_forward(x, deterministic), weights


class DecoderLayer(_ResidualLayer):
    """One decoder layer (sec. 3.1): masked self-attention, attention over the encoder
    output ("encoder-decoder attention", sec. 3.2.3), then the FFN; each with a
    residual connection and layer normalisation.

    Same arguments as `EncoderLayer`.

    For incremental decoding the layer holds, after `init_cross_cache`, the
    encoder output's keys and values projected once by the cross-attention
    (`cross_key` / `cross_value`, `nnx.Cache` `[batch, src_len, kv_heads, head_dim]`),
    and its self-attention holds its own key/value cache.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        num_kv_heads: int | None = None,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        relu_dropout_rate: float = 0.0,
        pre_ln: bool = False,
        use_bias: bool = True,
        layer_norm_epsilon: float = 1e-6,
        implementation: str | None = None,
        sow_weights: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm_kw = dict(epsilon=layer_norm_epsilon, **kw)
        attention_kw = dict(
            num_kv_heads=num_kv_heads,
            rate=attention_dropout_rate,
            use_bias=use_bias,
            implementation=implementation,
            sow=sow_weights,
            **kw,
        )
        self.pre_ln = pre_ln
        self.self_attention = _attention(num_heads, d_model, **attention_kw)
        self.self_attention_norm = layer_norm(d_model, **norm_kw)
        self.cross_attention = _attention(num_heads, d_model, **attention_kw)
        self.cross_attention_norm = layer_norm(d_model, **norm_kw)
        self.feed_forward = FeedForward(d_model, d_ff, relu_dropout_rate=relu_dropout_rate, **kw)
        self.feed_forward_norm = layer_norm(d_model, **norm_kw)
        self.dropout = _dropout(dropout_rate, rngs)
        self.cross_key = self.cross_value = nnx.data(None)

    def init_cross_cache(self, memory: Array) -> None:
        """Projects the encoder output `[batch, src_len, d_model]` to cross-attention
        keys and values once, into `nnx.Cache` variables read by `decode=True` calls."""
        key, value = self.cross_attention.project_key_value(memory)
        self.cross_key, self.cross_value = nnx.Cache(key), nnx.Cache(value)

    def __call__(
        self,
        x: Array,
        memory: Array | None,
        *,
        cross_mask: Array | None = None,
        segment_ids: tuple[Array, Array] | None = None,
        decode: bool = False,
        deterministic: bool = True,
        return_weights: bool = False,
    ) -> tuple[Array, Weights, Weights]:
        """Decodes `x` `[batch, tgt_len, d_model]` against `memory` `[batch, src_len, d_model]`.

        Args:
          memory: the encoder output; None with `decode=True` (the cached
            projections are used).
          cross_mask: boolean, broadcastable to `[batch, heads, tgt_len, src_len]`
            (the source padding mask).
          segment_ids: packed sequences: `(target_ids [batch, tgt_len],
            source_ids [batch, src_len])`; self-attention stays within a target
            segment, cross-attention within the matching source segment.
          decode: the tokens are the next ones of an incremental decode: the
            self-attention reads and extends its cache, the cross-attention uses
            `cross_key` / `cross_value`.
          deterministic: no dropout.
          return_weights: also return the weights.

        Returns:
          `(x, self_weights, cross_weights)`: self-attention weights
          `[batch, heads, tgt_len, tgt_len]` (`[batch, heads, tgt_len, cache_len]`
          with `decode=True`) and cross-attention weights
          `[batch, heads, tgt_len, src_len]`; None unless asked.
        """
        if decode:
            if self.cross_key is None:
                raise ValueError("DecoderLayer: decode=True before init_cross_cache")
            projected_kv = (self.cross_key[...], self.cross_value[...])
        else:
            projected_kv = self.cross_attention.project_key_value(memory)
        target_ids, source_ids = (None, None) if segment_ids is None else segment_ids

        def self_attend(h):
            out = self.self_attention(
                h,
                is_causal=not decode,
                decode=decode,
                segment_ids=target_ids,
                deterministic=deterministic,
                return_weights=return_weights,
            )
            return out if return_weights else (out, None)

        def cross_attend(h):
            out = self.cross_attention(
                h,
                projected_kv=projected_kv,
                mask=cross_mask,
                segment_ids=None if segment_ids is None else (target_ids, source_ids),
                deterministic=deterministic,
                return_weights=return_weights,
            )
            return out if return_weights else (out, None)

        x, self_weights = self._residual(x, self.self_attention_norm, self_attend, deterministic)
        x, cross_weights = self._residual(x, self.cross_attention_norm, cross_attend, deterministic)
        return self._feed_forward(x, deterministic), self_weights, cross_weights
