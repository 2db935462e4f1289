"""Attribution of each target token's log-probability to the source positions.

For a seq2seq model, a source x and a target sequence y (teacher forced:
the decoder reads bos, y_1, ..., y_{t-1}), every method here explains

  f_t(x) = log p(y_t | x, y_<t)

and returns `[batch, t, s]`: one score per target token and source position,
zero at padded source positions (token 0) and at padded target tokens.

* `gradient_x_input`: sum_d x_sd * d f_t / d x_sd (Shrikumar et al. 2016;
  Denil et al. 2014), with x the embedded source tokens (d over the
  embedding) or the image's pixels (d over channels).
* `integrated_gradients` (Sundararajan et al. 2017, eq. 1):
  IG_sd = (x_sd - x'_sd) int_0^1 d f_t(x' + a (x - x')) / d x_sd da, summed
  over d, with the baseline x' = 0 (zero embeddings at the real source
  positions; a black image) and the integral by the trapezoid rule on m
  steps. Completeness (their Prop. 1): sum_s IG_s = f_t(x) - f_t(x'),
  up to the quadrature error (O(1 / m^2) on a smooth path, O(1 / m) across
  the kinks of ReLUs).
* `attention_relevance`: the attention x gradient relevance of Chefer, Gur &
  Wolf (2021), "Generic Attention-model Explainability for Interpreting
  Bi-Modal and Encoder-Decoder Transformers", propagated through every
  attention map of the model (see its docstring).

Any attnx seq2seq model works without model code: images are
differentiated directly; for tokens, `ModelSpec.source_embedding` names the
source table E `[V, dim]`, and the model is run on a copy whose table is
extended by one row per (example, position), E' = [E; x + delta] with
x = E[src] `[b * s, dim]`, reading the source ids V + (b s + j) in place of
src (0 stays 0 at padding). The copy computes exactly what the model
computes, and its gradient with respect to those rows is the gradient with
respect to the embedded source. When the table is also the output
projection (tied embeddings) the logits gain b s columns, which are dropped.
This assumes the model reads its source ids only through that table and
`src != 0`, as every attnx model does.

A model whose config rescales its backward pass for training only (ConvS2S's
`scale_encoder_gradients`, Gehring et al. 2017 sec. 3.4) is differentiated
on a copy with the rescaling off, so gradients are the true derivatives.

Each method compiles once per model structure and input shapes (the jitted
functions take the model's graph definition as a static argument), so
explaining batch after batch of one shape compiles nothing new.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnx.layers import interventions
from attnx.layers.spatial import SpatialMemory

Array = jax.Array

# The tokenizers' special ids (attnx.data.tokenizers), which every attnx model assumes.
PAD_ID = 0
BOS_ID = 1
UNK_ID = 3

# Config fields that only rescale the backward pass for training (turned off here).
TRAINING_GRADIENT_FIELDS = ("scale_encoder_gradients",)


# -- a model as a function of its state ----------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a model (hashable, a `jax.jit` static argument).

    Either the graph definition of an nnx model, whose parameters travel
    apart as its state, or a plain function `(src, tgt_in) -> logits`.
    """

    graphdef: Any = None
    function: Callable[[Array, Array], Array] | None = None

    def logits(self, state: Any, src: Array, tgt_in: Array) -> Array:
        """The model's teacher-forced logits `[b, t, V]`."""
        if self.function is not None:
            return self.function(src, tgt_in)
        return nnx.merge(self.graphdef, state, copy=True)(src, tgt_in)


