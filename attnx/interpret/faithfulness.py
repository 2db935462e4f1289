"""Is attention faithful? Erasure, intervention and rank tests, per target token.

Every test explains the teacher-forced prediction of each target token,
p(y_t | x, y_<t), and returns one value per `[batch, t]` (zero, or NaN for
rank correlations, at padded target tokens); `token_mean` averages over the
real tokens. A `model` is an attnx seq2seq model or any function
`(src, tgt_in) -> logits [b, t, V]`; tokens 0 are padding, and the decoder
reads bos (1) then the targets shifted right.

Erasure (`Eraser`): a source token is replaced by `<unk>` (id 3) by default:
the sequence keeps its length and padding, so positions, convolutions and
the RNN encoder's padding-at-the-end contract are untouched, and the token's
content is gone (DeYoung et al. 2020 delete tokens; replacement is the
usual choice for models that read positions). An image source is erased
per attention grid cell: the cell's pixel rectangle (`pixel_cells`) is set
to 0 (black).

* `erasure_scores` (DeYoung et al. 2020, ERASER, sec. 4.2): with r_k the
  top k% source positions by an importance `[t, s]` (attention, a gradient,
  ...), k in the bins 1, 5, 10, 20, 50 %,
    comprehensiveness_k = p(y_t | x) - p(y_t | x without r_k)
    sufficiency_k       = p(y_t | x) - p(y_t | r_k only)
  and their AOPC, the mean over the bins (as ERASER's scorer computes it).
  k% of n real positions is ceil(k n / 100) positions, at least 1.
* `erase_most_attended`: the drop in p(y_t) when the most attended position
  (or image region) is erased, against a random other one (Serrano & Smith
  2019; for images, Xu et al. 2015's "where the model looks").
* `attention_intervention`: attention replaced by uniform weights or
  permuted (Jain & Wallace 2019; Wiegreffe & Pinter 2019) at every site
  (`attnx.layers.interventions`): the change in p(y_t), the total variation
  distance between the output distributions, whether the argmax changes.
* `rank_agreement`: Kendall's tau-b between attention and |gradient x input|,
  and between attention and leave-one-out (`leave_one_out`: the drop in
  log p(y_t) when one position is erased), as Jain & Wallace (2019, sec. 3).

All variants of an input (erasures, permutations) are batched with `vmap`
(`batch_size` of them at a time, all by default), inside one jitted program
per test that compiles once per model structure and input shapes.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from attnx.interpret import attribution
from attnx.interpret.attribution import (
    PAD_ID,
    UNK_ID,
    ModelDef,
    pixel_cells,
    split_model,
    teacher_inputs,
    token_log_probs,
)
from attnx.layers import interventions

Array = jax.Array

# ERASER's bins, in percent of the real source positions.
AOPC_BINS: tuple[int, ...] = (1, 5, 10, 20, 50)


# -- erasing source positions ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Eraser:
    """How to erase source positions: tokens become `token`; image cells become `fill`.

    Attributes:
      token: the replacement of an erased token (default `<unk>`; 0 would
        turn it into padding, which the models then mask out).
      grid: `(H', W')` attention grid of an image source, whose cells are the
        positions; None for tokens.
      fill: the value of an erased image cell's pixels.
    """

    token: int = UNK_ID
    grid: tuple[int, int] | None = None
    fill: float = 0.0

    def valid(self, src: Array) -> Array:
        """`[batch, s]`: the positions that can be erased (real tokens, every cell)."""
        if self.grid is None:
            return src != PAD_ID
        return jnp.ones((src.shape[0], self.grid[0] * self.grid[1]), bool)

    def __call__(self, src: Array, drop: Array) -> Array:
        """`src` with the positions where `drop` `[..., batch, s]` is True erased: `[..., *src.shape]`."""
        if self.grid is None:
            return jnp.where(drop, self.token, src).astype(src.dtype)
        height, width = src.shape[1:3]
        cells = jnp.asarray(pixel_cells((height, width), self.grid)).reshape(-1)
        pixels = jnp.take(drop, cells, axis=-1).reshape(*drop.shape[:-1], height, width)
        return jnp.where(pixels[..., None], jnp.asarray(self.fill, src.dtype), src)


def eraser_for(
    model: Any,
    src: Array,
    *,
    token: int = UNK_ID,
    fill: float = 0.0,
    grid: tuple[int, int] | None = None,
) -> Eraser:
    """The `Eraser` of `src`: tokens, or image cells on the model's attention grid."""
    src = jnp.asarray(src)
    if jnp.issubdtype(src.dtype, jnp.integer):
        return Eraser(token=token)
    if grid is None:
        grid = attribution.image_grid(model, src)
    return Eraser(token=token, grid=tuple(grid), fill=fill)


