"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

A layer's attention says how its outputs mix its inputs, but after the first
layer those inputs are themselves mixtures. Rollout follows the mixing down to
the input tokens. With A_l the (head-averaged) self-attention of layer l,
rows = queries, columns = keys, and the residual connection modelled as an
equal mix of attention and identity (the paper, sec. 3):

  A'_l = normalize_rows(0.5 A_l + 0.5 I)                           (residual)
  R    = A'_L A'_{L-1} ... A'_1                                    (eq. 1)

R[i, j] is the share of input token j in the top layer's position i; every
row of R sums to 1. This is the reference code's `compute_joint_attention`
(add the identity, renormalise the rows, multiply the layers up).

Encoder-decoder models (`encoder_decoder_rollout`) are rolled out on the
graph whose nodes are the t target positions and the s encoder positions; see
that function for the definition, which also covers decoders with no
self-attention (RNN, ConvS2S, the captioner) and encoders with none. The
helper `source_relevance` reads an attnx model's weights dict (the
`return_weights=True` output of `model(src, tgt_in)`) and returns the
relevance of every target position to every source token.

Everything here is pure JAX (jit-able; shapes are static), with the matrix
products at full float32 precision: rollout multiplies many matrices, and
TPUs' default bfloat16 passes would lose the small entries.
"""

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "AttentionStacks",
    "EncoderDecoderRelevance",
    "HeadReduction",
    "attention_stacks",
    "encoder_decoder_rollout",
    "encoder_decoder_stages",
    "reduce_heads",
    "residual_attention",
    "rollout",
    "source_relevance",
]

Array = jax.Array
# 'mean' (the paper), 'max', one head's index, or None for maps that have no head axis.
HeadReduction = str | int | None

_HIGHEST = jax.lax.Precision.HIGHEST


class EncoderDecoderRelevance(NamedTuple):
    """Relevance of every target position, split by the kind of input token.

    Each row of a real target position sums to 1 over `target` and `source` together.

    Attributes:
      source: `[..., t, s]`, relevance to each source token (encoder input).
      target: `[..., t, t]`, relevance to each decoder input token (causal:
        lower triangular when the decoder's self-attention is).
    """

    source: Array
    target: Array


def _matmul(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _normalize_rows(a: Array) -> Array:
    """`a` with every row divided by its sum; all-zero rows (masked) stay zero."""
    total = jnp.sum(a, axis=-1, keepdims=True)
    return jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), 0.0)


def reduce_heads(weights: Array, head_reduction: HeadReduction = "mean") -> Array:
    """One map per layer from a multi-head one.

    Args:
      weights: `[..., heads, q, k]` attention weights (any leading axes, e.g. batch),
        or `[..., q, k]` when `head_reduction` is None.
      head_reduction: 'mean' over heads (the paper), 'max' over heads (rows no longer
        sum to 1; `residual_attention` renormalises them), an int selecting one head,
        or None: `weights` has no head axis and is returned as it is.

    Returns:
      `[..., q, k]` float32.
    """
    weights = jnp.asarray(weights, jnp.float32)
    if head_reduction is None:
        return weights
    if weights.ndim < 3:
        raise ValueError(
            f"reduce_heads: weights {weights.shape} have no head axis ([..., heads, q, k]); "
            "pass head_reduction=None for maps that are already one per layer"
        )
    if head_reduction == "mean":
        return jnp.mean(weights, axis=-3)
    if head_reduction == "max":
        return jnp.max(weights, axis=-3)
    if isinstance(head_reduction, int) and not isinstance(head_reduction, bool):
        heads = weights.shape[-3]
        # JAX clamps out-of-range indices silently: refuse them here.
        if not -heads <= head_reduction < heads:
            raise ValueError(f"reduce_heads: head {head_reduction} out of range for {heads} heads")
        return weights[..., head_reduction, :, :]
    raise ValueError(
        f"reduce_heads: head_reduction must be 'mean', 'max', a head index or None, "
        f"got {head_reduction!r}"
    )


def residual_attention(
    weights: Array, *, residual: bool = True, mask: Array | None = None
) -> Array:
    """A'_l = normalize_rows(0.5 A_l + 0.5 I): a layer's token mixing with its residual.

    Args:
      weights: `[..., n, n]` one self-attention map (heads already reduced), rows =
        queries, columns = keys.
      residual: add the identity (the residual connection, weight 0.5 each as in the
        paper). Without it the map is only renormalised.
      mask: optional bool `[..., n]`, True at real tokens (broadcastable to the map's
        leading axes). Rows and columns of padding are zeroed, so they stay zero.

    Returns:
      `[..., n, n]` float32; every row of a real token sums to 1, rows of padding are
      zero. Rows are renormalised before the residual is added (a no-op for softmax
      rows; after a max over heads it makes A a distribution again) and after (for
      padding and rows with no weight: a real token's all-zero row becomes its own
      identity row).
    """
    a = jnp.asarray(weights, jnp.float32)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"residual_attention: self-attention must be [..., n, n], got {a.shape}")
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    if mask is not None:
        valid = jnp.asarray(mask, bool)
        a = jnp.where(valid[..., :, None] & valid[..., None, :], a, 0.0)
        eye = eye * valid[..., None, :]
    # Rows first become distributions (a max over heads or a mask breaks their sums), so
    # that the residual keeps its weight 0.5; for softmax rows this is the reference
    # code's (A + I) / row sums exactly.
    a = _normalize_rows(a)
    if residual:
        a = _normalize_rows(0.5 * a + 0.5 * eye)
    return a


def rollout(
    layers: Sequence[Array],
    *,
    head_reduction: HeadReduction = "mean",
    residual: bool = True,
    mask: Array | None = None,
) -> Array:
    """Attention rollout of a self-attention stack: R = A'_L ... A'_1 (paper eq. 1).

    Args:
      layers: the self-attention weights of every layer, first (closest to the input)
        first, each `[..., heads, n, n]` (e.g. `[batch, heads, n, n]`), or `[..., n, n]`
        with `head_reduction=None`.
      head_reduction: see `reduce_heads` ('mean' by default, as in the paper).
      residual: model the residual connections (A' = 0.5 A + 0.5 I, rows renormalised).
      mask: optional bool `[..., n]`, True at real tokens.

    Returns:
      `[..., n, n]` float32 joint attention: row i is the top layer's position i as a
      distribution over the input tokens (rows of real tokens sum to 1; rows and columns
      of padding are zero).
    """
    if len(layers) == 0:
        raise ValueError("rollout: no layers")
    maps = [reduce_heads(w, head_reduction) for w in layers]
    shapes = {m.shape[-2:] for m in maps}
    if len(shapes) != 1:
        raise ValueError(f"rollout: every layer must be [..., n, n] with one n, got {shapes}")
    joint = residual_attention(maps[0], residual=residual, mask=mask)
    for m in maps[1:]:
        joint = _matmul(residual_attention(m, residual=residual, mask=mask), joint)
    return joint


def _cross_sublayer(
    cross: Array, target_mask: Array | None, source_mask: Array | None, residual: bool
) -> tuple[Array, Array, Array]:
    """The cross-attention sublayer as (keep, mix, scale): new = (keep * old + mix * C z) * scale.

    keep `[..., t]` is the residual's weight per target row (0.5, or 0 without the
    residual or at padding), mix `[..., t, s]` is 0.5 C (C without the residual),
    masked; scale `[..., t]` renormalises the row [keep I, mix] to sum 1.
    """
    c = jnp.asarray(cross, jnp.float32)
    t = c.shape[-2]
    keep = jnp.full((t,), 0.5 if residual else 0.0, jnp.float32)
    if target_mask is not None:
        valid_t = jnp.asarray(target_mask, bool)
        c = jnp.where(valid_t[..., :, None], c, 0.0)
        keep = keep * valid_t
    if source_mask is not None:
        c = jnp.where(jnp.asarray(source_mask, bool)[..., None, :], c, 0.0)
    # As in `residual_attention`: C's rows are distributions before the residual mixes in.
    mix = (0.5 if residual else 1.0) * _normalize_rows(c)
    total = keep + jnp.sum(mix, axis=-1)
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    return keep, mix, scale


def _check_encoder_decoder(decoder_self: Sequence[Array], cross: Sequence[Array], name: str):
    if len(cross) == 0:
        raise ValueError(f"{name}: needs at least one cross-attention layer")
    if len(decoder_self) not in (0, len(cross)):
        raise ValueError(
            f"{name}: {len(decoder_self)} decoder self-attention layers for {len(cross)} "
            "cross-attention layers (one each per decoder layer, or no self-attention)"
        )


def _masked_eye(n: int, mask: Array | None) -> Array:
    eye = jnp.eye(n, dtype=jnp.float32)
    return eye if mask is None else eye * jnp.asarray(mask, bool)[..., None, :]


def encoder_decoder_rollout(
    encoder_self: Sequence[Array],
    decoder_self: Sequence[Array],
    cross: Sequence[Array],
    *,
    head_reduction: HeadReduction = "mean",
    residual: bool = True,
    source_mask: Array | None = None,
    target_mask: Array | None = None,
) -> EncoderDecoderRelevance:
    """Rollout through an encoder-decoder: target positions over source and target tokens.

    The graph. The decoder's states are mixtures of two kinds of input token: the
    decoder's own inputs (t target tokens) and the encoder's inputs (s source tokens).
    A decoder state's relevance is a row [R_tt | R_ts] over those t + s tokens. The
    encoder is rolled out on its own (`rollout`): R_enc = E'_{L_e} ... E'_1 `[s, s]`
    maps encoder output position j to source tokens. With no encoder self-attention
    (RNN, ConvS2S, the captioner's CNN) R_enc = I: encoder output position j is taken
    to be source token j (the recurrences and convolutions that also mix positions
    have no attention map to follow).

    The decoder input starts as [I | 0]. Decoder layer l is a self-attention sublayer
    then a cross-attention sublayer, each with a residual (0.5 / 0.5, as in `rollout`):

      self:   D'_l = normalize_rows(0.5 D_l + 0.5 I)
              [R_tt | R_ts] <- D'_l [R_tt | R_ts]
      cross:  [R_tt | R_ts] <- normalize_rows([0.5 R_tt | 0.5 R_ts + 0.5 C_l R_enc])

    (the cross sublayer's output is 0.5 x its input + 0.5 x the context C_l z, and the
    encoder outputs z carry R_enc). Rows of [R_tt | R_ts] sum to 1 at every step, so
    the renormalisation only matters at padding or with a max over heads. Equivalently,
    this is `rollout` on t + s nodes with the stage matrices of `encoder_decoder_stages`.
    Without `residual` the self sublayer is D_l and the cross sublayer replaces the row
    by [0 | C_l R_enc].

    Decoders without self-attention (`decoder_self` empty) have cross sublayers only:
    an RNN's one attention, the captioner's spatial attention (then s = L grid cells),
    or ConvS2S's multi-step attention, one `[b, t, s]` map per decoder layer. What mixes
    target positions in those decoders has no weights to follow, so it is treated as
    the identity on positions: ConvS2S's causal convolutions between the attention
    layers, and the recurrence of RNN decoders. Only the residual and the attention
    remain; with a single cross-attention, R_ts = 0.5 C and R_tt = 0.5 I.

    Args:
      encoder_self: encoder self-attention per layer, first first, each
        `[..., heads, s, s]` (`[..., s, s]` with `head_reduction=None`); may be empty.
      decoder_self: decoder self-attention per layer, `[..., heads, t, t]`; empty, or
        one per cross-attention layer.
      cross: decoder cross-attention per layer, `[..., heads, t, s]`; at least one.
      head_reduction: see `reduce_heads`; applied to every map.
      residual: model the residual connections (0.5 / 0.5).
      source_mask: optional bool `[..., s]`, True at real source tokens.
      target_mask: optional bool `[..., t]`, True at real target positions.

    Returns:
      `EncoderDecoderRelevance(source=[..., t, s], target=[..., t, t])`, float32; rows
      of real target positions sum to 1 over both parts together.
    """
    _check_encoder_decoder(decoder_self, cross, "encoder_decoder_rollout")
    cross_maps = [reduce_heads(c, head_reduction) for c in cross]
    t, s = cross_maps[0].shape[-2:]
    if len(encoder_self):
        r_enc = rollout(
            encoder_self, head_reduction=head_reduction, residual=residual, mask=source_mask
        )
    else:
        r_enc = _masked_eye(s, source_mask)
    r_tt = _masked_eye(t, target_mask)
    r_ts = jnp.zeros((t, s), jnp.float32)
    for i, c in enumerate(cross_maps):
        if len(decoder_self):
            d = residual_attention(
                reduce_heads(decoder_self[i], head_reduction), residual=residual, mask=target_mask
            )
            r_tt, r_ts = _matmul(d, r_tt), _matmul(d, r_ts)
        keep, mix, scale = _cross_sublayer(c, target_mask, source_mask, residual)
        r_tt = (keep * scale)[..., None] * r_tt
        r_ts = scale[..., None] * (keep[..., None] * r_ts + _matmul(mix, r_enc))
    return EncoderDecoderRelevance(source=r_ts, target=r_tt)


def _block(tt: Array, ts: Array, st: Array, ss: Array) -> Array:
    """[[tt, ts], [st, ss]] with the leading axes broadcast: `[..., t + s, t + s]`."""
    lead = jnp.broadcast_shapes(*(x.shape[:-2] for x in (tt, ts, st, ss)))
    tt, ts, st, ss = (jnp.broadcast_to(x, lead + x.shape[-2:]) for x in (tt, ts, st, ss))
    return jnp.concatenate(
        [jnp.concatenate([tt, ts], axis=-1), jnp.concatenate([st, ss], axis=-1)], axis=-2
    )


def encoder_decoder_stages(
    encoder_self: Sequence[Array],
    decoder_self: Sequence[Array],
    cross: Sequence[Array],
    *,
    head_reduction: HeadReduction = "mean",
    residual: bool = True,
    source_mask: Array | None = None,
    target_mask: Array | None = None,
) -> list[Array]:
    """The encoder-decoder as a stack of `[..., t + s, t + s]` mixing matrices.

    Nodes 0..t-1 are target positions, t..t+s-1 encoder positions. Stages, first first
    (each applied to the rows of the one below, as in `rollout`):

      encoder layer:       [[I, 0], [0, E'_l]]
      decoder self-attn:   [[D'_l, 0], [0, I]]
      decoder cross-attn:  normalize_rows([[0.5 I, 0.5 C_l], [0, I]])

    Their product M_K ... M_1 has `encoder_decoder_rollout`'s [R_tt | R_ts] in its
    first t rows. `attention_flow` runs on these stages for encoder-decoder flow (the
    identity edges carry an encoder output unchanged up to every cross-attention).
    Arguments as in `encoder_decoder_rollout`; padding rows (and identity entries) are 0.
    """
    _check_encoder_decoder(decoder_self, cross, "encoder_decoder_stages")
    cross_maps = [reduce_heads(c, head_reduction) for c in cross]
    t, s = cross_maps[0].shape[-2:]
    eye_t, eye_s = _masked_eye(t, target_mask), _masked_eye(s, source_mask)
    zeros_ts, zeros_st = jnp.zeros((t, s), jnp.float32), jnp.zeros((s, t), jnp.float32)
    stages = []
    for e in encoder_self:
        e = residual_attention(reduce_heads(e, head_reduction), residual=residual, mask=source_mask)
        stages.append(_block(eye_t, zeros_ts, zeros_st, e))
    for i, c in enumerate(cross_maps):
        if len(decoder_self):
            d = residual_attention(
                reduce_heads(decoder_self[i], head_reduction), residual=residual, mask=target_mask
            )
            stages.append(_block(d, zeros_ts, zeros_st, eye_s))
        keep, mix, scale = _cross_sublayer(c, target_mask, source_mask, residual)
        stages.append(
            _block((keep * scale)[..., None] * eye_t, scale[..., None] * mix, zeros_st, eye_s)
        )
    return stages


# -- attnx weights dicts --------------------------------------------------------

_LAYER_KEY = re.compile(
    r"^(encoder|decoder)/layer_(\d+)/(self_attention|cross_attention|attention)$"
)


class AttentionStacks(NamedTuple):
    """An encoder-decoder's attention maps, as `encoder_decoder_rollout` takes them.

    Attributes:
      encoder_self / decoder_self / cross: tuples of maps, first layer first.
      has_heads: True when the maps are `[b, heads, q, k]` (the Transformer),
        False when they are `[b, q, k]` (RNN, ConvS2S, captioner).
    """

    encoder_self: tuple[Array, ...]
    decoder_self: tuple[Array, ...]
    cross: tuple[Array, ...]
    has_heads: bool


def _indexed(weights: Mapping[str, Array], stack: str, kind: str) -> dict[int, Array]:
    found = {}
    for key, value in weights.items():
        match = _LAYER_KEY.match(key)
        if match and match.group(1) == stack and match.group(3) == kind:
            found[int(match.group(2))] = value
    return found


def _consecutive(
    found: dict[int, Array], count: int, stack: str, kind: str, weights: Mapping[str, Array]
) -> tuple[Array, ...]:
    """Layers 0..count-1 of `found`, or an error naming the first missing key."""
    for i in range(count):
        if i not in found:
            raise ValueError(
                f"attention_stacks: missing key '{stack}/layer_{i}/{kind}'; keys present: "
                f"{sorted(weights)} (pass the weights of model(src, tgt_in, return_weights=True))"
            )
    return tuple(found[i] for i in range(count))


def attention_stacks(weights: Mapping[str, Array]) -> AttentionStacks:
    """Sorts an attnx model's weights dict into encoder / decoder / cross stacks.

    Recognised layouts (the keys the attnx models return with `return_weights=True`):

    * Transformer: 'encoder/layer_{i}/self_attention' `[b, h, s, s]`,
      'decoder/layer_{i}/self_attention' `[b, h, t, t]`,
      'decoder/layer_{i}/cross_attention' `[b, h, t, s]` (every layer i, from
      `model(src, tgt_in, return_weights=True)`, which holds the encoder's too).
    * ConvS2S: 'decoder/layer_{i}/attention' `[b, t, s]` for the blocks that attend
      (in order of i; the encoder has no attention).
    * RNN encoder-decoders: 'decoder/attention' `[b, t, s]`.
    * Captioner: 'decoder/spatial_attention' `[b, t, L]` (source = the L grid cells).

    Other keys ('alignment', 'gate', ...) are ignored. A dict matching none, or a
    Transformer dict with a layer missing, is a ValueError naming the missing key and
    the keys present.
    """
    cross = _indexed(weights, "decoder", "cross_attention")
    if cross:
        count = max(cross) + 1
        encoder = _indexed(weights, "encoder", "self_attention")
        if not encoder:
            raise ValueError(
                "attention_stacks: missing key 'encoder/layer_0/self_attention'; keys present: "
                f"{sorted(weights)} (decode() alone returns no encoder weights: pass those of "
                "model(src, tgt_in, return_weights=True))"
            )
        return AttentionStacks(
            encoder_self=_consecutive(
                encoder, max(encoder) + 1, "encoder", "self_attention", weights
            ),
            decoder_self=_consecutive(
                _indexed(weights, "decoder", "self_attention"),
                count,
                "decoder",
                "self_attention",
                weights,
            ),
            cross=_consecutive(cross, count, "decoder", "cross_attention", weights),
            has_heads=True,
        )
    multi_step = _indexed(weights, "decoder", "attention")
    if multi_step:
        return AttentionStacks((), (), tuple(multi_step[i] for i in sorted(multi_step)), False)
    for key in ("decoder/attention", "decoder/spatial_attention"):
        if key in weights:
            return AttentionStacks((), (), (weights[key],), False)
    raise ValueError(
        "attention_stacks: no cross-attention key: expected 'decoder/layer_{i}/cross_attention' "
        "(Transformer), 'decoder/layer_{i}/attention' (ConvS2S), 'decoder/attention' (RNN) or "
        f"'decoder/spatial_attention' (captioner); keys present: {sorted(weights)}"
    )


def source_relevance(
    weights: Mapping[str, Array],
    *,
    head_reduction: HeadReduction = "mean",
    residual: bool = True,
    source_mask: Array | None = None,
    target_mask: Array | None = None,
    normalize: bool = True,
) -> Array:
    """Rollout relevance of every target position to every source token, from a weights dict.

    Args:
      weights: what an attnx model returns with `return_weights=True` from
        `model(src, tgt_in)` (teacher forcing; see `attention_stacks` for the keys).
      head_reduction: how the Transformer's heads are reduced (`reduce_heads`); the
        single-head maps of the other models have no head axis and ignore it.
      residual: model the residual connections (`encoder_decoder_rollout`).
      source_mask / target_mask: optional bool `[b, s]` / `[b, t]`, True at real
        tokens. Not needed for attnx models, whose maps already give padding zero weight.
      normalize: divide each row by its sum, so that it is a distribution over the
        source tokens (the share of the source among what the position depends on);
        otherwise rows sum to 1 minus the decoder-token part
        (`encoder_decoder_rollout(...).target`). With one cross-attention and no
        self-attention (RNN, captioner) the normalised relevance is the attention map.

    Returns:
      `[b, t, s]` float32 (s = L grid cells for the captioner).
    """
    stacks = attention_stacks(weights)
    if stacks.has_heads and head_reduction is None:
        raise ValueError("source_relevance: the Transformer's maps have heads: pick a reduction")
    relevance = encoder_decoder_rollout(
        stacks.encoder_self,
        stacks.decoder_self,
        stacks.cross,
        head_reduction=head_reduction if stacks.has_heads else None,
        residual=residual,
        source_mask=source_mask,
        target_mask=target_mask,
    ).source
    return _normalize_rows(relevance) if normalize else relevance