def split_model(model: Any) -> tuple[ModelDef, Any]:
    """`(ModelDef, state)` of an nnx model, or of a function `(src, tgt_in) -> logits` (state None)."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return ModelDef(graphdef=graphdef), state
    return ModelDef(function=model), None


def teacher_inputs(targets: Array, bos_id: int = BOS_ID) -> Array:
    """The decoder inputs of teacher forcing: bos, then `targets` shifted right by one."""
    targets = jnp.asarray(targets)
    return jnp.pad(targets, ((0, 0), (1, 0)), constant_values=bos_id)[:, :-1]


def token_log_probs(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[y_t]: logits `[..., t, V]`, targets `[..., t]` -> `[..., t]`."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("model_def", "bos_id"))
def _target_log_probs(model_def, state, src, targets, *, bos_id):
    return token_log_probs(model_def.logits(state, src, teacher_inputs(targets, bos_id)), targets)


def target_log_probs(model: Any, src: Array, targets: Array, *, bos_id: int = BOS_ID) -> Array:
    """log p(y_t | x, y_<t) under teacher forcing, `[batch, t]`.

    Args:
      model: an attnx seq2seq model, or any function `(src, tgt_in) -> logits [b, t, V]`.
      src: int tokens `[batch, s]` or an image `[batch, H, W, C]`.
      targets: int `[batch, t]` (0 = padding).
      bos_id: the decoder's first input.
    """
    model_def, state = split_model(model)
    return _target_log_probs(
        model_def, state, jnp.asarray(src), jnp.asarray(targets), bos_id=bos_id
    )


def source_table_path(model: nnx.Module) -> str | None:
    """`ModelSpec.source_embedding` of the model's architecture (None if unregistered)."""
    # Imported here: the registry imports every architecture.
    from attnx.models import MODELS

    for spec in MODELS.values():
        if type(model) is spec.module:
            return spec.source_embedding
    return None


