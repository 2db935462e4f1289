"""RNN encoder-decoders with global (and local) attention: RNNsearch and Luong et al.

Bahdanau, Cho & Bengio (2014), "Neural Machine Translation by Jointly
Learning to Align and Translate" (`attention='bahdanau'`), and Luong, Pham &
Manning (2015), "Effective Approaches to Attention-based Neural Machine
Translation" (`attention='luong'`).

The model is an `RNNEncoder` (embeddings, stacked (bi)directional LSTM/GRU
layers; `attnx.models.rnn_encoder`) and one of the decoders of
`attnx.models.rnn_decoders`:

* `BahdanauDecoder`: additive attention from the PREVIOUS state s_{i-1}
  (eq. 5, 6), the context fed into the cell with the previous word (eq. 4),
  maxout deep output (A.2.2), s_0 = tanh(W_s h<-_1).
* `LuongDecoder`: stacked LSTM; attention from the CURRENT top state h_t with
  the dot / general / concat / location scores (eq. 7-9) or local-m /
  local-p (sec. 3.2), attentional hidden state h~_t = tanh(W_c [c_t; h_t])
  (eq. 5), softmax from h~_t (eq. 6), optional input feeding (sec. 3.3).

Presets (`attnx.models.rnn_config`): `rnnsearch50`, `luong_4layer`, `tiny`.

Interface (shared by the attnx seq2seq models, see attnx.decoding):
`encode(src)` -> `RNNEncoding`; `decode(tgt_in, encoded)` -> logits
`[batch, T, tgt_vocab]` (+ weights); `__call__`; `init_cache(encoded,
max_length)`; `decode_step(tokens)`. The weights dict holds
'decoder/attention' and 'alignment', both the decoder's single attention
`[batch, T, src_length]` (alpha_ij / a_t(s)), and with Luong's local-p
attention 'decoder/attention_center' `[batch, T]`, the predicted centre p_t
of each step's window (not a map: a trace keeps it as an extra and records
the window |s - p_t| <= D as the map's mask).
"""

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnx.layers.attention_memory import AttentionMemory
from attnx.layers.source_cache import SourceCache
from attnx.models.checks import check_at_least, check_tokens
from attnx.models.rnn_config import RNNConfig, luong_4layer, rnnsearch50, tiny
from attnx.models.rnn_decoders import ATTENTION, BahdanauDecoder, DecoderState, LuongDecoder
from attnx.models.rnn_encoder import RNNEncoder

# The config and presets are re-exported so that `attnx.models.rnn` is the one import users need.
__all__ = [
    "RNNConfig",
    "RNNEncoderDecoder",
    "RNNEncoding",
    "luong_4layer",
    "rnnsearch50",
    "tiny",
]

Array = jax.Array


@struct.dataclass
class RNNEncoding:
    """What `RNNEncoderDecoder.encode` returns (every leaf has a leading batch axis).

    Attributes:
      annotations: the top encoder layer's states h_j, `[batch, src_length, n_enc]`.
      mask: `[batch, src_length]` bool, True at real source tokens.
      state: the decoder's initial state: 'hidden' `[batch, layers, n]`,
        'cell' (LSTM), 'feed' (Luong input feeding, zeros).
    """

    annotations: Array
    mask: Array
    state: DecoderState