# -- shared pieces ---------------------------------------------------------------


def token_mean(values: Array, targets: Array) -> Array:
    """Mean of `[batch, t, ...]` values over the real (non-padding) target tokens: `[...]`."""
    targets = jnp.asarray(targets)
    real = (targets != PAD_ID).reshape(*targets.shape, *([1] * (values.ndim - 2)))
    total = jnp.sum(jnp.where(real, values, 0.0), axis=(0, 1))
    return total / jnp.maximum(jnp.sum(real, axis=(0, 1)), 1)


def _zero_padding(values: Array, targets: Array) -> Array:
    """Zeroes `[batch, t, ...]` values at padded target tokens."""
    real = (targets != PAD_ID).reshape(*targets.shape, *([1] * (values.ndim - 2)))
    return jnp.where(real, values, 0.0)


def _erased_log_probs(
    model_def: ModelDef,
    state: Any,
    src: Array,
    targets: Array,
    drops: Array,
    eraser: Eraser,
    batch_size: int | None,
) -> Array:
    """log p(y_t) with each `drops[i]` `[b, s]` erased: `[n, b, t]` (traced inside a jit)."""
    tgt_in = teacher_inputs(targets)

    def one(drop):
        return token_log_probs(model_def.logits(state, eraser(src, drop), tgt_in), targets)

    return jax.lax.map(one, drops, batch_size=batch_size or drops.shape[0])


def _per_token_drops(
    model_def, state, src, targets, drops, eraser, batch_size
) -> tuple[Array, Array]:
    """p(y_t | x) `[b, t]`, and p(y_t | x with `drops[..., t, b, s]` erased) `[..., b, t]`.

    Token t is read from the run that erased `drops[..., t, :, :]`.
    """
    leading, steps = drops.shape[:-3], targets.shape[1]
    flat = drops.reshape(-1, *drops.shape[-2:])  # [n * t, b, s]
    log_p = _erased_log_probs(model_def, state, src, targets, flat, eraser, batch_size)
    log_p = jnp.moveaxis(log_p.reshape(*leading, steps, *log_p.shape[1:]), -3, 0)
    rows = jnp.arange(steps)
    erased = jnp.moveaxis(log_p[rows, ..., rows], 0, -1)  # [..., b, t]
    base = token_log_probs(model_def.logits(state, src, teacher_inputs(targets)), targets)
    return jnp.exp(base), jnp.exp(erased)


def _arrays(model: Any, src: Array, targets: Array, eraser: Eraser | None):
    src, targets = jnp.asarray(src), jnp.asarray(targets)
    model_def, state = split_model(model)
    return model_def, state, src, targets, eraser or eraser_for(model, src)


# -- ERASER comprehensiveness and sufficiency ------------------------------------


