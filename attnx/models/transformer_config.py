"""Configuration and presets of the Transformer (`attnx.models.transformer`).

Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser & Polosukhin (2017),
"Attention Is All You Need". `transformer_base` and `transformer_big` are the
two models of the paper's Table 3 (rows "base" and "big"), `tiny` a test-sized
model. Every preset takes keyword overrides.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from attnx.layers.attention_config import AttentionConfig, AttentionSupport
from attnx.models.checks import check_at_least, check_none_or_at_least, check_rate

# What the Transformer accepts as `config.model.attention` (the first score and
# positions are its defaults: the paper's).
ATTENTION = AttentionSupport(
    "transformer",
    score=("scaled_dot", "dot"),
    positions=("sinusoidal", "learned", "rotary", "t5_relative", "shaw_relative", "none"),
    local=("none", "local_m"),
    implementation=(None, "reference", "xla", "cudnn", "chunked", "splash"),
    num_kv_heads=True,
    dropout=True,
)
# Relative position buckets: T5's (Raffel et al. 2020, sec. 2.1) and Shaw et al.'s
# clipping distance k (2018, sec. 3.2: k >= 2 was as good as k = 16).
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128
SHAW_MAX_DISTANCE = 16


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of a `Transformer`.

    Attributes:
      src_vocab_size: source vocabulary (pad=0, bos=1, eos=2, unk=3 included).
      tgt_vocab_size: target vocabulary; None = `src_vocab_size`.
      d_model: model width (sec. 3.1).
      num_heads: h, attention heads (sec. 3.2.2).
      d_ff: inner size of the position-wise feed-forward network (eq. 2).
      num_encoder_layers / num_decoder_layers: N (sec. 3.1).
      dropout_rate: P_drop, residual dropout on every sub-layer output before
        the residual add and on the sums of embeddings and positions (sec. 5.4).
      relu_dropout_rate: dropout on the ReLU output inside the feed-forward
        network (tensor2tensor's `relu_dropout`).
      label_smoothing: eps_ls of sec. 5.4. The model does not read it: the
        training loss does (it belongs with the model's published settings).
      pre_ln: False = post-LN as in the paper, LayerNorm(x + Sublayer(x))
        (sec. 3.1); True = pre-LN, x + Sublayer(LayerNorm(x)) with a final
        LayerNorm after each stack (Xiong et al. 2020).
      share_embeddings: one embedding matrix for source and target tokens
        (sec. 3.4; needs equal vocabularies).
      tie_output: the pre-softmax projection is the target embedding
        transposed (sec. 3.4); otherwise a separate dense layer with a bias.
      attention: the mechanism of every attention (`AttentionConfig`, keys
        `config.model.attention.*`): normalizer; score 'scaled_dot' (eq. 1)
        or 'dot'; positions 'sinusoidal' (sec. 3.5), 'learned' (a trained
        table per stack, Table 3 row (E)), 'rotary' (queries and keys of the
        self-attentions), 't5_relative' / 'shaw_relative' (a learned bias per
        stack on the self-attention logits), 'none'; local 'local_m' with
        `window` D: self-attention within D positions (the decoder's: the D
        before); implementation; num_kv_heads (grouped-query attention,
        Ainslie et al. 2023; None = num_heads, the paper); dropout_rate on
        the weights (tensor2tensor's `attention_dropout`, not in the paper).
      max_length: longest sequence the learned positions cover (also the
        default cap on `init_cache` lengths with learned positions).
      use_bias: biases on the attention projections (the paper's parameter
        counts include them).
      layer_norm_epsilon: epsilon of every LayerNorm.
      sow_weights: every attention layer sows its weights into `nnx.Intermediate`.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    src_vocab_size: int = 37000
    tgt_vocab_size: int | None = None
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout_rate: float = 0.1
    relu_dropout_rate: float = 0.0
    label_smoothing: float = 0.1
    pre_ln: bool = False
    share_embeddings: bool = True
    tie_output: bool = True
    attention: AttentionConfig = AttentionConfig()
    max_length: int = 256
    use_bias: bool = True
    layer_norm_epsilon: float = 1e-6
    sow_weights: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        check_at_least(
            "TransformerConfig",
            src_vocab_size=self.src_vocab_size,
            d_model=self.d_model,
            num_heads=self.num_heads,
            d_ff=self.d_ff,
            max_length=self.max_length,
            num_encoder_layers=self.num_encoder_layers,
            num_decoder_layers=self.num_decoder_layers,
        )
        check_none_or_at_least("TransformerConfig", tgt_vocab_size=self.tgt_vocab_size)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerConfig: d_model={self.d_model} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        a = self.mechanism
        num_kv_heads = a.num_kv_heads
        if num_kv_heads is not None and self.num_heads % num_kv_heads:
            raise ValueError(
                f"config.model.attention.num_kv_heads={num_kv_heads} must divide "
                f"config.model.num_heads={self.num_heads}"
            )
        check_rate(
            "TransformerConfig",
            dropout_rate=self.dropout_rate,
            relu_dropout_rate=self.relu_dropout_rate,
            label_smoothing=self.label_smoothing,
        )
        if a.positions == "rotary" and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                "config.model.attention.positions='rotary' rotates pairs of features: the "
                f"head size d_model / num_heads = {self.d_model // self.num_heads} must be even"
            )
        if a.positions in ("t5_relative", "shaw_relative") and a.implementation in (
            "splash",
            "cudnn",
        ):
            raise ValueError(
                f"config.model.attention.positions={a.positions!r} adds a bias to the logits, "
                f"which implementation={a.implementation!r} cannot take; use None, "
                "'reference', 'xla' or 'chunked'"
            )
        if self.share_embeddings and self.target_vocab_size != self.src_vocab_size:
            raise ValueError(
                "TransformerConfig: share_embeddings needs src_vocab_size == tgt_vocab_size, "
                f"got {self.src_vocab_size} and {self.tgt_vocab_size}"
            )

    @property
    def mechanism(self) -> AttentionConfig:
        """`attention` with the paper's choices where it left them open (score, positions)."""
        return ATTENTION.resolve(self.attention)

    @property
    def target_vocab_size(self) -> int:
        """The target (and output) vocabulary size."""
        return self.src_vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size


