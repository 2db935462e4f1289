"""Configuration and presets of ConvS2S (`attnx.models.convs2s`).

Gehring, Auli, Grangier, Yarats & Dauphin (2017), "Convolutional Sequence to
Sequence Learning". The presets reproduce the layouts of sec. 5.1 for WMT'16
English-Romanian, WMT'14 English-German and WMT'14 English-French, with the
sizes of sec. 4.3 ("512 hidden units ... all embeddings, including the output
produced by the decoder before the final linear layer, have dimensionality
512"). `fairseq=True` switches a preset to the authors' released fairseq
architecture of the same name (`fconv_wmt_en_ro`, `fconv_wmt_en_de`,
`fconv_wmt_en_fr`), which differs from the paper's text as each preset notes.
`tiny` is test-sized, `cpu_small` the "convs2s cpu-small" benchmark setting of
/work/shared/peers/README.md. Every preset takes keyword overrides.

A stack layout is a tuple of `(channels, kernel_width)` per GLU block, as in
fairseq's `--encoder-layers '[(512, 3)] * 9 + ...'`.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from attnx.layers.attention_config import AttentionConfig, AttentionSupport
from attnx.models.checks import check_at_least, check_none_or_at_least, check_rate

# What ConvS2S accepts as `config.model.attention`; the first score and
# positions are the paper's (d_i . z_j unscaled, sec. 3.3; learned positions, sec. 3.1).
ATTENTION = AttentionSupport(
    "convs2s",
    score=("dot", "scaled_dot"),
    positions=("learned", "sinusoidal", "none"),
)

SCALINGS = ("paper", "fairseq")

Layout = tuple[tuple[int, int], ...]


def _layout(*groups: tuple[int, int, int]) -> Layout:
    """(count, channels, kernel_width) groups -> one (channels, kernel_width) per block."""
    return tuple((channels, width) for count, channels, width in groups for _ in range(count))


@dataclasses.dataclass(frozen=True)
class ConvS2SConfig:
    """Sizes and options of a `ConvS2S` model.

    Attributes:
      src_vocab_size: source vocabulary (pad=0, bos=1, eos=2, unk=3 included).
      tgt_vocab_size: target vocabulary; None = `src_vocab_size`.
      embed_dim: f, size of the token and position embeddings of both sides,
        of the encoder outputs z_j and of the attention's d_i (sec. 3.1, 3.3;
        the attention needs one size for both sides).
      encoder_layers / decoder_layers: `(channels, kernel_width)` of every GLU
        block (sec. 3.2). A block whose channels differ from its input's gets
        a linear residual projection (fairseq's `projections`).
      decoder_out_embed_dim: size of the decoder's output before the vocabulary
        projection (sec. 3.1, "output produced by the decoder before the final
        linear layer"); None = `embed_dim`.
      attention: the mechanism of every `MultiStepAttention` (`AttentionConfig`,
        `config.model.attention.*`): normalizer; score 'dot' (the paper) or
        'scaled_dot' (d_i . z_j / sqrt(embed_dim)); positions of both sides'
        embeddings: 'learned' (the paper), 'sinusoidal' or 'none'.
      attention_layers: which decoder blocks have a `MultiStepAttention`: True =
        all (the paper, sec. 3.3), a tuple of booleans (one per decoder block,
        fairseq's `--decoder-attention`) or a tuple of block indices.
      dropout_rate: on the embeddings, on every conv block's input, and on the
        decoder output before the vocabulary projection (sec. 4.3). Also enters
        the initialisation (sec. 3.5).
      max_length: positions covered by the learned position tables (fairseq's
        `max_positions`, 1024); also caps `init_cache` lengths.
      scaling: 'paper' = the equations of sec. 3.3: d_i = W_d h_i + b_d + g_i and
        values z_j + e_j; 'fairseq' = the released code, which multiplies both by
        sqrt(0.5). Either way the context is scaled by sqrt(m) and block outputs
        by sqrt(0.5) (sec. 3.4).
      weight_norm: weight normalisation (Salimans & Kingma 2016) of every conv
        and linear layer of the encoder and decoder (sec. 3.4). The attention's
        own two projections are plain (see `attnx.layers.multi_step`).
      scale_encoder_gradients: multiply the gradient reaching the encoder output
        z by 1 / (2 x number of attention layers) (sec. 3.4; fairseq's
        `GradMultiply`). The forward pass is unchanged.
      sow_weights: every attention layer sows its weights into `nnx.Intermediate`.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    src_vocab_size: int = 40000
    tgt_vocab_size: int | None = None
    embed_dim: int = 512
    encoder_layers: Layout = _layout((20, 512, 3))
    decoder_layers: Layout = _layout((20, 512, 3))
    decoder_out_embed_dim: int | None = None
    attention: AttentionConfig = AttentionConfig()
    attention_layers: bool | tuple[int, ...] | tuple[bool, ...] = True
    dropout_rate: float = 0.1
    max_length: int = 1024
    scaling: str = "paper"
    weight_norm: bool = True
    scale_encoder_gradients: bool = True
    sow_weights: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self.mechanism  # noqa: B018  (refuses what ConvS2S cannot do, naming the key)
        # Lists from a command line or ConfigDict become hashable tuples.
        for name in ("encoder_layers", "decoder_layers"):
            object.__setattr__(self, name, _check_layout(name, getattr(self, name)))
        if not isinstance(self.attention_layers, bool):
            object.__setattr__(self, "attention_layers", tuple(self.attention_layers))
        check_at_least(
            "ConvS2SConfig",
            src_vocab_size=self.src_vocab_size,
            embed_dim=self.embed_dim,
            max_length=self.max_length,
        )
        check_none_or_at_least(
            "ConvS2SConfig",
            tgt_vocab_size=self.tgt_vocab_size,
            decoder_out_embed_dim=self.decoder_out_embed_dim,
        )
        check_rate("ConvS2SConfig", dropout_rate=self.dropout_rate)
        if self.scaling not in SCALINGS:
            raise ValueError(
                f"ConvS2SConfig: scaling must be one of {SCALINGS}, got {self.scaling!r}"
            )
        if not any(self.attention_flags):
            raise ValueError(
                "ConvS2SConfig: attention_layers selects no decoder block; the decoder "
                "needs at least one attention to see the source"
            )

    @property
    def mechanism(self) -> AttentionConfig:
        """`attention` with the paper's choices where it left them open (score, positions)."""
        return ATTENTION.resolve(self.attention)

    @property
    def target_vocab_size(self) -> int:
        """The target (and output) vocabulary size."""
        return self.src_vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size

    @property
    def output_embed_dim(self) -> int:
        """Size of the decoder output before the vocabulary projection."""
        return self.embed_dim if self.decoder_out_embed_dim is None else self.decoder_out_embed_dim

    @property
    def attention_flags(self) -> tuple[bool, ...]:
        """One boolean per decoder block: does it have an attention?"""
        n = len(self.decoder_layers)
        chosen = self.attention_layers
        if isinstance(chosen, bool):
            return (chosen,) * n
        if all(isinstance(c, bool) for c in chosen):
            if len(chosen) != n:
                raise ValueError(
                    f"ConvS2SConfig: attention_layers has {len(chosen)} booleans for {n} "
                    "decoder blocks"
                )
            return tuple(chosen)
        for index in chosen:
            if isinstance(index, bool) or not 0 <= int(index) < n:
                raise ValueError(
                    f"ConvS2SConfig: attention_layers {chosen} must be all booleans or all "
                    f"block indices in [0, {n})"
                )
        return tuple(i in set(chosen) for i in range(n))

    @property
    def num_attention_layers(self) -> int:
        """Number of decoder blocks with an attention."""
        return sum(self.attention_flags)


def _check_layout(name: str, layout: Sequence[Sequence[int]]) -> Layout:
    layout = tuple(tuple(int(v) for v in block) for block in layout)
    if not layout:
        raise ValueError(f"ConvS2SConfig: {name} must list at least one block")
    for block in layout:
        if len(block) != 2 or block[0] < 1 or block[1] < 1:
            raise ValueError(
                f"ConvS2SConfig: every entry of {name} must be (channels >= 1, kernel_width >= 1), "
                f"got {block}"
            )
    return layout


def _preset(fields: dict, vocab_size: int, overrides: dict) -> ConvS2SConfig:
    return ConvS2SConfig(**{"src_vocab_size": vocab_size, **fields, **overrides})


def convs2s_wmt16_en_ro(
    vocab_size: int = 40000, *, fairseq: bool = False, **overrides: Any
) -> ConvS2SConfig:
    """WMT'16 English-Romanian (sec. 5.1): 20 encoder and 20 decoder blocks of
    512 channels, kernel width 3, embeddings 512; dropout 0.2.

    fairseq's `fconv_wmt_en_ro` has the same layout; the two differ only in the
    attention scaling (`scaling='fairseq'` when `fairseq=True`).
    """
    fields = dict(
        embed_dim=512,
        encoder_layers=_layout((20, 512, 3)),
        decoder_layers=_layout((20, 512, 3)),
        decoder_out_embed_dim=512,
        dropout_rate=0.2,
        scaling="fairseq" if fairseq else "paper",
    )
    return _preset(fields, vocab_size, overrides)


def convs2s_wmt14_en_de(
    vocab_size: int = 40000, *, fairseq: bool = False, **overrides: Any
) -> ConvS2SConfig:
    """WMT'14 English-German (sec. 5.1): 15 encoder and 15 decoder blocks, 512
    channels in the first ten and 768 in the next three (kernel width 3), then
    two blocks of 2048 channels with kernel width 1 ("linear mappings with a
    single input"); embeddings 512 (sec. 4.3); dropout 0.2; 40K joint BPE types.

    fairseq's `fconv_wmt_en_de` (`fairseq=True`) differs: nine blocks of 512,
    four of 1024 (kernel 3), two of 2048 (kernel 1); embeddings 768, decoder
    output 512; and its attention scaling (`scaling='fairseq'`).
    """
    if fairseq:
        layout = _layout((9, 512, 3), (4, 1024, 3), (2, 2048, 1))
        embed_dim, scaling = 768, "fairseq"
    else:
        layout = _layout((10, 512, 3), (3, 768, 3), (2, 2048, 1))
        embed_dim, scaling = 512, "paper"
    fields = dict(
        embed_dim=embed_dim,
        encoder_layers=layout,
        decoder_layers=layout,
        decoder_out_embed_dim=512,
        dropout_rate=0.2,
        scaling=scaling,
    )
    return _preset(fields, vocab_size, overrides)


def convs2s_wmt14_en_fr(
    vocab_size: int = 40000, *, fairseq: bool = False, **overrides: Any
) -> ConvS2SConfig:
    """WMT'14 English-French (sec. 5.1): 512 channels in the first five blocks,
    768 in the next four, 1024 in the next three (kernel width 3), then one
    block of 2048 and one of 4096 channels with kernel width 1; embeddings 512
    (sec. 4.3); dropout 0.1; 40K BPE types.

    The paper's text announces 15 layers but its list adds up to 14 (5 + 4 + 3
    + 2); this preset follows the list. fairseq's `fconv_wmt_en_fr`
    (`fairseq=True`) has six blocks of 512, making 15, embeddings 768, decoder
    output 512, and its attention scaling (`scaling='fairseq'`).
    """
    first = 6 if fairseq else 5
    layout = _layout((first, 512, 3), (4, 768, 3), (3, 1024, 3), (1, 2048, 1), (1, 4096, 1))
    fields = dict(
        embed_dim=768 if fairseq else 512,
        encoder_layers=layout,
        decoder_layers=layout,
        decoder_out_embed_dim=512,
        dropout_rate=0.1,
        scaling="fairseq" if fairseq else "paper",
    )
    return _preset(fields, vocab_size, overrides)


def cpu_small(vocab_size: int = 8000, **overrides: Any) -> ConvS2SConfig:
    """The "convs2s cpu-small" benchmark setting (/work/shared/peers/README.md):
    embeddings 256, four encoder and three decoder GLU blocks of 256 channels
    with kernel width 3, attention in every decoder block, dropout 0.1, lengths
    up to 64. The PyTorch peer scales as fairseq does (`scaling='fairseq'`) and
    has no weight normalisation: pass `weight_norm=False` for identical
    parameter shapes (weight norm adds one gain per output unit).
    """
    fields = dict(
        embed_dim=256,
        encoder_layers=_layout((4, 256, 3)),
        decoder_layers=_layout((3, 256, 3)),
        decoder_out_embed_dim=256,
        dropout_rate=0.1,
        max_length=64,
        scaling="fairseq",
    )
    return _preset(fields, vocab_size, overrides)


def small(vocab_size: int = 11, **overrides: Any) -> ConvS2SConfig:
    """ConvS2S for the bundled tasks on a few CPU cores: embeddings 128, encoder
    (128, 3) x 6, decoder (128, 3) x 4, dropout 0.1, the paper's scaling, lengths up to 128."""
    fields = dict(
        embed_dim=128,
        encoder_layers=_layout((6, 128, 3)),
        decoder_layers=_layout((4, 128, 3)),
        dropout_rate=0.1,
        max_length=128,
    )
    return _preset(fields, vocab_size, overrides)


def tiny(vocab_size: int = 11, **overrides: Any) -> ConvS2SConfig:
    """A test-sized model: embeddings 16, encoder (16, 3) x 2, decoder (16, 3) x 2, no dropout."""
    fields = dict(
        embed_dim=16,
        encoder_layers=_layout((2, 16, 3)),
        decoder_layers=_layout((2, 16, 3)),
        dropout_rate=0.0,
        max_length=16,
    )
    return _preset(fields, vocab_size, overrides)
