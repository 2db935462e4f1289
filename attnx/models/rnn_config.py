"""Configuration and presets of the RNN encoder-decoders (`attnx.models.rnn`).

`rnnsearch50` is RNNsearch-50 of Bahdanau, Cho & Bengio (2014), "Neural
Machine Translation by Jointly Learning to Align and Translate" (sec. 4.2,
appendix A.2); `luong_4layer` the best single model of Luong, Pham & Manning
(2015), "Effective Approaches to Attention-based Neural Machine Translation"
(sec. 4.1, Table 1); `tiny` a test-sized model. Every preset takes keyword
overrides.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from attnx.layers.luong_attention import LOCAL_MODES, LUONG_SCORES
from attnx.models.rnn_cells import CELL_TYPES

ATTENTION_TYPES = ("bahdanau", "luong")


@dataclasses.dataclass(frozen=True)
class RNNConfig:
    """Sizes and options of an `RNNEncoderDecoder`.

    Attributes:
      src_vocab_size: source vocabulary (pad=0, bos=1, eos=2, unk=3 included).
      tgt_vocab_size: target vocabulary.
      cell: 'lstm' or 'gru', for the encoder and the decoder.
      embed_dim: word embedding size m, both sides.
      hidden_dim: encoder state size per direction n.
      encoder_layers: stacked encoder layers (each bidirectional if asked).
      bidirectional: forward and backward encoder RNNs whose states are
        concatenated, h_j = [h->_j; h<-_j] (Bahdanau A.1.2).
      reverse_source: the encoder reads each source sentence backwards
        (Sutskever et al. 2014; Luong's "reverse"). The memory is put back
        in source order, so alignments and local-m's p_t = t refer to source
        positions.
      decoder_hidden_dim: decoder state size; None = `hidden_dim` for
        'bahdanau' and the encoder output size (`hidden_dim` x directions)
        for 'luong', whose decoder starts from the encoder's final states.
      decoder_layers: stacked decoder layers (1 for 'bahdanau').
      attention: 'bahdanau' (additive score from s_{i-1}, context into the
        cell, maxout deep output) or 'luong' (score from h_t, attentional
        hidden state, softmax from it).
      attention_dim: n', the hidden size of Bahdanau's alignment MLP or of
        Luong's 'concat' score; None = the decoder state size.
      luong_score: 'dot', 'general', 'concat' or 'location' (Luong eq. 8, 9).
      local_mode: None (global attention), 'local-m' or 'local-p' (Luong sec. 3.2).
      window: D, the half-width of the local window (Luong: 10).
      input_feeding: feed h~_{t-1} into the first decoder layer (Luong sec. 3.3).
      maxout_units: l, units of Bahdanau's maxout deep output (A.2.2).
      dropout_rate: between stacked layers (encoder and decoder), and on the
        last hidden layer before the softmax (Zaremba et al. 2014).
      max_source_length: longest source the 'location' score covers.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    src_vocab_size: int = 16
    tgt_vocab_size: int = 16
    cell: str = "lstm"
    embed_dim: int = 32
    hidden_dim: int = 32
    encoder_layers: int = 1
    bidirectional: bool = True
    reverse_source: bool = False
    decoder_hidden_dim: int | None = None
    decoder_layers: int = 1
    attention: str = "bahdanau"
    attention_dim: int | None = None
    luong_score: str = "general"
    local_mode: str | None = None
    window: int = 10
    input_feeding: bool = True
    maxout_units: int = 500
    dropout_rate: float = 0.0
    max_source_length: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        def fail(message: str):
            raise ValueError(f"RNNConfig: {message}")

        for name in (
            "src_vocab_size",
            "tgt_vocab_size",
            "embed_dim",
            "hidden_dim",
            "encoder_layers",
            "decoder_layers",
            "maxout_units",
        ):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("decoder_hidden_dim", "attention_dim", "max_source_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                fail(f"{name} must be None or >= 1, got {value}")
        if self.cell not in CELL_TYPES:
            fail(f"cell must be one of {CELL_TYPES}, got {self.cell!r}")
        if self.attention not in ATTENTION_TYPES:
            fail(f"attention must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            fail(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.attention == "bahdanau":
            if self.decoder_layers != 1:
                fail(
                    f"the 'bahdanau' decoder has one layer, got decoder_layers={self.decoder_layers}"
                )
            return
        if self.luong_score not in LUONG_SCORES:
            fail(f"luong_score must be one of {LUONG_SCORES}, got {self.luong_score!r}")
        if self.local_mode is not None and self.local_mode not in LOCAL_MODES:
            fail(f"local_mode must be None or one of {LOCAL_MODES}, got {self.local_mode!r}")
        if self.local_mode is not None and self.luong_score == "location":
            fail("local attention needs a content score ('dot', 'general' or 'concat')")
        if self.local_mode == "local-p" and self.window < 1:
            fail(f"local-p needs window >= 1, got {self.window}")
        if self.local_mode == "local-m" and self.window < 0:
            fail(f"local-m needs window >= 0, got {self.window}")
        if self.luong_score == "location" and self.max_source_length is None:
            fail("luong_score='location' needs max_source_length")
        if self.luong_score == "dot" and self.decoder_dim != self.encoder_output_dim:
            fail(
                f"luong_score='dot' needs decoder_hidden_dim == encoder output size "
                f"{self.encoder_output_dim}, got {self.decoder_dim}"
            )
        # Luong's decoder starts from the encoder's final states, layer by layer.
        if self.decoder_layers != self.encoder_layers:
            fail(
                f"the 'luong' decoder starts from the encoder's final states, so "
                f"decoder_layers ({self.decoder_layers}) must equal encoder_layers "
                f"({self.encoder_layers})"
            )
        if self.decoder_dim != self.encoder_output_dim:
            fail(
                f"the 'luong' decoder starts from the encoder's final states, so "
                f"decoder_hidden_dim ({self.decoder_dim}) must be hidden_dim x directions "
                f"({self.encoder_output_dim})"
            )

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def encoder_output_dim(self) -> int:
        """Size of the annotations h_j: `hidden_dim` x directions."""
        return self.hidden_dim * self.directions

    @property
    def decoder_dim(self) -> int:
        """The decoder state size (`decoder_hidden_dim` resolved)."""
        if self.decoder_hidden_dim is not None:
            return self.decoder_hidden_dim
        return self.hidden_dim if self.attention == "bahdanau" else self.encoder_output_dim


def rnnsearch50(**overrides: Any) -> RNNConfig:
    """RNNsearch-50 (Bahdanau et al. 2014, sec. 4.2 and appendix A.2.1-A.2.2).

    30,000-word vocabularies on each side, a bidirectional GRU encoder with
    n = 1000 units per direction, word embeddings m = 620, a GRU decoder with
    n = 1000 units, an alignment MLP with n' = 1000 hidden units and a maxout
    deep output with l = 500 units. "-50": the model was trained on sentence
    pairs of up to 50 words; that is a data filter, not a model size.
    """
    base = RNNConfig(
        src_vocab_size=30000,
        tgt_vocab_size=30000,
        cell="gru",
        embed_dim=620,
        hidden_dim=1000,
        encoder_layers=1,
        bidirectional=True,
        decoder_hidden_dim=1000,
        decoder_layers=1,
        attention="bahdanau",
        attention_dim=1000,
        maxout_units=500,
    )
    return dataclasses.replace(base, **overrides)


def luong_4layer(**overrides: Any) -> RNNConfig:
    """Luong et al. (2015), their best single model (sec. 4.1, Table 1).

    Stacking LSTMs of 4 layers with 1000 cells and 1000-dimensional
    embeddings, vocabularies of the 50,000 most frequent words per language,
    source reversed, dropout 0.2, input feeding, and local-p attention with
    the 'general' score and D = 10 ("Base + reverse + dropout + local-p
    (general) + feed input").
    """
    base = RNNConfig(
        src_vocab_size=50000,
        tgt_vocab_size=50000,
        cell="lstm",
        embed_dim=1000,
        hidden_dim=1000,
        encoder_layers=4,
        bidirectional=False,
        reverse_source=True,
        decoder_layers=4,
        attention="luong",
        luong_score="general",
        local_mode="local-p",
        window=10,
        input_feeding=True,
        dropout_rate=0.2,
    )
    return dataclasses.replace(base, **overrides)


def tiny(**overrides: Any) -> RNNConfig:
    """A test-sized Bahdanau model (vocab 11, width 16); override `attention` etc. for Luong."""
    base = RNNConfig(
        src_vocab_size=11,
        tgt_vocab_size=11,
        cell="gru",
        embed_dim=16,
        hidden_dim=16,
        attention_dim=16,
        maxout_units=8,
        window=2,
    )
    return dataclasses.replace(base, **overrides)
