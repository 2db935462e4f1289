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

from attnx.layers.attention_config import AttentionConfig, AttentionSupport
from attnx.models.checks import check_at_least, check_none_or_at_least, check_rate
from attnx.models.rnn_cells import CELL_TYPES

VARIANTS = ("bahdanau", "luong")
# What each decoder accepts as `config.model.attention`; the first score is its
# own. Bahdanau's decoder scores s_{i-1} with any score (its context goes into
# the cell); Luong's scores h_t and its global attention may be local (sec. 3.2).
ATTENTION = {
    "bahdanau": AttentionSupport(
        "rnn (variant 'bahdanau')", score=("additive", "dot", "general", "concat", "location")
    ),
    "luong": AttentionSupport(
        "rnn (variant 'luong')",
        score=("general", "dot", "concat", "location"),
        local=("none", "local_m", "local_p"),
    ),
}


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
      variant: 'bahdanau' (attention from s_{i-1}, context into the cell,
        maxout deep output) or 'luong' (attention from h_t, attentional
        hidden state, softmax from it).
      attention: the mechanism (`AttentionConfig`, `config.model.attention.*`):
        normalizer; score: 'additive' (Bahdanau eq. 6; the 'bahdanau'
        default), 'dot', 'general' (the 'luong' default), 'concat',
        'location' (Luong eq. 8, 9); local (Luong sec. 3.2, 'luong' only):
        'local_m' or 'local_p' with `window` D, the half-width (Luong: 10).
      attention_dim: n', the hidden size of the 'additive' or 'concat' score's
        MLP; None = the decoder state size.
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
    variant: str = "bahdanau"
    attention: AttentionConfig = AttentionConfig()
    attention_dim: int | None = None
    input_feeding: bool = True
    maxout_units: int = 500
    dropout_rate: float = 0.0
    max_source_length: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        def fail(message: str):
            raise ValueError(f"RNNConfig: {message}")

        check_at_least(
            "RNNConfig",
            src_vocab_size=self.src_vocab_size,
            tgt_vocab_size=self.tgt_vocab_size,
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            maxout_units=self.maxout_units,
        )
        check_none_or_at_least(
            "RNNConfig",
            decoder_hidden_dim=self.decoder_hidden_dim,
            attention_dim=self.attention_dim,
            max_source_length=self.max_source_length,
        )
        if self.cell not in CELL_TYPES:
            fail(f"cell must be one of {CELL_TYPES}, got {self.cell!r}")
        if self.variant not in VARIANTS:
            raise ValueError(
                f"config.model.variant={self.variant!r}; choose one of {list(VARIANTS)}"
            )
        check_rate("RNNConfig", dropout_rate=self.dropout_rate)
        score, local = self.mechanism.score, self.mechanism.local
        if score == "location":
            if local != "none":
                raise ValueError(
                    "config.model.attention.local needs a content score ('dot', 'general' "
                    "or 'concat'), not 'location'"
                )
            if self.max_source_length is None:
                raise ValueError(
                    "config.model.attention.score='location' needs config.model.max_source_length"
                )
        if score == "dot" and self.decoder_dim != self.encoder_output_dim:
            raise ValueError(
                f"config.model.attention.score='dot' needs the decoder state "
                f"(config.model.decoder_hidden_dim={self.decoder_dim}) as large as the "
                f"encoder output ({self.encoder_output_dim} = hidden_dim x directions)"
            )
        if self.variant == "bahdanau":
            if self.decoder_layers != 1:
                fail(
                    f"the 'bahdanau' decoder has one layer, got decoder_layers={self.decoder_layers}"
                )
            return
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
    def mechanism(self) -> AttentionConfig:
        """`attention` with the decoder's own choices where it left them open (the score)."""
        return ATTENTION[self.variant].resolve(self.attention)

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
        return self.hidden_dim if self.variant == "bahdanau" else self.encoder_output_dim


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
        variant="bahdanau",
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
        variant="luong",
        attention=AttentionConfig(score="general", local="local_p", window=10),
        input_feeding=True,
        dropout_rate=0.2,
    )
    return dataclasses.replace(base, **overrides)


def small(**overrides: Any) -> RNNConfig:
    """RNNsearch for the bundled tasks on a few CPU cores: bidirectional GRU encoder of
    128 per direction, embeddings 64, alignment MLP 128, maxout 128, and a decoder
    of 256 = the annotations' size, so that every score (the 'dot' one too) applies."""
    base = RNNConfig(
        cell="gru",
        embed_dim=64,
        hidden_dim=128,
        bidirectional=True,
        decoder_hidden_dim=256,
        variant="bahdanau",
        attention_dim=128,
        maxout_units=128,
    )
    return dataclasses.replace(base, **overrides)


def tiny(**overrides: Any) -> RNNConfig:
    """A test-sized Bahdanau model (vocab 11, width 16); override `variant` etc. for Luong."""
    base = RNNConfig(
        src_vocab_size=11,
        tgt_vocab_size=11,
        cell="gru",
        embed_dim=16,
        hidden_dim=16,
        attention_dim=16,
        maxout_units=8,
    )
    return dataclasses.replace(base, **overrides)