@functools.partial(jax.jit, static_argnames=("bins",))
def top_fraction_masks(importance: Array, valid: Array, bins: tuple[int, ...]) -> Array:
    """The top k% real positions of every importance row, `[n_bins, batch, t, s]` bool.

    Args:
      importance: `[batch, t, s]`; ties go to the earlier position.
      valid: `[batch, s]`, the positions that count (n per example).
      bins: percentages k; each keeps ceil(k n / 100) positions, at least 1.
    """
    score = jnp.where(valid[:, None, :], importance, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1)
    count = jnp.sum(valid, axis=-1)  # [b]
    percents = jnp.asarray(bins, jnp.int32)[:, None]
    # Integer ceil(k n / 100): exact, where k * n / 100 in floats may land above an integer.
    keep = jnp.maximum((percents * count[None, :] + 99) // 100, jnp.minimum(count, 1)[None, :])
    return (rank[None] < keep[:, :, None, None]) & valid[None, :, None, :]


@struct.dataclass
class ErasureScores:
    """ERASER's faithfulness scores of an importance, per target token.

    Attributes:
      probability: p(y_t | x), `[batch, t]`.
      comprehensiveness / sufficiency: `[batch, t, n_bins]`, one per bin of `bins`.
      aopc_comprehensiveness / aopc_sufficiency: their means over the bins, `[batch, t]`.
      bins: the percentages.
    """

    probability: Array
    comprehensiveness: Array
    sufficiency: Array
    aopc_comprehensiveness: Array
    aopc_sufficiency: Array
    bins: tuple[int, ...] = struct.field(pytree_node=False)


@functools.partial(jax.jit, static_argnames=("model_def", "eraser", "bins", "batch_size"))
def _erasure_scores(model_def, state, src, targets, importance, *, eraser, bins, batch_size):
    valid = eraser.valid(src)
    top = jnp.swapaxes(top_fraction_masks(importance, valid, bins), 1, 2)  # [k, t, b, s]
    drops = jnp.stack([top, valid[None, None] & ~top])  # [2, k, t, b, s]
    probability, erased = _per_token_drops(
        model_def, state, src, targets, drops, eraser, batch_size
    )
    scores = [_zero_padding(jnp.moveaxis(probability - p, 0, -1), targets) for p in erased]
    return probability, scores[0], scores[1]


def erasure_scores(
    model: Any,
    src: Array,
    targets: Array,
    importance: Array,
    *,
    bins: Sequence[int] = AOPC_BINS,
    eraser: Eraser | None = None,
    batch_size: int | None = None,
) -> ErasureScores:
    """Comprehensiveness, sufficiency and AOPC (DeYoung et al. 2020) of `importance`.

    For target token t, r_k holds the top k% real source positions by
    `importance[:, t]` (`top_fraction_masks`):
      comprehensiveness_k = p(y_t | x) - p(y_t | x with r_k erased)
      sufficiency_k       = p(y_t | x) - p(y_t | x with all but r_k erased)
    High comprehensiveness and low sufficiency mean the importance found what
    the prediction rests on. AOPC is the mean over the bins.

    Args:
      model: an attnx seq2seq model or a function `(src, tgt_in) -> logits`.
      src: int tokens `[batch, s]` or an image `[batch, H, W, C]`.
      targets: int `[batch, t]`, 0 = padding.
      importance: `[batch, t, s]` (s = grid cells for images).
      bins: percentages (default `AOPC_BINS`: 1, 5, 10, 20, 50).
      eraser: how to erase (default `eraser_for(model, src)`: `<unk>` tokens, black cells).
      batch_size: erased copies per forward pass (default all at once).
    """
    model_def, state, src, targets, eraser = _arrays(model, src, targets, eraser)
    bins = tuple(int(k) for k in bins)
    probability, comprehensiveness, sufficiency = _erasure_scores(
        model_def,
        state,
        src,
        targets,
        jnp.asarray(importance),
        eraser=eraser,
        bins=bins,
        batch_size=batch_size,
    )
    return ErasureScores(
        probability=probability,
        comprehensiveness=comprehensiveness,
        sufficiency=sufficiency,
        aopc_comprehensiveness=jnp.mean(comprehensiveness, axis=-1),
        aopc_sufficiency=jnp.mean(sufficiency, axis=-1),
        bins=bins,
    )


# -- the most attended position against a random one -----------------------------


@struct.dataclass
class ErasureGap:
    """Erasing the most attended source position against a random other one, per token.

    Attributes:
      most / random: p(y_t | x) - p(y_t | x without that position), `[batch, t]`.
      gap: most - random.
      most_index / random_index: the erased positions, `[batch, t]`.
    """

    most: Array
    random: Array
    gap: Array
    most_index: Array
    random_index: Array


@functools.partial(jax.jit, static_argnames=("model_def", "eraser", "batch_size"))
def _erase_most_attended(model_def, state, src, targets, attention, key, *, eraser, batch_size):
    valid = eraser.valid(src)[:, None, :]  # [b, 1, s]
    size = attention.shape[-1]
    most = jnp.argmax(jnp.where(valid, attention, -jnp.inf), axis=-1)  # [b, t]
    others = valid & (jnp.arange(size) != most[..., None])
    others = jnp.where(jnp.any(others, axis=-1, keepdims=True), others, valid)
    random = jax.random.categorical(key, jnp.where(others, 0.0, -jnp.inf), axis=-1)
    drops = jnp.stack([jax.nn.one_hot(most, size), jax.nn.one_hot(random, size)]) > 0
    probability, erased = _per_token_drops(
        model_def, state, src, targets, jnp.swapaxes(drops, 1, 2), eraser, batch_size
    )
    drop = _zero_padding(jnp.moveaxis(probability - erased, 0, -1), targets)  # [b, t, 2]
    return ErasureGap(drop[..., 0], drop[..., 1], drop[..., 0] - drop[..., 1], most, random)


def erase_most_attended(
    model: Any,
    src: Array,
    targets: Array,
    attention: Array,
    *,
    key: Array,
    eraser: Eraser | None = None,
    batch_size: int | None = None,
) -> ErasureGap:
    """The drop in p(y_t) when the most attended position is erased, against a random one.

    The random position is uniform over the other real positions (the same
    one when there is no other). For an image the positions are attention
    grid cells and erasing blackens the cell's pixel rectangle.

    Args:
      model, src, targets, eraser, batch_size: as `erasure_scores`.
      attention: `[batch, t, s]`, e.g. a model's 'alignment' weights.
      key: PRNG key of the random positions.
    """
    model_def, state, src, targets, eraser = _arrays(model, src, targets, eraser)
    return _erase_most_attended(
        model_def,
        state,
        src,
        targets,
        jnp.asarray(attention),
        key,
        eraser=eraser,
        batch_size=batch_size,
    )


# -- interventions on the attention weights --------------------------------------


@struct.dataclass
class InterventionEffects:
    """What changes when every attention map is replaced, per target token `[batch, t]`.

    Attributes:
      probability_change: p(y_t) - p'(y_t).
      total_variation: (1/2) sum_v |p(v) - p'(v)| over the vocabulary.
      argmax_changed: the fraction of samples whose most likely token differs.
      Each is averaged over the samples (permutations); `token_mean` averages tokens.
    """

    probability_change: Array
    total_variation: Array
    argmax_changed: Array


@functools.partial(jax.jit, static_argnames=("model_def",))
def _intervention_effects(model_def, state, src, targets, keys):
    tgt_in = teacher_inputs(targets)

    def probabilities(edit):
        with interventions.attention_edit(edit):
            logits = model_def.logits(state, src, tgt_in)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    # The original also runs under an (identity) edit: the same materialising
    # implementation as the edited runs, so that only the weights differ.
    original = probabilities(lambda weights, mask, site: weights)
    if keys is None:
        other = probabilities(interventions.uniform)[None]  # [1, b, t, V]
    else:
        other = jax.vmap(lambda key: probabilities(interventions.permute(key)))(keys)
    pick = targets[None, ..., None]
    p_y = jnp.take_along_axis(original[None], pick, axis=-1)[..., 0]
    q_y = jnp.take_along_axis(other, pick, axis=-1)[..., 0]
    total_variation = 0.5 * jnp.sum(jnp.abs(original[None] - other), axis=-1)
    changed = jnp.argmax(original, axis=-1)[None] != jnp.argmax(other, axis=-1)
    return InterventionEffects(
        *(
            _zero_padding(jnp.mean(x, axis=0), targets)
            for x in (p_y - q_y, total_variation, changed.astype(jnp.float32))
        )
    )


def attention_intervention(
    model: Any,
    src: Array,
    targets: Array,
    *,
    edit: str = "uniform",
    key: Array | None = None,
    samples: int = 1,
) -> InterventionEffects:
    """The effect of uniform or permuted attention at every site (Jain & Wallace 2019).

    The model runs teacher-forced inside `attention_edit`: 'uniform' gives
    every valid key the same weight; 'permute' shuffles each query row's
    weights among its valid keys, `samples` times (`key` required), and the
    effects are averaged over the permutations. In models whose decoder is a
    `lax.scan` (RNN, captioner) one permutation pattern (drawn per site, not
    per step) is applied to every step's weights.

    Args:
      model: an attnx seq2seq model, or a function built from attnx layers.
      src, targets: as `erasure_scores`.
      edit: 'uniform' or 'permute'.
      key: PRNG key of the permutations.
      samples: number of permutations.
    """
    if edit not in ("uniform", "permute"):
        raise ValueError(
            f"attention_intervention: edit must be 'uniform' or 'permute', got {edit!r}"
        )
    if edit == "permute" and key is None:
        raise ValueError("attention_intervention: edit='permute' needs a key")
    model_def, state = split_model(model)
    keys = jax.random.split(key, samples) if edit == "permute" else None
    return _intervention_effects(model_def, state, jnp.asarray(src), jnp.asarray(targets), keys)


# -- rank agreement ----------------------------------------------------------------


@jax.jit
def kendall_tau_b(x: Array, y: Array, mask: Array | None = None) -> Array:
    """Kendall's tau-b of x and y along the last axis, over the positions where `mask` holds.

      tau_b = (P - Q) / sqrt((n0 - n1)(n0 - n2))

    with P / Q the concordant / discordant pairs, n0 the pairs, n1 / n2 the
    pairs tied in x / in y (Kendall 1945; scipy.stats.kendalltau's default).
    NaN when either side is constant (or fewer than two positions). O(n^2)
    pairs, vectorised over the leading axes.
    """
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    n = x.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), bool), k=1)
    pairs = upper if mask is None else upper & mask[..., :, None] & mask[..., None, :]
    dx = jnp.sign(x[..., :, None] - x[..., None, :])
    dy = jnp.sign(y[..., :, None] - y[..., None, :])
    total = jnp.sum(pairs, axis=(-2, -1))
    concordance = jnp.sum(jnp.where(pairs, dx * dy, 0.0), axis=(-2, -1))
    untied_x = total - jnp.sum(pairs & (dx == 0), axis=(-2, -1))
    untied_y = total - jnp.sum(pairs & (dy == 0), axis=(-2, -1))
    denominator = jnp.sqrt(untied_x.astype(jnp.float32) * untied_y.astype(jnp.float32))
    positive = denominator > 0
    return jnp.where(positive, concordance / jnp.where(positive, denominator, 1.0), jnp.nan)