def _resolve(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = module[int(name)] if name.isdigit() else getattr(module, name)
    return module


def _without_training_gradients(model: nnx.Module) -> None:
    """Turns off the config's backward-only rescalings on `model` (a copy)."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        return
    off = {
        field.name: False
        for field in dataclasses.fields(config)
        if field.name in TRAINING_GRADIENT_FIELDS and getattr(config, field.name)
    }
    if off:
        model.config = dataclasses.replace(config, **off)


def _mask_output(scores: Array, src: Array, targets: Array) -> Array:
    """Zeroes `[b, t, s]` scores at padded targets and (token sources) padded positions."""
    keep = (targets != PAD_ID)[:, :, None]
    if jnp.issubdtype(src.dtype, jnp.integer):
        keep = keep & (src != PAD_ID)[:, None, :]
    return jnp.where(keep, scores, 0.0)


def _per_token(scores: Array, src: Array, targets: Array) -> Array:
    """`[t, b, s]` (leading axis: the explained token) -> `[b, t, s]`, padding zeroed."""
    return _mask_output(jnp.moveaxis(scores, 0, 1), src, targets)


# -- the differentiable input -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Input:
    """What `_input_function` needs besides arrays (static: hashable)."""

    graphdef: Any
    table_path: str | None
    vocab: int | None
    bos_id: int


def _input_function(
    spec: _Input, state: Any, src: Array, targets: Array
) -> tuple[Callable[[Array], Array], Array]:
    """`(f, x)`: f(x) = log p(y_t) `[b, t]` as a function of the source input x.

    x is the embedded source `[b, s, dim]` for tokens, the image `[b, H, W, C]`
    otherwise (see the module docstring for the extended table).
    """
    tgt_in = teacher_inputs(targets, spec.bos_id)

    def copy():
        model = nnx.merge(spec.graphdef, state, copy=True)
        _without_training_gradients(model)
        return model

    if not jnp.issubdtype(src.dtype, jnp.integer):

        def f_image(image):
            return token_log_probs(copy()(image, tgt_in), targets)

        return f_image, src.astype(jnp.float32)

    table = _resolve(copy(), spec.table_path)[...]
    rows, width = table.shape
    batch, length = src.shape
    ids = jnp.where(src != PAD_ID, rows + jnp.arange(batch * length).reshape(batch, length), src)

    def f_tokens(embedded):
        model = copy()
        extra = embedded.reshape(batch * length, width).astype(table.dtype)
        _resolve(model, spec.table_path).set_value(jnp.concatenate([table, extra]))
        logits = model(ids.astype(src.dtype), tgt_in)[..., : spec.vocab]
        return token_log_probs(logits, targets)

    return f_tokens, jnp.take(table, src, axis=0).astype(jnp.float32)


def _per_token_gradients(f: Callable[[Array], Array], x: Array, steps: int) -> Array:
    """d f_t / d x for every target position t: `[t, *x.shape]` (examples are independent)."""
    _, vjp = jax.vjp(f, x)
    batch = x.shape[0]
    cotangents = jnp.broadcast_to(jnp.eye(steps)[:, None, :], (steps, batch, steps))
    return jax.vmap(lambda c: vjp(c)[0])(cotangents)


def image_grid(model: nnx.Module, src: Array) -> tuple[int, int]:
    """The attention grid `(H', W')` of an image model (from its encoding's `SpatialMemory`)."""
    encoded = jax.eval_shape(lambda: model.encode(src))
    memories = [
        leaf
        for leaf in jax.tree.leaves(encoded, is_leaf=lambda x: isinstance(x, SpatialMemory))
        if isinstance(leaf, SpatialMemory)
    ]
    if not memories or memories[0].grid is None:
        raise ValueError("image_grid: the model's encoding holds no SpatialMemory with a grid")
    return tuple(memories[0].grid)


def pixel_cells(image_shape: Sequence[int], grid: tuple[int, int]) -> np.ndarray:
    """The grid cell (row-major index) of every pixel, `[H, W]` ints.

    Pixel (i, j) of an H x W image belongs to cell (floor(i H' / H),
    floor(j W' / W)) of the H' x W' grid: the cells tile the image in equal
    rectangles (exactly the pooling windows when H' divides H, as with the
    captioner's 2 x 2 max-pools).
    """
    height, width = image_shape
    rows = (np.arange(height) * grid[0]) // height
    cols = (np.arange(width) * grid[1]) // width
    return rows[:, None] * grid[1] + cols[None, :]


def _to_positions(scores: Array, grid: tuple[int, int] | None) -> Array:
    """`[t, b, s]` token scores pass; `[t, b, H, W]` pixel scores -> `[t, b, H W]` or cells."""
    if scores.ndim == 3:
        return scores
    steps, batch, height, width = scores.shape
    if grid is None:
        return scores.reshape(steps, batch, height * width)
    cells = jnp.asarray(pixel_cells((height, width), grid)).reshape(-1)
    one_hot = jax.nn.one_hot(cells, grid[0] * grid[1], dtype=scores.dtype)
    return jnp.einsum("tbp,pl->tbl", scores.reshape(steps, batch, -1), one_hot)


def _prepare(model, src, targets, source_embedding, bos_id, pool_to_grid):
    """Arrays, the static `_Input`, the model's state and the grid to pool to (or None)."""
    if not isinstance(model, nnx.Module):
        raise TypeError("attribution: the model must be an nnx.Module (an attnx seq2seq model)")
    src, targets = jnp.asarray(src), jnp.asarray(targets)
    image = not jnp.issubdtype(src.dtype, jnp.integer)
    table_path = vocab = None
    if not image:
        table_path = source_embedding or source_table_path(model)
        if table_path is None:
            raise ValueError(
                "attribution: token sources need the source embedding table: register the "
                "architecture with ModelSpec.source_embedding or pass source_embedding='path'"
            )
        vocab = jax.eval_shape(lambda: model(src, teacher_inputs(targets, bos_id))).shape[-1]
    grid = image_grid(model, src) if image and pool_to_grid else None
    graphdef, state = nnx.split(model)
    return src, targets, _Input(graphdef, table_path, vocab, bos_id), state, grid


# -- gradient x input and integrated gradients ---------------------------------


@functools.partial(jax.jit, static_argnames=("spec", "grid"))
def _gradient_x_input(spec, state, src, targets, *, grid):
    f, x = _input_function(spec, state, src, targets)
    grads = _per_token_gradients(f, x, targets.shape[1])
    return _per_token(_to_positions(jnp.sum(grads * x, axis=-1), grid), src, targets)


def gradient_x_input(
    model: nnx.Module,
    src: Array,
    targets: Array,
    *,
    pool_to_grid: bool = False,
    source_embedding: str | None = None,
    bos_id: int = BOS_ID,
) -> Array:
    """Gradient x input: A[b, t, s] = sum_d x_sd * d log p(y_t) / d x_sd.

    Args:
      model: an attnx seq2seq model.
      src: int tokens `[batch, s]` (x = their embeddings, d over the embedding)
        or an image `[batch, H, W, C]` (x = pixels, d over channels).
      targets: int `[batch, t]`, 0 = padding.
      pool_to_grid: images: sum the pixel scores over each attention grid cell
        (`pixel_cells`), giving s = H' W' cells instead of s = H W pixels.
      source_embedding: path of the source table, overriding `ModelSpec.source_embedding`.
      bos_id: the decoder's first input.

    Returns:
      `[batch, t, s]`, zero at padding (row-major pixels or cells for images).
    """
    src, targets, spec, state, grid = _prepare(
        model, src, targets, source_embedding, bos_id, pool_to_grid
    )
    return _gradient_x_input(spec, state, src, targets, grid=grid)


@functools.partial(jax.jit, static_argnames=("spec",))
def _source_scaled_log_probs(spec, state, src, targets, scale):
    f, x = _input_function(spec, state, src, targets)
    return f(scale * x)


def source_scaled_log_probs(
    model: nnx.Module,
    src: Array,
    targets: Array,
    *,
    scale: float,
    source_embedding: str | None = None,
    bos_id: int = BOS_ID,
) -> Array:
    """log p(y_t) `[batch, t]` with the source input x multiplied by `scale`.

    x is what the attributions differentiate (the embedded real source tokens,
    or the pixels); `scale=1` is the model itself and `scale=0` the baseline
    of `integrated_gradients`, so `f(1) - f(0)` is what its scores sum to.
    """
    src, targets, spec, state, _ = _prepare(model, src, targets, source_embedding, bos_id, False)
    return _source_scaled_log_probs(spec, state, src, targets, jnp.asarray(scale, jnp.float32))


def trapezoid_weights(steps: int) -> np.ndarray:
    """Weights w_k of int_0^1 g(a) da ~ sum_k w_k g(k / m), k = 0..m (trapezoid rule)."""
    if steps < 1:
        raise ValueError(f"integrated_gradients: steps must be >= 1, got {steps}")
    weights = np.full(steps + 1, 1.0 / steps)
    weights[[0, -1]] /= 2.0
    return weights


@functools.partial(jax.jit, static_argnames=("spec", "grid", "steps", "batch_size"))
def _integrated_gradients(spec, state, src, targets, *, grid, steps, batch_size):
    f, x = _input_function(spec, state, src, targets)
    alphas = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)

    def at(alpha):
        return _per_token_gradients(f, alpha * x, targets.shape[1])

    grads = jax.lax.map(at, alphas, batch_size=batch_size or steps + 1)
    average = jnp.tensordot(jnp.asarray(trapezoid_weights(steps), jnp.float32), grads, axes=1)
    return _per_token(_to_positions(jnp.sum(average * x, axis=-1), grid), src, targets)


def integrated_gradients(
    model: nnx.Module,
    src: Array,
    targets: Array,
    *,
    steps: int = 32,
    batch_size: int | None = None,
    pool_to_grid: bool = False,
    source_embedding: str | None = None,
    bos_id: int = BOS_ID,
) -> Array:
    """Integrated gradients with a zero baseline (Sundararajan et al. 2017).

      IG[b, t, s] = sum_d x_sd sum_{k=0..m} w_k d log p(y_t) / d x_sd |_{x = (k/m) x}

    with the trapezoid weights w (`trapezoid_weights`), x the embedded source
    (baseline: zero embeddings at the real positions) or the pixels
    (baseline: a black image). sum_s IG[b, t, s] = f_t(x) - f_t(0) up to the
    quadrature error (`source_scaled_log_probs` gives both ends).

    Args:
      model, src, targets, pool_to_grid, source_embedding, bos_id: as `gradient_x_input`.
      steps: m, the number of intervals of [0, 1]; m + 1 gradient evaluations.
      batch_size: how many of the m + 1 points to differentiate at once (vmap);
        None = all of them (memory grows with m).

    Returns:
      `[batch, t, s]`, zero at padding.
    """
    trapezoid_weights(steps)  # checks steps
    src, targets, spec, state, grid = _prepare(
        model, src, targets, source_embedding, bos_id, pool_to_grid
    )
    return _integrated_gradients(
        spec, state, src, targets, grid=grid, steps=steps, batch_size=batch_size
    )


# -- attention x gradient relevance (Chefer et al. 2021) ------------------------


@dataclasses.dataclass(frozen=True)
class _Sites:
    """The attention sites of a stepwise run: the encoder's, then those of one decoder step."""

    encoder: tuple[jax.ShapeDtypeStruct, ...]
    decoder: tuple[jax.ShapeDtypeStruct, ...]
    decoder_self: tuple[bool, ...]


def _stepwise(model, src, tgt_in, encoder_edit, step_deltas):
    """Teacher forcing through `encode`, `init_cache` and one `decode_step` per target position.

    The steps run in a `lax.scan` whose carry is the model's decoding cache
    and whose inputs are each step's token and per-site deltas
    (`step_deltas[j]`: `[t, ...]` for the step's site j), so every step's
    attention is its own site even in models whose teacher-forced decoder is
    itself a `lax.scan`, and the program holds one step, however long the target.

    Returns:
      logits `[t, b, V]` and the maps of the steps' sites, `[t, ...]` each.
    """
    with interventions.attention_edit(encoder_edit):
        encoded = model.encode(src)
    model.init_cache(encoded, tgt_in.shape[1])
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)

    def step(cache, inputs):
        tokens, deltas = inputs
        stepper = nnx.merge(graphdef, cache, rest, copy=True)
        recorder = interventions.Recorder()
        edit = interventions.chain(interventions.add_deltas(deltas), recorder)
        with interventions.attention_edit(edit):
            logits = stepper.decode_step(tokens[:, None])
        return nnx.state(stepper, nnx.Cache), (logits, recorder.weights)

    _, (logits, maps) = jax.lax.scan(step, cache, (tgt_in.T, list(step_deltas)))
    return logits, maps


