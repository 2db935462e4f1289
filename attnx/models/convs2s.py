"""ConvS2S: the convolutional encoder-decoder of Gehring, Auli, Grangier, Yarats
& Dauphin (2017), "Convolutional Sequence to Sequence Learning".

  e_j = w_j + p_j, g_i = w'_i + p'_i     token + learned position embeddings (sec. 3.1),
                                         dropout on both (sec. 4.3)
  encoder: x = W_in e; x = EncoderBlock_l(x), l = 1..L (GLU blocks, sec. 3.2);
           z = W_out x (back to the embedding size)
           keys z_j, values z_j + e_j    (sec. 3.3)
  decoder: y = W'_in g; y = DecoderBlock_l(y, g, z, z + e), l = 1..L'
           (causal GLU block + MultiStepAttention in every chosen block, sec. 3.3)
  logits = W_vocab Dropout(W'_out y)     (sec. 3.1: linear to the output embedding
                                         size, then the vocabulary projection)

Every convolution and linear layer is weight-normalised and initialised as in
sec. 3.4-3.5 (`attnx.models.convs2s_blocks`); block outputs are scaled by
sqrt(0.5) and the context by sqrt(m) (sec. 3.4, in `MultiStepAttention`).
With `config.scaling='fairseq'`, d_i and the values z_j + e_j are also
multiplied by sqrt(0.5), as in the authors' fairseq code.

Encoder-gradient scaling (sec. 3.4, "we scale the gradients of the encoder
layers by the number of attention mechanisms we use; we exclude source word
embeddings"): as fairseq's `GradMultiply`, the gradient reaching z (keys and
the z part of the values) is multiplied by 1 / (2 x number of attention
layers) by `scale_gradient`, an identity with a custom VJP. So every encoder
weight (input map, blocks, output map) gets exactly that factor, while the
source embeddings also receive an unscaled gradient through the values'
e_j term. The forward pass is unchanged.

Interface (shared by the attnx seq2seq models, see `attnx.decoding`):
`encode(src)` -> `ConvS2SEncoding`; `decode(tgt_in, encoded)` -> logits
`[batch, t, vocab]` (float32); `__call__`; `init_cache(encoded, max_length)`;
`decode_step(tokens)`. With `return_weights=True`, `decode`, `decode_step`
and `__call__` also return `{'decoder/layer_{i}/attention': [b, t, s]}` for
every block i with an attention (single-head, as `MultiStepAttention` gives
it) and 'alignment' `[b, t, s]`: the *average over the attention layers*, as
fairseq's decoder returns (every layer attends for itself, sec. 3.3, so no
single layer is canonical). Decode steps give t = 1.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnx.layers.params import logical_axes
from attnx.layers.positions import LearnedPositions, SinusoidalPositions
from attnx.layers.source_cache import SourceCache
from attnx.models.checks import check_tokens
from attnx.models.convs2s_blocks import (
    SQRT_HALF,
    DecoderBlock,
    EncoderBlock,
    WeightNormLinear,
    scale_gradient,
)
from attnx.models.convs2s_config import (
    ConvS2SConfig,
    convs2s_wmt14_en_de,
    convs2s_wmt14_en_fr,
    convs2s_wmt16_en_ro,
    cpu_small,
    tiny,
)

# The presets are re-exported so that `attnx.models.convs2s` is the one import users need.
__all__ = [
    "ConvS2S",
    "ConvS2SConfig",
    "ConvS2SEncoding",
    "convs2s_wmt14_en_de",
    "convs2s_wmt14_en_fr",
    "convs2s_wmt16_en_ro",
    "cpu_small",
    "parameter_count",
    "tiny",
]

Array = jax.Array


@struct.dataclass
class ConvS2SEncoding:
    """The encoder's output (sec. 3.3).

    Attributes:
      keys: z^u `[batch, src_len, embed_dim]`, the last block's output mapped back
        to the embedding size (zero at padding).
      values: z^u + e (times sqrt(0.5) with `scaling='fairseq'`), `[batch, src_len, embed_dim]`.
      source_valid: bool `[batch, src_len]`, True at real tokens.
    """

    keys: Array
    values: Array
    source_valid: Array


class ConvS2S(nnx.Module):
    """Convolutional sequence-to-sequence model (Gehring et al. 2017). See the module docstring.

    Args:
      config: a `ConvS2SConfig` (e.g. `convs2s_wmt14_en_de()`).
      rngs: 'params' and, when `dropout_rate > 0`, 'dropout' streams.

    Attributes:
      source_embedding / target_embedding: `nnx.Embed` `[vocab, embed_dim]`, N(0, 0.1).
      source_positions / target_positions: `LearnedPositions` `[max_length, embed_dim]`,
        N(0, 0.1) (the paper); `SinusoidalPositions` or None as `config.attention.positions` says.
      encoder_input / decoder_input: `WeightNormLinear` embed_dim -> first block's channels.
      encoder_blocks / decoder_blocks: lists of `EncoderBlock` / `DecoderBlock`.
      encoder_output: last encoder channels -> embed_dim.
      decoder_output: last decoder channels -> decoder_out_embed_dim.
      output_projection: decoder_out_embed_dim -> target vocabulary.
      cache_keys / cache_values / cache_source_valid / cache_step: decoding state
        (`nnx.Cache`, set by `init_cache`), with each block's `conv_buffer`.
    """

    def __init__(self, config: ConvS2SConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        e, p = cfg.embed_dim, cfg.dropout_rate
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        wn = dict(weight_norm=cfg.weight_norm, **kw)
        init = nnx.initializers.normal(0.1)  # all embeddings N(0, 0.1) (sec. 3.5)
        meta = logical_axes("vocab", "embed")
        self.source_embedding = nnx.Embed(
            cfg.src_vocab_size, e, embedding_init=init, embedding_metadata=meta, **kw
        )
        self.target_embedding = nnx.Embed(
            cfg.target_vocab_size, e, embedding_init=init, embedding_metadata=meta, **kw
        )
        a = cfg.mechanism
        if a.positions == "learned":
            self.source_positions = LearnedPositions(cfg.max_length, e, embedding_init=init, **kw)
            self.target_positions = LearnedPositions(cfg.max_length, e, embedding_init=init, **kw)
        elif a.positions == "sinusoidal":
            self.source_positions, self.target_positions = (
                SinusoidalPositions(e),
                SinusoidalPositions(e),
            )
        else:
            self.source_positions = self.target_positions = nnx.data(None)
        self.dropout = nnx.Dropout(p, rngs=rngs if p > 0 else None)

        # Layers whose input was dropped out are initialised with retain probability 1 - p.
        def stack(layers, make_block):
            blocks, in_channels = [], layers[0][0]
            for i, (channels, width) in enumerate(layers):
                blocks.append(make_block(i, in_channels, channels, width))
                in_channels = channels
            return nnx.List(blocks)

        self.encoder_input = WeightNormLinear(
            e, cfg.encoder_layers[0][0], ("embed", "channels"), retain=1 - p, **wn
        )
        self.encoder_blocks = stack(
            cfg.encoder_layers,
            lambda i, c_in, c, k: EncoderBlock(c_in, c, k, dropout_rate=p, **wn),
        )
        self.encoder_output = WeightNormLinear(
            cfg.encoder_layers[-1][0], e, ("channels", "embed"), **wn
        )
        fairseq = cfg.scaling == "fairseq"
        flags = cfg.attention_flags
        self.decoder_input = WeightNormLinear(
            e, cfg.decoder_layers[0][0], ("embed", "channels"), retain=1 - p, **wn
        )
        self.decoder_blocks = stack(
            cfg.decoder_layers,
            lambda i, c_in, c, k: DecoderBlock(
                c_in,
                c,
                k,
                e,
                attention=flags[i],
                # 'scaled_dot' divides d_i . z_j by sqrt(f) as in Vaswani et al.'s eq. (1).
                query_scale=(SQRT_HALF if fairseq else 1.0)
                * (e**-0.5 if a.score == "scaled_dot" else 1.0),
                normalizer=a.normalizer,
                dropout_rate=p,
                sow_weights=cfg.sow_weights,
                **wn,
            ),
        )
        self.decoder_output = WeightNormLinear(
            cfg.decoder_layers[-1][0], cfg.output_embed_dim, ("channels", "embed"), **wn
        )
        self.output_projection = WeightNormLinear(
            cfg.output_embed_dim, cfg.target_vocab_size, ("embed", "vocab"), retain=1 - p, **wn
        )
        self.cache_keys = self.cache_values = nnx.data(None)
        self.cache_source_valid = self.cache_step = nnx.data(None)

    # -- encoder -------------------------------------------------------------

    def _embed(self, tokens, table, positions_module, positions, deterministic):
        """Dropout(w + p) (sec. 3.1, 4.3)."""
        x = table(tokens)
        if positions_module is not None:
            x = positions_module(x, positions)
        return self.dropout(x, deterministic=deterministic)

    def encode(self, src: Array, *, train: bool = False) -> ConvS2SEncoding:
        """Runs the encoder.

        Args:
          src: int `[batch, src_len]`, 0 = padding, `src_len <= config.max_length`.
          train: dropout on.

        Returns:
          A `ConvS2SEncoding` (keys z, values z + e, source mask).
        """
        src = check_tokens("ConvS2S.encode", src)
        cfg = self.config
        valid = src != 0
        deterministic = not train
        e = self._embed(src, self.source_embedding, self.source_positions, None, deterministic)
        x = self.encoder_input(e)
        for block in self.encoder_blocks:
            x = block(x, valid, deterministic=deterministic)
        z = jnp.where(valid[..., None], self.encoder_output(x), 0)
        if cfg.scale_encoder_gradients:
            z = scale_gradient(z, 1.0 / (2.0 * cfg.num_attention_layers))
        values = z + e
        if cfg.scaling == "fairseq":
            values = values * SQRT_HALF
        return ConvS2SEncoding(z, values, valid)

    # -- decoder -------------------------------------------------------------

    def _logits(self, y: Array, deterministic: bool) -> Array:
        """W_vocab Dropout(W'_out y), in float32."""
        y = self.dropout(self.decoder_output(y), deterministic=deterministic)
        return self.output_projection(y).astype(jnp.float32)

    @staticmethod
    def _weights_dict(per_layer: dict[int, Array]) -> dict[str, Array]:
        weights = {f"decoder/layer_{i}/attention": w for i, w in per_layer.items()}
        weights["alignment"] = sum(per_layer.values()) / len(per_layer)
        return weights

    def decode(
        self,
        tgt_in: Array,
        encoded: ConvS2SEncoding,
        *,
        train: bool = False,
        return_weights: bool = False,
    ) -> Array | tuple[Array, dict[str, Array]]:
        """Teacher-forced decoder: logits of every target position.

        Args:
          tgt_in: int `[batch, tgt_len]`, the target shifted right (bos first).
          encoded: from `encode`.
          train: dropout on.
          return_weights: also return the weights dict (module docstring).

        Returns:
          logits `[batch, tgt_len, tgt_vocab]` (float32), and the weights if asked.
        """
        tgt_in = check_tokens("ConvS2S.decode", tgt_in, batch=encoded.keys.shape[0])
        deterministic = not train
        g = self._embed(tgt_in, self.target_embedding, self.target_positions, None, deterministic)
        y = self.decoder_input(g)
        per_layer = {}
        for i, block in enumerate(self.decoder_blocks):
            y, w = block(
                y,
                g,
                encoded.keys,
                encoded.values,
                encoded.source_valid,
                deterministic=deterministic,
            )
            if w is not None:
                per_layer[i] = w
        logits = self._logits(y, deterministic)
        return (logits, self._weights_dict(per_layer)) if return_weights else logits

    def __call__(
        self, src: Array, tgt_in: Array, *, train: bool = False, return_weights: bool = False
    ) -> Array | tuple[Array, dict[str, Array]]:
        """`decode(tgt_in, encode(src))`."""
        encoded = self.encode(src, train=train)
        return self.decode(tgt_in, encoded, train=train, return_weights=return_weights)

    # -- incremental decoding ------------------------------------------------

    def init_cache(self, encoded: ConvS2SEncoding, max_length: int) -> None:
        """Creates the decoding state, all in `nnx.Cache` variables.

        Every decoder block gets a zero rolling buffer of its last k - 1 inputs
        (`conv_buffer`, `[batch, k-1, C_in]`); the model keeps the encoder's keys
        and values (`[batch, s, embed_dim]`), the source mask (`[batch, s]`) and a
        0-d step counter (the position of the next target token).

        Args:
          encoded: from `encode` (tiled by beam if needed).
          max_length: the most tokens `decode_step` will be called with
            (at most `config.max_length`, the learned positions' size).
        """
        if not 1 <= max_length <= self.config.max_length:
            raise ValueError(
                f"ConvS2S.init_cache: max_length must be in [1, config.max_length="
                f"{self.config.max_length}], got {max_length}"
            )
        batch = encoded.keys.shape[0]
        for block in self.decoder_blocks:
            block.init_cache(batch)
        self.cache_keys = SourceCache(encoded.keys)
        self.cache_values = SourceCache(encoded.values)
        self.cache_source_valid = SourceCache(encoded.source_valid)
        self.cache_step = nnx.Cache(jnp.array(0, jnp.int32))

    def decode_step(
        self, tokens: Array, *, return_weights: bool = False
    ) -> Array | tuple[Array, dict[str, Array]]:
        """One decoding step from the cache (no dropout): each block convolves only
        the new position with its buffered k - 1 previous inputs.

        Args:
          tokens: int `[batch, 1]`, the previous tokens (bos at the first step).
          return_weights: also return the weights dict of `decode` with t = 1.

        Returns:
          logits `[batch, tgt_vocab]` (float32), and the weights if asked.
        """
        if self.cache_step is None:
            raise ValueError("ConvS2S.decode_step: call init_cache(encoded, max_length) first")
        keys, values = self.cache_keys[...], self.cache_values[...]
        valid = self.cache_source_valid[...]
        tokens = check_tokens("ConvS2S.decode_step", tokens, batch=keys.shape[0], length=1)
        step = self.cache_step[...]
        positions = jnp.broadcast_to(step, tokens.shape)
        g = self._embed(tokens, self.target_embedding, self.target_positions, positions, True)
        y = self.decoder_input(g)
        per_layer = {}
        for i, block in enumerate(self.decoder_blocks):
            y, w = block.step(y, g, keys, values, valid)
            if w is not None:
                per_layer[i] = w
        self.cache_step[...] = step + 1
        logits = self._logits(y, True)[:, 0]
        return (logits, self._weights_dict(per_layer)) if return_weights else logits


def parameter_count(config: ConvS2SConfig) -> int:
    """Number of parameters of `ConvS2S(config)`, found without allocating it."""
    model = nnx.eval_shape(lambda: ConvS2S(config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(math.prod(leaf.shape) for leaf in leaves)