@functools.partial(jax.jit, static_argnames=("model_def", "eraser", "batch_size"))
def _leave_one_out(model_def, state, src, targets, *, eraser, batch_size):
    valid = eraser.valid(src)
    size = valid.shape[-1]
    drops = jnp.eye(size, dtype=bool)[:, None, :] & valid[None]  # [s, b, s]
    log_p = _erased_log_probs(model_def, state, src, targets, drops, eraser, batch_size)
    base = token_log_probs(model_def.logits(state, src, teacher_inputs(targets)), targets)
    drop = _zero_padding(jnp.moveaxis(base[None] - log_p, 0, -1), targets)  # [b, t, s]
    return jnp.where(valid[:, None, :], drop, 0.0)


def leave_one_out(
    model: Any,
    src: Array,
    targets: Array,
    *,
    eraser: Eraser | None = None,
    batch_size: int | None = None,
) -> Array:
    """log p(y_t | x) - log p(y_t | x with position j erased), `[batch, t, s]`, 0 at padding.

    Every position (token or image cell) is erased once; the s erased copies
    run as one batch of variants.
    """
    model_def, state, src, targets, eraser = _arrays(model, src, targets, eraser)
    return _leave_one_out(model_def, state, src, targets, eraser=eraser, batch_size=batch_size)


