"""Multi-step attention of the convolutional sequence-to-sequence model.

Gehring, Auli, Grangier, Yarats & Dauphin (2017), "Convolutional Sequence to
Sequence Learning", sec. 3.3 and 3.4. Every decoder layer l has its own
attention over the output of the last encoder block u. For decoder position i
with conv-block output h_i^l and previous-target embedding g_i:

  d_i^l  = W_d^l h_i^l + b_d^l + g_i                      (decoder state summary)
  a_ij^l = exp(d_i^l . z_j^u) / sum_t exp(d_i^l . z_t^u)  (keys: encoder outputs z_j)
  c_i^l  = sum_j a_ij^l (z_j^u + e_j)                     (values: z_j plus source embedding e_j)

and c_i^l is added back to h_i^l. Sec. 3.4 scales c_i^l by m sqrt(1/m) = sqrt(m)
(m = source length) to undo the variance shrinking of a weighted average of m
vectors; here m is the *real* (unpadded) length of each example.

Residual scaling by sqrt(0.5), and how this module relates to fairseq's
`fconv.AttentionLayer` (the authors' code):

* combining h_i^l with the projected context: both implementations return
  sqrt(0.5) (h_i^l + W_o c_i^l + b_o) by default (`residual_scale`); sec. 3.4
  halves the variance of every sum of two such terms, and the context has
  d-dimensional embeddings, so it is projected to the decoder's channels by
  W_o first (the paper leaves this projection implicit).
* the query summary d_i^l: the paper's equation has no scale; fairseq computes
  sqrt(0.5) (W_d h + b_d + g). `query_scale` picks (default 1.0, the paper;
  pass `math.sqrt(0.5)` for fairseq). It divides all logits by sqrt(2), so
  trained weights of one convention are not exact for the other.
* the values: fairseq's *encoder* hands over sqrt(0.5) (z_j + e_j) and scales
  the encoder's gradient by 1 / (2 x number of attention layers); both belong
  to the encoder, which passes whatever values it wants as `encoder_values`.
* fairseq uses weight normalisation on W_d and W_o; here they are plain
  kernels (LeCun-normal initialised, as fairseq's std sqrt(1 / fan_in)).

The key side needs no projection (keys are z_j themselves), so there is
nothing to hoist out of a decoding loop: an incremental step simply calls the
module with `t = 1`, and every output row depends only on its own position.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.layers import interventions
from attnx.layers.normalizers import Normalizer, get_normalizer
from attnx.layers.params import Initializer, param

Array = jax.Array


class MultiStepAttention(nnx.Module):
    """One decoder layer's attention in ConvS2S (Gehring et al. 2017, sec. 3.3).

    Args:
      decoder_channels: C, channels of the decoder conv block output h^l.
      embed_dim: E, size of the embeddings g_i, e_j and of the encoder outputs z_j.
      query_scale: multiplies d_i^l; 1.0 as in the paper, sqrt(0.5) as in fairseq.
      residual_scale: multiplies h + W_o c; sqrt(0.5) as in sec. 3.4 and
        fairseq, 1.0 for the plain sum.
      normalizer: 'softmax' (the paper), 'sparsemax' or 'entmax15'.
      dropout_rate: dropout on the weights used for the context; the weights
        returned or sown are the ones before dropout.
      sow_weights: sow the weights `[batch, t, s]` into `nnx.Intermediate` as
        'attention_weights' on every call.
      dtype: compute dtype (weights are normalised in float32).

    Attributes (parameters, `x @ kernel` layout):
      query_kernel: (W_d^l)^T, `[C, E]`; query_bias: b_d^l, `[E]`.
      out_kernel: W_o^T, `[E, C]`; out_bias: b_o, `[C]`.
    """

    def __init__(
        self,
        decoder_channels: int,
        embed_dim: int,
        *,
        query_scale: float = 1.0,
        residual_scale: float = math.sqrt(0.5),
        normalizer: str | Normalizer = "softmax",
        dropout_rate: float = 0.0,
        sow_weights: bool = False,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if decoder_channels < 1 or embed_dim < 1:
            raise ValueError(
                "MultiStepAttention: decoder_channels and embed_dim must be >= 1, got "
                f"{decoder_channels}, {embed_dim}"
            )
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(
                f"MultiStepAttention: dropout_rate must be in [0, 1), got {dropout_rate}"
            )
        self.decoder_channels = decoder_channels
        self.embed_dim = embed_dim
        self.query_scale = query_scale
        self.residual_scale = residual_scale
        self.normalizer: Callable[..., Array] = get_normalizer(normalizer)
        self.sow_weights = sow_weights
        self.dtype = dtype
        zeros = nnx.initializers.zeros_init()
        self.query_kernel = param(
            rngs, kernel_init, (decoder_channels, embed_dim), ("channels", "embed"), param_dtype
        )
        self.query_bias = param(rngs, zeros, (embed_dim,), ("embed",), param_dtype)
        self.out_kernel = param(
            rngs, kernel_init, (embed_dim, decoder_channels), ("embed", "channels"), param_dtype
        )
        self.out_bias = param(rngs, zeros, (decoder_channels,), ("channels",), param_dtype)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

    def _check_inputs(self, decoder_state, target_embedding, encoder_keys, encoder_values, mask):
        c, e = self.decoder_channels, self.embed_dim
        if decoder_state.ndim != 3 or decoder_state.shape[-1] != c:
            raise ValueError(
                f"MultiStepAttention: decoder_state must be [batch, t, decoder_channels={c}], "
                f"got {decoder_state.shape}"
            )
        batch, t = decoder_state.shape[:2]
        if target_embedding.shape != (batch, t, e):
            raise ValueError(
                f"MultiStepAttention: target_embedding must be [batch, t, embed_dim] = "
                f"{(batch, t, e)}, got {target_embedding.shape}"
            )
        if encoder_keys.ndim != 3 or encoder_keys.shape[0] != batch or encoder_keys.shape[2] != e:
            raise ValueError(
                f"MultiStepAttention: encoder_keys must be [batch={batch}, s, embed_dim={e}], "
                f"got {encoder_keys.shape}"
            )
        if encoder_values.shape != encoder_keys.shape:
            raise ValueError(
                f"MultiStepAttention: encoder_values must match encoder_keys {encoder_keys.shape}, "
                f"got {encoder_values.shape}"
            )
        if mask is not None and mask.shape != encoder_keys.shape[:2]:
            raise ValueError(
                f"MultiStepAttention: source_mask must be [batch, s] = {encoder_keys.shape[:2]}, "
                f"got {mask.shape}"
            )

    def __call__(
        self,
        decoder_state: Array,
        target_embedding: Array,
        encoder_keys: Array,
        encoder_values: Array,
        source_mask: Array | None = None,
        return_weights: bool = False,
    ) -> Array | tuple[Array, Array]:
        """Attends from every decoder position to the source and adds the context back.

        Args:
          decoder_state: h^l, `[batch, t, C]` (t = 1 for an incremental step).
          target_embedding: g, `[batch, t, E]`, embeddings (with positions) of
            the previous target elements.
          encoder_keys: z^u, `[batch, s, E]`, the last encoder block's outputs.
          encoder_values: z^u + e, `[batch, s, E]`.
          source_mask: `[batch, s]`, True at real source positions; default all real.
          return_weights: also return the attention weights.

        Returns:
          The new decoder state `residual_scale * (h + W_o (sqrt(m) c) + b_o)`,
          `[batch, t, C]`, and with `return_weights` the weights a^l
          `[batch, t, s]` (zero at padding; an all-padding source gives zero
          weights and h scaled by `residual_scale` plus b_o).
        """
        decoder_state = jnp.asarray(decoder_state)
        target_embedding = jnp.asarray(target_embedding)
        encoder_keys = jnp.asarray(encoder_keys)
        encoder_values = jnp.asarray(encoder_values)
        if source_mask is not None:
            source_mask = jnp.asarray(source_mask)
        self._check_inputs(
            decoder_state, target_embedding, encoder_keys, encoder_values, source_mask
        )
        if source_mask is None:
            source_mask = jnp.ones(encoder_keys.shape[:2], bool)
        source_mask = source_mask.astype(bool)
        dt = self.dtype
        h = decoder_state.astype(dt)
        summary = h @ self.query_kernel[...].astype(dt) + self.query_bias[...].astype(dt)
        summary = (summary + target_embedding.astype(dt)) * self.query_scale  # d_i^l
        scores = jnp.einsum("bte,bse->bts", summary, encoder_keys.astype(dt))
        weights = self.normalizer(scores.astype(jnp.float32), source_mask[:, None, :])
        weights = interventions.apply(
            weights, source_mask[:, None, :], "multi_step", missing_axes=(1,)
        )
        context = jnp.einsum(
            "bts,bse->bte", self.dropout(weights).astype(dt), encoder_values.astype(dt)
        )
        # m sqrt(1/m) = sqrt(m) with m the real source length of each example (sec. 3.4).
        source_length = jnp.sum(source_mask, axis=-1).astype(dt)
        context = context * jnp.sqrt(source_length)[:, None, None]
        projected = context @ self.out_kernel[...].astype(dt) + self.out_bias[...].astype(dt)
        output = (h + projected) * self.residual_scale
        weights = weights.astype(dt)
        if self.sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        return (output, weights) if return_weights else output
