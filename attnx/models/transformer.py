"""The Transformer encoder-decoder (Vaswani et al. 2017, "Attention Is All You Need").

  encoder: x_0 = Dropout(sqrt(d_model) E[src] + PE)              (sec. 3.4, 3.5, 5.4)
           x_l = EncoderLayer(x_{l-1}),  l = 1..N                (sec. 3.1)
  decoder: y_0 = Dropout(sqrt(d_model) E'[tgt_in] + PE)
           y_l = DecoderLayer(y_{l-1}, x_N),  l = 1..N           (sec. 3.1, 3.2.3)
  logits = y_N W_out (+ b), W_out = E'^T when tied               (sec. 3.4)

The layers (`attnx.models.transformer_blocks`) are built from
`attnx.layers.MultiHeadAttention` (eq. 1 and sec. 3.2.2) and the position-wise
FFN (eq. 2), with post-LN residual connections as in the paper or pre-LN as
an option (then each stack ends with a LayerNorm). PE is sinusoidal (sec.
3.5) or a learned table (Table 3, row E). Embeddings can be shared between
source and target (`share_embeddings`) and tied to the output projection
(`tie_output`), as in sec. 3.4; token embeddings are initialised
N(0, d_model^-1/2) so that the scaled embeddings have unit variance.

Masks: the encoder's self-attention and the decoder's cross-attention see
only real source tokens (src != 0); the decoder's self-attention is causal
(target padding is left to the loss). Packed inputs (several sequences per
row) pass segment ids (0 = padding) and per-token positions to `encode` and
`decode`: attention then stays within a segment and positions restart.

Interface (shared by the attnx seq2seq models, see `attnx.decoding`):
`encode(src)` -> `TransformerEncoding`; `decode(tgt_in, encoded)` -> logits
`[batch, t, vocab]`; `__call__`; `init_cache(encoded, max_length)`;
`decode_step(tokens)`. With `return_weights=True`, `decode` and `decode_step`
also return `{'decoder/layer_{i}/self_attention': [b, h, t, t],
'decoder/layer_{i}/cross_attention': [b, h, t, s], 'alignment': [b, t, s]}`
(`[b, h, 1, max_length]` self-attention at a decode step: the whole cache),
`encode` returns `{'encoder/layer_{i}/self_attention': [b, h, s, s]}` and
`__call__` returns both. 'alignment' is the last decoder layer's
cross-attention averaged over heads.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnx.layers import masks as masks_lib
from attnx.layers.params import logical_axes
from attnx.layers.positions import LearnedPositions, RelativePositionBias, SinusoidalPositions
from attnx.layers.source_cache import SourceCache
from attnx.models.checks import check_at_least, check_tokens
from attnx.models.transformer_blocks import DecoderLayer, EncoderLayer, dense, layer_norm
from attnx.models.transformer_config import (
    SHAW_MAX_DISTANCE,
    T5_BUCKETS,
    T5_MAX_DISTANCE,
    TransformerConfig,
    tiny,
    transformer_base,
    transformer_big,
)

# The presets are re-exported so that `attnx.models.transformer` is the one import users need.
__all__ = [
    "EMBEDDING_MODULES",
    "Transformer",
    "TransformerConfig",
    "TransformerEncoding",
    "parameter_count",
    "tiny",
    "transformer_base",
    "transformer_big",
]

Array = jax.Array

# Attributes of `Transformer` holding embedding-type parameters (token tables,
# position tables and the output projection); everything else is "non-embedding".
EMBEDDING_MODULES = (
    "source_embedding",
    "target_embedding",
    "encoder_positions",
    "decoder_positions",
    "encoder_relative_bias",
    "decoder_relative_bias",
    "output_projection",
)


@struct.dataclass
class TransformerEncoding:
    """The encoder's output.

    Attributes:
      memory: `[batch, src_len, d_model]`, the last encoder layer's output.
      segment_ids: int32 `[batch, src_len]`: 0 at padding, else the token's
        segment (1 everywhere for an unpacked row).
    """

    memory: Array
    segment_ids: Array


class Transformer(nnx.Module):
    """Encoder-decoder Transformer (Vaswani et al. 2017). See the module docstring.

    Args:
      config: a `TransformerConfig` (e.g. `transformer_base()`).
      rngs: 'params' and, when any dropout rate is > 0, 'dropout' streams.

    Attributes:
      source_embedding / target_embedding: `nnx.Embed` `[vocab, d_model]`, axes
        ('vocab', 'embed'); the same object when `share_embeddings`.
      encoder_positions / decoder_positions: `SinusoidalPositions` or `LearnedPositions`.
      encoder_layers / decoder_layers: lists of `EncoderLayer` / `DecoderLayer`.
      encoder_norm / decoder_norm: final LayerNorms (pre-LN only).
      output_projection: `nnx.Linear` `[d_model, vocab]` with bias, None when tied.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        d = cfg.d_model
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

        def embedding(vocab_size):
            return nnx.Embed(
                vocab_size,
                d,
                embedding_init=nnx.initializers.normal(stddev=d**-0.5),
                embedding_metadata=logical_axes("vocab", "embed"),
                **kw,
            )

        self.source_embedding = embedding(cfg.src_vocab_size)
        self.target_embedding = (
            self.source_embedding if cfg.share_embeddings else embedding(cfg.target_vocab_size)
        )
        positions = cfg.mechanism.positions
        if positions == "sinusoidal":
            self.encoder_positions = SinusoidalPositions(d)
            self.decoder_positions = SinusoidalPositions(d)
        elif positions == "learned":
            self.encoder_positions = LearnedPositions(cfg.max_length, d, **kw)
            self.decoder_positions = LearnedPositions(cfg.max_length, d, **kw)
        else:
            # Rotary and relative positions act inside the attention, 'none' nowhere.
            self.encoder_positions = self.decoder_positions = nnx.data(None)
        if positions in ("t5_relative", "shaw_relative"):
            # One bias table per stack, shared by its layers (T5); the decoder's
            # is unidirectional (its keys are never ahead of the query).
            buckets = dict(
                num_buckets=T5_BUCKETS if positions == "t5_relative" else None,
                max_distance=T5_MAX_DISTANCE if positions == "t5_relative" else SHAW_MAX_DISTANCE,
            )
            self.encoder_relative_bias = RelativePositionBias(
                cfg.num_heads, bidirectional=True, **buckets, **kw
            )
            self.decoder_relative_bias = RelativePositionBias(
                cfg.num_heads, bidirectional=False, **buckets, **kw
            )
        else:
            self.encoder_relative_bias = self.decoder_relative_bias = nnx.data(None)
        self.embedding_dropout = nnx.Dropout(
            cfg.dropout_rate, rngs=rngs if cfg.dropout_rate > 0 else None
        )
        self.encoder_layers = nnx.List(
            [EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_encoder_layers)]
        )
        self.decoder_layers = nnx.List(
            [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_decoder_layers)]
        )
        if cfg.pre_ln:
            # Pre-LN leaves each stack's output unnormalised; a final LayerNorm fixes its scale.
            self.encoder_norm = layer_norm(d, epsilon=cfg.layer_norm_epsilon, **kw)
            self.decoder_norm = layer_norm(d, epsilon=cfg.layer_norm_epsilon, **kw)
        else:
            self.encoder_norm = self.decoder_norm = nnx.data(None)
        if cfg.tie_output:
            self.output_projection = nnx.data(None)
        else:
            self.output_projection = dense(d, cfg.target_vocab_size, ("embed", "vocab"), **kw)
        self.cache_source_valid = self.cache_step = nnx.data(None)

    # -- shared pieces -------------------------------------------------------

    def _embed(
        self,
        tokens: Array,
        table: nnx.Embed,
        positions_module: nnx.Module,
        positions: Array | None,
        deterministic: bool,
    ) -> Array:
        """Dropout(sqrt(d_model) E[tokens] + PE[positions]) (sec. 3.4, 3.5, 5.4)."""
        x = table(tokens) * jnp.asarray(math.sqrt(self.config.d_model), self.config.dtype)
        if positions_module is not None:
            x = positions_module(x, positions)
        return self.embedding_dropout(x, deterministic=deterministic)

    def _logits(self, y: Array) -> Array:
        """Pre-softmax projection: y E'^T when tied (sec. 3.4), else y W + b."""
        if self.output_projection is None:
            return self.target_embedding.attend(y)
        return self.output_projection(y)

    # -- encoder -------------------------------------------------------------

    def encode(
        self,
        src: Array,
        *,
        train: bool = False,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        return_weights: bool = False,
    ) -> TransformerEncoding | tuple[TransformerEncoding, dict[str, Array]]:
        """Runs the encoder stack.

        Args:
          src: int `[batch, src_len]`, 0 = padding.
          train: dropout on.
          segment_ids: packed rows: int `[batch, src_len]` segment of each token
            (0 = padding); default `src != 0`.
          positions: packed rows: int `[batch, src_len]` position of each token
            within its segment; default `0 .. src_len - 1`.
          return_weights: also return `{'encoder/layer_{i}/self_attention': [b, h, s, s]}`.

        Returns:
          A `TransformerEncoding`, and the weights if asked.
        """
        src = check_tokens("Transformer.encode", src)
        valid = src != 0
        if segment_ids is None:
            segment_ids = valid.astype(jnp.int32)
        else:
            segment_ids = jnp.asarray(segment_ids)
            if segment_ids.shape != src.shape:
                raise ValueError(
                    f"Transformer.encode: segment_ids {segment_ids.shape} must match src "
                    f"{src.shape}"
                )
            segment_ids = jnp.where(valid, segment_ids, 0).astype(jnp.int32)
        deterministic = not train
        x = self._embed(
            src, self.source_embedding, self.encoder_positions, positions, deterministic
        )
        bias = None
        if self.encoder_relative_bias is not None:
            length = src.shape[1]
            bias = self.encoder_relative_bias(
                length, length, q_positions=positions, k_positions=positions
            )
        weights = {}
        for i, layer in enumerate(self.encoder_layers):
            x, w = layer(
                x,
                segment_ids=segment_ids,
                positions=positions,
                bias=bias,
                deterministic=deterministic,
                return_weights=return_weights,
            )
            if return_weights:
                weights[f"encoder/layer_{i}/self_attention"] = w
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        encoded = TransformerEncoding(x, segment_ids)
        return (encoded, weights) if return_weights else encoded

    # -- decoder -------------------------------------------------------------

    def _run_decoder(
        self,
        y,
        memory,
        *,
        cross_mask,
        segment_ids,
        positions,
        self_bias,
        decode,
        deterministic,
        return_weights,
    ):
        weights = {}
        cross = None
        for i, layer in enumerate(self.decoder_layers):
            y, self_w, cross = layer(
                y,
                memory,
                cross_mask=cross_mask,
                segment_ids=segment_ids,
                positions=positions,
                self_bias=self_bias,
                decode=decode,
                deterministic=deterministic,
                return_weights=return_weights,
            )
            if return_weights:
                weights[f"decoder/layer_{i}/self_attention"] = self_w
                weights[f"decoder/layer_{i}/cross_attention"] = cross
        if self.decoder_norm is not None:
            y = self.decoder_norm(y)
        logits = self._logits(y)
        if not return_weights:
            return logits
        weights["alignment"] = jnp.mean(cross, axis=1)
        return logits, weights

    def decode(
        self,
        tgt_in: Array,
        encoded: TransformerEncoding,
        *,
        train: bool = False,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        return_weights: bool = False,
    ) -> Array | tuple[Array, dict[str, Array]]:
        """Teacher-forced decoder: logits of every target position.

        Args:
          tgt_in: int `[batch, tgt_len]`, the target shifted right (bos first).
          encoded: from `encode`.
          train: dropout on.
          segment_ids: packed rows: int `[batch, tgt_len]` segment of each target
            token, numbered as the source segments of the same row (needed
            whenever `encode` was given packed segment ids).
          positions: packed rows: int `[batch, tgt_len]` positions within segments.
          return_weights: also return the weights dict (module docstring).

        Returns:
          logits `[batch, tgt_len, tgt_vocab]`, and the weights if asked.
        """
        memory, source_ids = encoded.memory, encoded.segment_ids
        tgt_in = check_tokens("Transformer.decode", tgt_in, batch=memory.shape[0])
        if segment_ids is None:
            cross_mask = masks_lib.padding_mask(None, source_ids > 0)
            pair = None
        else:
            segment_ids = jnp.asarray(segment_ids)
            if segment_ids.shape != tgt_in.shape:
                raise ValueError(
                    f"Transformer.decode: segment_ids {segment_ids.shape} must match tgt_in "
                    f"{tgt_in.shape}"
                )
            cross_mask, pair = None, (segment_ids.astype(jnp.int32), source_ids)
        deterministic = not train
        y = self._embed(
            tgt_in, self.target_embedding, self.decoder_positions, positions, deterministic
        )
        self_bias = None
        if self.decoder_relative_bias is not None:
            length = tgt_in.shape[1]
            self_bias = self.decoder_relative_bias(
                length, length, q_positions=positions, k_positions=positions
            )
        return self._run_decoder(
            y,
            memory,
            cross_mask=cross_mask,
            segment_ids=pair,
            positions=positions,
            self_bias=self_bias,
            decode=False,
            deterministic=deterministic,
            return_weights=return_weights,
        )

    def __call__(
        self,
        src: Array,
        tgt_in: Array,
        *,
        train: bool = False,
        src_segment_ids: Array | None = None,
        src_positions: Array | None = None,
        tgt_segment_ids: Array | None = None,
        tgt_positions: Array | None = None,
        return_weights: bool = False,
    ) -> Array | tuple[Array, dict[str, Array]]:
        """`decode(tgt_in, encode(src))`; with `return_weights` the encoder's and the
        decoder's weights in one dict."""
        encoded = self.encode(
            src,
            train=train,
            segment_ids=src_segment_ids,
            positions=src_positions,
            return_weights=return_weights,
        )
        if return_weights:
            encoded, encoder_weights = encoded
        out = self.decode(
            tgt_in,
            encoded,
            train=train,
            segment_ids=tgt_segment_ids,
            positions=tgt_positions,
            return_weights=return_weights,
        )
        if not return_weights:
            return out
        logits, decoder_weights = out
        return logits, {**encoder_weights, **decoder_weights}

    # -- incremental decoding ------------------------------------------------

    def init_cache(self, encoded: TransformerEncoding, max_length: int) -> None:
        """Creates the decoding state, all in `nnx.Cache` variables.

        Each decoder layer's self-attention gets an empty key/value cache of
        `max_length` positions, and its cross-attention keys and values of the
        encoder output are projected here, once (`DecoderLayer.init_cross_cache`).
        The model keeps the source mask (`cache_source_valid`, `[batch, src_len]`)
        and a 0-d step counter (`cache_step`) giving the position of the next token.

        Args:
          encoded: from `encode` (unpacked; tiled by beam if needed).
          max_length: the most tokens `decode_step` will be called with.
        """
        check_at_least("Transformer.init_cache", max_length=max_length)
        if self.config.mechanism.positions == "learned" and max_length > self.config.max_length:
            raise ValueError(
                f"Transformer.init_cache: max_length={max_length} exceeds the learned "
                f"positions' config.max_length={self.config.max_length}"
            )
        memory = encoded.memory
        for layer in self.decoder_layers:
            layer.self_attention.init_cache(memory.shape[0], max_length)
            layer.init_cross_cache(memory)
        self.cache_source_valid = SourceCache(encoded.segment_ids > 0)
        self.cache_step = nnx.Cache(jnp.array(0, jnp.int32))

    def decode_step(
        self, tokens: Array, *, return_weights: bool = False
    ) -> Array | tuple[Array, dict[str, Array]]:
        """One decoding step from the cache (no dropout).

        Args:
          tokens: int `[batch, 1]`, the previous tokens (bos at the first step).
          return_weights: also return the weights dict of `decode` with t = 1;
            the self-attention weights span the whole cache, `[b, h, 1, max_length]`.

        Returns:
          logits `[batch, tgt_vocab]`, and the weights if asked.
        """
        if self.cache_step is None:
            raise ValueError("Transformer.decode_step: call init_cache(encoded, max_length) first")
        source_valid = self.cache_source_valid[...]
        tokens = check_tokens(
            "Transformer.decode_step", tokens, batch=source_valid.shape[0], length=1
        )
        step = self.cache_step[...]
        positions = jnp.broadcast_to(step, tokens.shape)
        y = self._embed(tokens, self.target_embedding, self.decoder_positions, positions, True)
        self_bias = None
        if self.decoder_relative_bias is not None:
            # The new token at `step` against every cache slot (later slots are masked).
            cache_length = self.decoder_layers[0].self_attention.cached_key[...].shape[1]
            self_bias = self.decoder_relative_bias(
                1, cache_length, q_positions=positions[:1, 0], k_positions=None
            )
        out = self._run_decoder(
            y,
            None,
            cross_mask=masks_lib.padding_mask(None, source_valid),
            segment_ids=None,
            positions=positions,
            self_bias=self_bias,
            decode=True,
            deterministic=True,
            return_weights=return_weights,
        )
        self.cache_step[...] = step + 1
        if not return_weights:
            return out[:, 0]
        logits, weights = out
        return logits[:, 0], weights


def parameter_count(config: TransformerConfig, *, embeddings: bool = True) -> int:
    """Number of parameters of `Transformer(config)`, found without allocating it.

    Args:
      config: the model's configuration.
      embeddings: count the embedding-type parameters too (`EMBEDDING_MODULES`:
        token embeddings, learned positions, the untied output projection).
        Shared or tied arrays count once.
    """
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    total = 0
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if embeddings or path[0] not in EMBEDDING_MODULES:
            total += math.prod(leaf.get_value().shape)
    return total