@struct.dataclass
class RankAgreement:
    """Kendall's tau-b per target token `[batch, t]` (NaN at padded tokens or constant rows).

    Attributes:
      attention_vs_gradient: attention against |gradient x input|.
      attention_vs_leave_one_out: attention against the leave-one-out drop.
    """

    attention_vs_gradient: Array
    attention_vs_leave_one_out: Array


def rank_agreement(
    model: Any,
    src: Array,
    targets: Array,
    attention: Array,
    *,
    gradient: Array | None = None,
    loo: Array | None = None,
    eraser: Eraser | None = None,
    batch_size: int | None = None,
) -> RankAgreement:
    """Do attention and other importance measures rank the source alike? (Jain & Wallace 2019)

    Kendall's tau-b over the real source positions of each target token,
    between `attention` and the magnitude of gradient x input (how much a
    position matters, whatever the direction; images pooled to the grid),
    and between `attention` and leave-one-out.

    Args:
      model, src, targets, eraser, batch_size: as `erasure_scores`.
      attention: `[batch, t, s]`.
      gradient: a precomputed `[batch, t, s]` importance to compare instead of
        |`attribution.gradient_x_input`| (e.g. for a model given as a function).
      loo: a precomputed `leave_one_out`.
    """
    src, targets = jnp.asarray(src), jnp.asarray(targets)
    eraser = eraser or eraser_for(model, src)
    if gradient is None:
        gradient = jnp.abs(attribution.gradient_x_input(model, src, targets, pool_to_grid=True))
    if loo is None:
        loo = leave_one_out(model, src, targets, eraser=eraser, batch_size=batch_size)
    attention = jnp.asarray(attention)
    valid = jnp.broadcast_to(eraser.valid(src)[:, None, :], attention.shape)
    real = (targets != PAD_ID)[..., None] & valid
    return RankAgreement(
        kendall_tau_b(attention, gradient, real), kendall_tau_b(attention, loo, real)
    )
