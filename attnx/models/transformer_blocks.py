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
from attnx.layers.params import logical_axes
from attnx.layers.source_cache import SourceCache

Array = jax.Array
Weights = Array | None

# tensor2tensor and fairseq initialise every projection with Glorot/Xavier uniform.
_kernel_init = nnx.initializers.xavier_uniform()
# Rotary positions' base wavelength (Su et al. 2021, eq. 15: theta_i = 10000^(-2i/d)).
ROTARY_BASE = 10000.0


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
        kernel_metadata=logical_axes(*axes),
        bias_metadata=logical_axes(axes[1]),
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
        scale_metadata=logical_axes("embed"),
        bias_metadata=logical_axes("embed"),
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


def _attention(cfg, *, rotary: bool, rngs: nnx.Rngs) -> MultiHeadAttention:
    """One multi-head attention of the model, as `cfg.attention` describes it."""
    a = cfg.mechanism
    return MultiHeadAttention(
        cfg.num_heads,
        cfg.d_model,
        num_kv_heads=a.num_kv_heads,
        dropout_rate=a.dropout_rate,
        use_bias=cfg.use_bias,
        implementation=a.implementation,
        normalizer=a.normalizer,
        # 'dot' drops eq. (1)'s 1 / sqrt(d_k).
        scale=1.0 if a.score == "dot" else None,
        rotary_base=ROTARY_BASE if rotary else None,
        sow_weights=cfg.sow_weights,
        kernel_init=_kernel_init,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
    )


class EncoderLayer(_ResidualLayer):
    """One encoder layer (sec. 3.1): self-attention, then the FFN, each with a residual
    connection and layer normalisation.

    Args:
      config: the model's `TransformerConfig`: sizes (d_model, num_heads, d_ff),
        the attention (`config.attention`: normalizer, score, rotary positions,
        local window, kernel, key/value heads, weight dropout), residual and
        ReLU dropout, pre-LN, biases, LayerNorm epsilon, dtypes, sow_weights.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        cfg = config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        norm_kw = dict(epsilon=cfg.layer_norm_epsilon, **kw)
        self.pre_ln = cfg.pre_ln
        self.local_window = cfg.mechanism.window if cfg.mechanism.is_local else None
        self.self_attention = _attention(cfg, rotary=cfg.mechanism.positions == "rotary", rngs=rngs)
        self.self_attention_norm = layer_norm(cfg.d_model, **norm_kw)
        self.feed_forward = FeedForward(
            cfg.d_model, cfg.d_ff, relu_dropout_rate=cfg.relu_dropout_rate, **kw
        )
        self.feed_forward_norm = layer_norm(cfg.d_model, **norm_kw)
        self.dropout = _dropout(cfg.dropout_rate, rngs)

    def __call__(
        self,
        x: Array,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        bias: Array | None = None,
        deterministic: bool = True,
        return_weights: bool = False,
    ) -> tuple[Array, Weights]:
        """Encodes `x` `[batch, src_len, d_model]`.

        Args:
          segment_ids: `[batch, src_len]`, 0 at padding; tokens attend only within
            their own segment (padding mask, and packed sequences).
          positions: `[batch, src_len]` positions within segments, for rotary
            positions (default `0 .. src_len - 1`).
          bias: a relative position bias `[1 or batch, heads, src_len, src_len]`.
          deterministic: no dropout.
          return_weights: also return the self-attention weights `[batch, heads, s, s]`.

        Returns:
          `(x, weights)`, weights None unless asked.
        """

        def attend(h):
            out = self.self_attention(
                h,
                segment_ids=segment_ids,
                positions=positions,
                bias=bias,
                local_window=self.local_window,
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

    Same arguments as `EncoderLayer`. Rotary positions and the local window
    apply to the self-attention only (the cross-attention's keys are source
    positions); the decoder's window is the D positions before each token.

    For incremental decoding the layer holds, after `init_cross_cache`, the
    encoder output's keys and values projected once by the cross-attention
    (`cross_key` / `cross_value`, `nnx.Cache` `[batch, src_len, kv_heads, head_dim]`),
    and its self-attention holds its own key/value cache.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        cfg = config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        norm_kw = dict(epsilon=cfg.layer_norm_epsilon, **kw)
        self.pre_ln = cfg.pre_ln
        # Causal: a token sees itself and the D tokens before it.
        self.local_window = (cfg.mechanism.window, 0) if cfg.mechanism.is_local else None
        self.self_attention = _attention(cfg, rotary=cfg.mechanism.positions == "rotary", rngs=rngs)
        self.self_attention_norm = layer_norm(cfg.d_model, **norm_kw)
        self.cross_attention = _attention(cfg, rotary=False, rngs=rngs)
        self.cross_attention_norm = layer_norm(cfg.d_model, **norm_kw)
        self.feed_forward = FeedForward(
            cfg.d_model, cfg.d_ff, relu_dropout_rate=cfg.relu_dropout_rate, **kw
        )
        self.feed_forward_norm = layer_norm(cfg.d_model, **norm_kw)
        self.dropout = _dropout(cfg.dropout_rate, rngs)
        self.cross_key = self.cross_value = nnx.data(None)

    def init_cross_cache(self, memory: Array) -> None:
        """Projects the encoder output `[batch, src_len, d_model]` to cross-attention
        keys and values once, into `nnx.Cache` variables read by `decode=True` calls."""
        key, value = self.cross_attention.project_key_value(memory)
        self.cross_key, self.cross_value = SourceCache(key), SourceCache(value)

    def __call__(
        self,
        x: Array,
        memory: Array | None,
        *,
        cross_mask: Array | None = None,
        segment_ids: tuple[Array, Array] | None = None,
        positions: Array | None = None,
        self_bias: Array | None = None,
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
          positions: `[batch, tgt_len]` target positions for rotary positions
            (default: 0.., or the cache index onwards with `decode=True`).
          self_bias: a relative position bias on the self-attention logits,
            `[1 or batch, heads, tgt_len, tgt_len]` (`[.., tgt_len, cache_len]`
            with `decode=True`).
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
                positions=positions,
                bias=self_bias,
                local_window=self.local_window,
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