def _probe_sites(graphdef, state, src, tgt_in) -> _Sites:
    """Shapes of every site (a cache of t positions), and which decoder sites are self-attention.

    A decoder site attends the target when its key axis follows the cache
    length: one step is traced (`eval_shape`, nothing runs) with two cache
    lengths and the key lengths compared.
    """
    steps = tgt_in.shape[1]

    def shapes(cache_length):
        def run(state):
            encoder, decoder = interventions.Recorder(), interventions.Recorder()
            model = nnx.merge(graphdef, state, copy=True)
            with interventions.attention_edit(encoder):
                encoded = model.encode(src)
            model.init_cache(encoded, cache_length)
            with interventions.attention_edit(decoder):
                model.decode_step(tgt_in[:, :1])
            return encoder.weights, decoder.weights

        return jax.eval_shape(run, state)

    # A cache of `steps`: the self-attention rows then span exactly the target.
    encoder, decoder = shapes(steps)
    _, other = shapes(steps - 1 if steps > 1 else 2)
    decoder_self = tuple(a.shape[-1] != b.shape[-1] for a, b in zip(decoder, other, strict=True))
    return _Sites(tuple(encoder), tuple(decoder), decoder_self)


def head_mean_positive(gradient: Array, weights: Array) -> Array:
    """Abar = E_h[(grad A ⊙ A)^+] (Chefer et al. 2021, eq. 5): `[..., h, q, k]` -> `[..., q, k]`."""
    return jnp.mean(jnp.maximum(gradient * weights, 0.0), axis=-3)