class RNNEncoderDecoder(nnx.Module):
    """An attentional RNN encoder-decoder (RNNsearch or Luong et al.), see the module docstring.

    Args:
      config: an `RNNConfig` (see `rnnsearch50`, `luong_4layer`, `tiny`).
      rngs: 'params' for initialisation; 'dropout' (or 'default') for dropout.
    """

    def __init__(self, config: RNNConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = RNNEncoder(config, rngs=rngs)
        decoder_type = BahdanauDecoder if config.variant == "bahdanau" else LuongDecoder
        self.decoder = decoder_type(config, rngs=rngs)

    def encode(self, src: Array, *, train: bool = False) -> RNNEncoding:
        """Annotations, source mask and the decoder's initial state.

        Args:
          src: int `[batch, src_length]`, 0 = padding at the end of each row.
          train: dropout on.
        """
        annotations, mask, finals = self.encoder(src, train=train)
        return RNNEncoding(annotations, mask, self.decoder.initial_state(finals))

    def decode(
        self,
        tgt_in: Array,
        encoded: RNNEncoding,
        *,
        train: bool = False,
        return_weights: bool = False,
    ) -> Array | tuple[Array, dict[str, Array]]:
        """Teacher forcing: logits for every target step given the previous words.

        Args:
          tgt_in: int `[batch, T]`, the target shifted right (bos first).
          encoded: from `encode`.
          train: dropout on.
          return_weights: also return {'decoder/attention', 'alignment'}, `[batch, T, src_length]`.

        Returns:
          logits `[batch, T, tgt_vocab]` (float32), and the weights dict if asked.
        """
        tgt_in = check_tokens("RNNEncoderDecoder.decode", tgt_in, batch=encoded.mask.shape[0])
        memory = self.decoder.prepare_memory(encoded.annotations, encoded.mask)  # hoisted
        logits, entries = self.decoder.decode(tgt_in, memory, encoded.state, train=train)
        if not return_weights:
            return logits
        return logits, {**entries, "alignment": entries[ATTENTION]}

    def __call__(
        self, src: Array, tgt_in: Array, *, train: bool = False, return_weights: bool = False
    ) -> Array | tuple[Array, dict[str, Array]]:
        """`decode(tgt_in, encode(src))`."""
        encoded = self.encode(src, train=train)
        return self.decode(tgt_in, encoded, train=train, return_weights=return_weights)

    # -- incremental decoding ------------------------------------------------

    def init_cache(self, encoded: RNNEncoding, max_length: int) -> None:
        """Holds all decoding state in `nnx.Cache` variables.

        The recurrent states (and Luong's fed-back h~), the annotations with
        their attention projection (prepared once here) and mask, and a 0-d
        step counter (local-m's p_t = t).

        Args:
          encoded: from `encode` (tiled by beam if needed).
          max_length: the longest output to decode; the state does not grow
            with it, so it is only checked.
        """
        check_at_least("RNNEncoderDecoder.init_cache", max_length=max_length)
        memory = self.decoder.prepare_memory(encoded.annotations, encoded.mask)
        self.cache_state = nnx.Dict({k: nnx.Cache(v) for k, v in encoded.state.items()})
        self.cache_keys = SourceCache(memory.keys)
        self.cache_mask = SourceCache(memory.mask)
        projected = memory.projected_keys
        self.cache_projected = SourceCache(projected) if projected is not None else nnx.data(None)
        self.cache_step = nnx.Cache(jnp.zeros((), jnp.int32))

    def decode_step(
        self, tokens: Array, *, return_weights: bool = False
    ) -> Array | tuple[Array, dict[str, Array]]:
        """One step from the cache: tokens int `[batch, 1]` (the previous words) -> logits `[batch, vocab]`.

        Evaluation mode (no dropout). The weights dict is that of `decode` with T = 1.
        """
        if not hasattr(self, "cache_step"):
            raise ValueError(
                "RNNEncoderDecoder.decode_step: call init_cache(encoded, max_length) first"
            )
        keys = self.cache_keys[...]
        tokens = check_tokens(
            "RNNEncoderDecoder.decode_step", tokens, batch=keys.shape[0], length=1
        )
        projected = None if self.cache_projected is None else self.cache_projected[...]
        # The attention modules attend over values = keys (the annotations), as both papers do.
        memory = AttentionMemory(keys, keys, self.cache_mask[...], projected)
        state = {name: variable[...] for name, variable in self.cache_state.items()}
        step = self.cache_step[...]
        logits, entries, new_state = self.decoder.step(tokens[:, 0], memory, state, step)
        for name, value in new_state.items():
            self.cache_state[name][...] = value
        self.cache_step[...] = step + 1
        if not return_weights:
            return logits
        entries = {name: value[:, None] for name, value in entries.items()}  # T = 1
        return logits, {**entries, "alignment": entries[ATTENTION]}