def transformer_base(vocab_size: int = 37000, **overrides: Any) -> TransformerConfig:
    """Transformer (base model), Table 3: N=6, d_model=512, d_ff=2048, h=8,
    P_drop=0.1, eps_ls=0.1; shared source/target vocabulary and tied embeddings
    (37000 BPE tokens for WMT'14 English-German, sec. 5.1). About 65M parameters.
    """
    fields = dict(
        src_vocab_size=vocab_size,
        d_model=512,
        num_heads=8,
        d_ff=2048,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout_rate=0.1,
        label_smoothing=0.1,
        share_embeddings=True,
        tie_output=True,
    )
    return TransformerConfig(**{**fields, **overrides})


def transformer_big(vocab_size: int = 37000, **overrides: Any) -> TransformerConfig:
    """Transformer (big), Table 3: N=6, d_model=1024, d_ff=4096, h=16,
    P_drop=0.3, eps_ls=0.1 (the paper used P_drop=0.1 for English-French,
    sec. 6.1: pass `dropout_rate=0.1`). About 213M parameters.
    """
    fields = dict(
        src_vocab_size=vocab_size,
        d_model=1024,
        num_heads=16,
        d_ff=4096,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout_rate=0.3,
        label_smoothing=0.1,
        share_embeddings=True,
        tie_output=True,
    )
    return TransformerConfig(**{**fields, **overrides})


def small(vocab_size: int = 11, **overrides: Any) -> TransformerConfig:
    """A Transformer for the bundled tasks on a few CPU cores: d_model=128, 4 heads,
    d_ff=512, 2 + 2 layers, P_drop=0.1, eps_ls=0.1 (about 0.9M parameters)."""
    fields = dict(
        src_vocab_size=vocab_size,
        d_model=128,
        num_heads=4,
        d_ff=512,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.1,
        label_smoothing=0.1,
        max_length=128,
    )
    return TransformerConfig(**{**fields, **overrides})


def tiny(vocab_size: int = 11, **overrides: Any) -> TransformerConfig:
    """A test-sized Transformer: d_model=16, 2 heads, d_ff=32, 2 + 2 layers, no dropout."""
    fields = dict(
        src_vocab_size=vocab_size,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.0,
        label_smoothing=0.0,
        max_length=16,
    )
    return TransformerConfig(**{**fields, **overrides})