def normalize_self_relevance(relevance: Array) -> Array:
    """R̄ = S(R - I) + I, S dividing each row by its sum (Chefer et al. 2021, eq. 8-9).

    Rows of R - I that sum to 0 (no accumulated relevance) stay 0, so R̄ is I there.
    """
    eye = jnp.eye(relevance.shape[-1], dtype=relevance.dtype)
    residual = relevance - eye
    total = jnp.sum(residual, axis=-1, keepdims=True)
    return jnp.where(total != 0, residual / jnp.where(total != 0, total, 1.0), 0.0) + eye


def propagate_relevance(
    encoder_maps: Sequence[Array], decoder_maps: Sequence[tuple[Array, bool]]
) -> Array:
    """Chefer et al. (2021) relevance propagation for an encoder-decoder.

    Maps are Abar's (`head_mean_positive`) with any leading batch axes:
    encoder self-attention `[..., s, s]`, decoder maps in the order the
    decoder runs them, `([..., t, t], True)` for self-attention and
    `([..., t, s], False)` for attention to the source. With R^ss = I_s,
    R^tt = I_t, R^ts = 0:

      encoder self-attention:  R^ss += Abar R^ss                          (eq. 6)
      decoder self-attention:  R^tt += Abar R^tt,  R^ts += Abar R^ts      (eq. 6-7)
      decoder -> source:       R^ts += (R̄^tt)^T Abar R̄^ss                (eq. 10)

    (eq. 11, R^tt += Abar R^st, adds nothing: no source token attends the
    target, so R^st = 0.) Returns R^ts `[..., t, s]`.
    """
    if not decoder_maps:
        raise ValueError("propagate_relevance: the model has no decoder attention")
    leading = decoder_maps[0][0].shape[:-2]
    t = decoder_maps[0][0].shape[-2]
    s = next(m.shape[-1] for m, is_self in decoder_maps if not is_self)
    r_ss = jnp.broadcast_to(jnp.eye(s), (*leading, s, s))
    for abar in encoder_maps:
        r_ss = r_ss + abar @ r_ss
    r_tt = jnp.broadcast_to(jnp.eye(t), (*leading, t, t))
    r_ts = jnp.zeros((*leading, t, s))
    r_ss_bar = normalize_self_relevance(r_ss)
    for abar, is_self in decoder_maps:
        if is_self:
            r_tt, r_ts = r_tt + abar @ r_tt, r_ts + abar @ r_ts
        else:
            r_tt_bar = normalize_self_relevance(r_tt)
            r_ts = r_ts + jnp.swapaxes(r_tt_bar, -1, -2) @ abar @ r_ss_bar
    return r_ts


