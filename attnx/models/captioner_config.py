"""Configuration and presets of the Show, Attend and Tell captioner (`attnx.models.captioner`).

Xu et al. (2015), "Show, Attend and Tell". `digits_small` is the bundled
64 x 64 digit-captioning task (the benchmarks' spatial cpu-small setting),
`coco_vgg` / `coco_features` the paper's VGG-19 14 x 14 x 512 setting, and
`tiny` a test-sized model. Every preset takes keyword overrides.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from attnx.layers.attention_config import AttentionConfig, AttentionSupport
from attnx.models.checks import check_at_least, check_probability, check_rate
from attnx.models.image_encoders import CONV_IMPLEMENTATIONS, DIGITS_BLOCKS, VGG19_BLOCKS

# What the captioner accepts as `config.model.attention`: the f_att MLP score
# (eq. 4), soft or hard attention (sec. 4.1, 4.2), and the gate beta (sec. 4.2.1).
ATTENTION = AttentionSupport("captioner", score=("additive",), kind=("soft", "hard"), gate=True)


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
    """Sizes and options of a `Captioner`.

    Attributes:
      vocab_size: output vocabulary (pad=0, bos=1, eos=2, unk=3 included).
      encoder: 'conv' (a `ConvEncoder` on images) or 'features' (precomputed maps).
      image_channels: channels of the input image ('conv').
      conv_blocks: channels per convolution, grouped by block ('conv').
      pool_last_block: max-pool after the last conv block ('conv').
      conv_implementation: 'xla', 'patches' or None (the backend's faster;
        `attnx.models.image_encoders.resolve_conv_implementation`).
      coord_channels: give the 'conv' encoder each pixel's row and column as
        two more input channels (CoordConv), so that annotation vectors know
        where they are; not in the paper, needed where captions have a
        reading order (`attnx.models.image_encoders`).
      feature_dim: C of precomputed features ('features'; ignored otherwise).
      embed_dim: m, word embedding size (also the deep output size, eq. 7).
      hidden_dim: n, LSTM size.
      attention_dim: hidden size of the f_att MLP.
      init_hidden_layers: ReLU layers (C -> C) before the tanh layers f_init,{h,c}.
      deep_output_tanh: tanh on E y + L_h h + L_z z before L_o (the authors' code;
        eq. 7 has none).
      attention: the mechanism (`AttentionConfig`, `config.model.attention.*`):
        kind 'soft' (sec. 4.2) or 'hard' (sec. 4.1); gate: beta_t (sec. 4.2.1;
        default on); normalizer of alpha_t ('softmax' in the paper, or
        'sparsemax' / 'entmax15'; hard attention samples from it).
      hard_eval: with hard attention, what evaluation uses: 'expectation' or 'argmax'.
      hard_expectation_prob: per-image probability of training with the
        expectation instead of a sample (sec. 4.1: 0.5).
      dropout_rate: after the init MLP's hidden layers, on h_t before L_h and on
        the deep output before L_o (where the authors' code drops out).
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    vocab_size: int = 16
    encoder: str = "conv"
    image_channels: int = 1
    conv_blocks: tuple[tuple[int, ...], ...] = DIGITS_BLOCKS
    pool_last_block: bool = True
    conv_implementation: str | None = None
    coord_channels: bool = False
    feature_dim: int | None = None
    embed_dim: int = 128
    hidden_dim: int = 256
    attention_dim: int = 256
    init_hidden_layers: int = 0
    deep_output_tanh: bool = False
    attention: AttentionConfig = AttentionConfig()
    hard_eval: str = "expectation"
    hard_expectation_prob: float = 0.5
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        check_at_least(
            "CaptionerConfig",
            vocab_size=self.vocab_size,
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            attention_dim=self.attention_dim,
        )
        if self.encoder not in ("conv", "features"):
            raise ValueError(
                f"CaptionerConfig: encoder must be 'conv' or 'features', got {self.encoder!r}"
            )
        if self.encoder == "features" and (self.feature_dim is None or self.feature_dim < 1):
            raise ValueError("CaptionerConfig: encoder='features' needs feature_dim >= 1")
        if self.encoder == "features" and self.coord_channels:
            raise ValueError(
                "CaptionerConfig: coord_channels adds channels to the image of the 'conv' "
                "encoder; precomputed features (encoder='features') have no image"
            )
        self.mechanism  # noqa: B018  (refuses what the captioner cannot do, naming the key)
        if self.hard_eval not in ("expectation", "argmax"):
            raise ValueError(
                f"CaptionerConfig: hard_eval must be 'expectation' or 'argmax', got {self.hard_eval!r}"
            )
        check_probability("CaptionerConfig", hard_expectation_prob=self.hard_expectation_prob)
        check_rate("CaptionerConfig", dropout_rate=self.dropout_rate)
        if self.conv_implementation not in (None, *CONV_IMPLEMENTATIONS):
            raise ValueError(
                f"CaptionerConfig: conv_implementation must be one of {CONV_IMPLEMENTATIONS} "
                f"or None, got {self.conv_implementation!r}"
            )
        check_at_least("CaptionerConfig", minimum=0, init_hidden_layers=self.init_hidden_layers)

    @property
    def annotation_dim(self) -> int:
        """C, the channels of each annotation vector a_i."""
        if self.encoder == "features":
            return self.feature_dim
        return self.conv_blocks[-1][-1]

    @property
    def mechanism(self) -> AttentionConfig:
        """`attention` with the paper's choices where it left them open (the gate on)."""
        return ATTENTION.resolve(self.attention)


def digits_small(**overrides: Any) -> CaptionerConfig:
    """The bundled `digit_captions` task (64 x 64 x 1 -> 8 x 8 x 128 grid), the benchmarks' cpu-small."""
    return dataclasses.replace(CaptionerConfig(), **overrides)


def coco_vgg(**overrides: Any) -> CaptionerConfig:
    """The paper's setting: VGG-19 conv5_4 14 x 14 x 512 annotations of a 224 x 224 x 3 image.

    The paper (sec. 5.1) fixes the vocabulary at 10,000 words; the other sizes
    are not in the paper but in the authors' released defaults "to more or
    less reproduce the soft alignment model for MS COCO"
    (github.com/kelvinxu/arctic-captions, evaluate_coco.py): LSTM 1800,
    embeddings 512, ctx 512, a 2-layer f_init (n_layers_init=2), dropout 0.5,
    doubly stochastic lambda 1 (alpha_c), and capgen.py's tanh deep output.
    Not reproduced: their extra tanh layer on the attention's feature side
    (n_layers_att=2); attention_dim = 512 = ctx_dim as in their code.
    """
    base = CaptionerConfig(
        vocab_size=10000,
        encoder="conv",
        image_channels=3,
        conv_blocks=VGG19_BLOCKS,
        pool_last_block=False,
        embed_dim=512,
        hidden_dim=1800,
        attention_dim=512,
        init_hidden_layers=1,
        deep_output_tanh=True,
        dropout_rate=0.5,
    )
    return dataclasses.replace(base, **overrides)


def coco_features(**overrides: Any) -> CaptionerConfig:
    """`coco_vgg` on precomputed 14 x 14 x 512 VGG features (how the authors trained)."""
    return coco_vgg(encoder="features", feature_dim=512, **overrides)


def tiny(**overrides: Any) -> CaptionerConfig:
    """A test-sized model: 16 x 16 x 1 images -> a 4 x 4 x 8 grid, vocab 11."""
    base = CaptionerConfig(
        vocab_size=11,
        conv_blocks=((4,), (8,)),
        embed_dim=16,
        hidden_dim=32,
        attention_dim=16,
    )
    return dataclasses.replace(base, **overrides)