def attention_relevance(
    model: nnx.Module, src: Array, targets: Array, *, bos_id: int = BOS_ID
) -> Array:
    """Attention x gradient relevance (Chefer, Gur & Wolf 2021) of each target token.

    For target token t, every attention map A of the model (`[heads, q, k]`)
    is weighed by the gradient of log p(y_t) with respect to it, obtained
    through the zero-delta intervention (`attnx.layers.interventions.add_deltas`)
    and `jax.vjp`, one cotangent per t:

      Abar = E_h[(d log p(y_t) / dA ⊙ A)^+]        (eq. 5)

    and the Abar's are propagated by `propagate_relevance` (eq. 6-10; the
    encoder-decoder case of their sec. 3.3). The score of source position j
    is R^ts[t, j]. The model runs step by step (`init_cache` and
    `decode_step`), so that the attention of every step is its own site even
    in models whose teacher-forced decoder is a `lax.scan`. Per architecture:

    * Transformer: encoder self-attention, then per decoder layer masked
      self-attention and cross-attention, as in the paper.
    * RNN (Bahdanau, Luong global or local): one attention, no
      self-attention, so R^ts = Abar: the relevance of y_t is
      E_h[(grad ⊙ A)^+] of the map's row t (the attention that produced y_t).
      The recurrence that carries earlier contexts is not attention and is
      not propagated.
    * ConvS2S: cross-attention only, in every decoder layer with an
      attention; convolutions are not attention (they count as identity),
      so R^ts = sum over layers of Abar_l.
    * Captioner: one spatial attention over the grid, as the RNN (s = grid cells).

    Args:
      model: an attnx seq2seq model (with `encode`, `init_cache`, `decode_step`).
      src: int tokens `[batch, s]` or an image `[batch, H, W, C]`.
      targets: int `[batch, t]`, 0 = padding.
      bos_id: the decoder's first input.

    Returns:
      `[batch, t, s]` relevance (s = grid cells for images), zero at padding.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError("attention_relevance: the model must be an attnx seq2seq nnx.Module")
    src, targets = jnp.asarray(src), jnp.asarray(targets)
    steps = targets.shape[1]
    graphdef, state = nnx.split(model)
    sites = _probe_sites(graphdef, state, src, teacher_inputs(targets, bos_id))
    encoder_deltas = [jnp.zeros(a.shape, a.dtype) for a in sites.encoder]
    step_deltas = [jnp.zeros((steps, *a.shape), a.dtype) for a in sites.decoder]
    return _attention_relevance(
        graphdef,
        state,
        src,
        targets,
        encoder_deltas,
        step_deltas,
        decoder_self=sites.decoder_self,
        bos_id=bos_id,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "decoder_self", "bos_id"))
def _attention_relevance(
    graphdef, state, src, targets, encoder_deltas, step_deltas, *, decoder_self, bos_id
):
    steps = targets.shape[1]

    def log_probs(encoder_deltas, step_deltas):
        encoder = interventions.Recorder()
        logits, decoder_maps = _stepwise(
            nnx.merge(graphdef, state, copy=True),
            src,
            teacher_inputs(targets, bos_id),
            interventions.chain(interventions.add_deltas(encoder_deltas), encoder),
            step_deltas,
        )
        value = token_log_probs(jnp.moveaxis(logits, 0, 1), targets)
        return value, (encoder.weights, decoder_maps)

    _, vjp, (encoder_maps, decoder_maps) = jax.vjp(
        log_probs, encoder_deltas, step_deltas, has_aux=True
    )
    batch = targets.shape[0]
    cotangents = jnp.broadcast_to(jnp.eye(steps)[:, None, :], (steps, batch, steps))
    # Leading axis of every gradient: the explained token y_t.
    encoder_grads, decoder_grads = jax.vmap(vjp)(cotangents)

    def rows_as_queries(per_step):
        # [.., steps, b, h, 1, k] -> [.., b, h, steps, k]: step i is query row i.
        return jnp.moveaxis(per_step[..., 0, :], -4, -2)

    encoder_abar = [
        head_mean_positive(g, a) for g, a in zip(encoder_grads, encoder_maps, strict=True)
    ]
    decoder_abar = [
        (head_mean_positive(rows_as_queries(g), rows_as_queries(a)), is_self)
        for g, a, is_self in zip(decoder_grads, decoder_maps, decoder_self, strict=True)
    ]
    relevance = propagate_relevance(encoder_abar, decoder_abar)  # [t_out, b, t, s]
    rows = jnp.arange(steps)
    return _per_token(relevance[rows, :, rows, :], src, targets)  # row t of y_t's relevance


__all__ = [
    "BOS_ID",
    "PAD_ID",
    "UNK_ID",
    "ModelDef",
    "attention_relevance",
    "gradient_x_input",
    "head_mean_positive",
    "image_grid",
    "integrated_gradients",
    "normalize_self_relevance",
    "pixel_cells",
    "propagate_relevance",
    "source_scaled_log_probs",
    "source_table_path",
    "split_model",
    "target_log_probs",
    "teacher_inputs",
    "token_log_probs",
    "trapezoid_weights",
]
