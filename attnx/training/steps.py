"""Train and evaluation steps: pure functions of (state, batch), compiled by the loop.

The model travels as `nnx.split` parts: a static `graphdef`, the float32
parameters (in `TrainState.params`) and the rest of its state (`rest`: RNG
streams and other non-parameter variables), which the step merges back into
a module. Dropout keys come from `fold_in(state.rng, state.step)` and are
reseeded into the model every step, so a resumed run draws exactly the keys
the uninterrupted run would have; the captioner's hard-attention location
samples get their own key from the same step key.

What a model adds to the token cross-entropy comes from its spec
(`attnx.models.loss_terms.LossTerms`): the terms join the summed token loss
of each micro-batch, and their state (`TrainState.extra`, e.g. hard
attention's moving-average baseline) is updated once per optimizer step from
the metric sums of the whole global batch (all micro-batches).

Gradient accumulation is explicit, inside the jitted train step
(`accumulate_gradients`), not `optax.MultiSteps`: the step receives the whole
global batch, scans over `grad_accum_steps` micro-batches summing the gradients
of the *summed* token loss, and divides once by the total token weight. That
is the gradient of the large batch up to float summation order, even when the
micro-batches hold different numbers of real tokens (a mean of per-micro-batch
means is not), and one call of the step stays one optimizer update, so the
step counter, the schedule and checkpoints mean the same with or without
accumulation.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnx.models.loss_terms import LossTerms
from attnx.training import metrics as metrics_lib

Array = jax.Array
Batch = Mapping[str, Array]
BOS_ID = 1


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; what a checkpoint holds besides the data iterator.

    Attributes:
      step: int32 scalar, optimizer updates done.
      params: the model's `nnx.Param` state (float32).
      opt_state: the optax state.
      rng: raw PRNG key data (uint32 `[2]`), the root of every dropout key.
      extra: the state of the model's loss terms (`LossTerms.initial_state`),
        e.g. `{'baseline': b}` for hard attention; {} for most models.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    extra: Any

    @classmethod
    def create(
        cls,
        params: Any,
        optimizer: optax.GradientTransformation,
        key: Array,
        loss_terms: LossTerms | None = None,
    ) -> "TrainState":
        """The state before the first step: step 0, fresh optimizer and loss-term state."""
        return cls(
            step=jnp.zeros([], jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(key),
            extra={} if loss_terms is None else loss_terms.initial_state(),
        )


def shift_right(targets: Array, segmentation: Array | None = None) -> Array:
    """Decoder inputs for teacher forcing: bos, then the targets shifted by one.

    In packed rows every example restarts with bos (where its position is 0).
    """
    shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=BOS_ID)[:, :-1]
    if segmentation is not None:
        starts = jnp.concatenate(
            [jnp.ones_like(segmentation[:, :1], bool), segmentation[:, 1:] != segmentation[:, :-1]],
            axis=1,
        )
        shifted = jnp.where(starts, BOS_ID, shifted)
    return shifted


def forward(
    model: nnx.Module, batch: Batch, *, train: bool, return_weights: bool = False
) -> Array | tuple[Array, dict[str, Array]]:
    """Teacher-forced logits of any attnx seq2seq model on a pipeline batch."""
    targets = batch["targets"]
    tgt_in = shift_right(targets, batch.get("targets_segmentation"))
    if "image" in batch:
        return model(batch["image"], tgt_in, train=train, return_weights=return_weights)
    packing = {}
    if "inputs_segmentation" in batch:
        packing = dict(
            src_segment_ids=batch["inputs_segmentation"],
            src_positions=batch["inputs_position"],
            tgt_segment_ids=batch["targets_segmentation"],
            tgt_positions=batch["targets_position"],
        )
    return model(batch["inputs"], tgt_in, train=train, return_weights=return_weights, **packing)


def step_keys(rng: Array) -> dict[str, Array]:
    """The model's RNG streams for one step: dropout, and the location samples of hard attention."""
    return {"dropout": rng, "location": jax.random.fold_in(rng, 1)}


def make_loss_fn(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    *,
    label_smoothing: float,
    loss_terms: LossTerms | None = None,
    extra: Any = None,
) -> Callable[..., tuple[Array, tuple[Array, Any]]]:
    """`loss_fn(params, batch, rng) -> (loss_sum, (token_count, metric_sums))`.

    The (label-smoothed) token loss, summed, plus the model's `loss_terms`
    evaluated with their state `extra`; the metric sums then also hold the
    terms' own (e.g. 'penalty', 'reinforce', 'entropy').
    """

    def loss_fn(params, batch, rng):
        # copy: fresh Variables in this trace (rest is a constant from outside it).
        model = nnx.merge(graphdef, params, rest, copy=True)
        if rng is not None:
            nnx.reseed(model, **step_keys(rng))
        targets = batch["targets"]
        weights = (targets > 0).astype(jnp.float32)
        attention = None
        if loss_terms is not None and loss_terms.needs_attention:
            logits, attention = forward(model, batch, train=True, return_weights=True)
        else:
            logits = forward(model, batch, train=True)
        sums = metrics_lib.token_metrics(logits, targets, weights, label_smoothing)
        loss_sum, count = sums["loss"]
        if loss_terms is not None:
            loss_sum, more = loss_terms.add(
                loss_sum,
                count,
                logits=logits,
                targets=targets,
                token_weights=weights,
                attention=attention,
                state=extra,
            )
            sums.update(more)
        return loss_sum, (count, sums)

    return loss_fn


def split_micro_batches(batch: Any, num_micro_batches: int) -> Any:
    """Reshapes every leaf [B, ...] of `batch` to [k, B/k, ...]; micro-batch i = rows i::k.

    Strided rather than contiguous: when the batch axis is sharded over devices,
    each device's contiguous block of rows then holds rows of every micro-batch,
    so no micro-batch lives on a subset of the devices.
    """
    k = num_micro_batches
    if int(k) != k or k < 1:
        raise ValueError(f"config.train.grad_accum_steps={k!r} must be an int >= 1.")
    leaves = jax.tree.leaves(batch)
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"Batch leaves have different leading (batch) sizes {sorted(sizes)}.")
    (size,) = sizes
    if size % k:
        raise ValueError(
            f"Batch size {size} is not divisible by config.train.grad_accum_steps={k}."
        )
    return jax.tree.map(lambda x: x.reshape(size // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def accumulate_gradients(
    loss_fn: Callable[..., tuple[jax.Array, tuple[jax.Array, Any]]],
    params: Any,
    batch: Any,
    num_micro_batches: int,
    rng: jax.Array | None = None,
) -> tuple[tuple[jax.Array, jax.Array, Any], Any]:
    """Gradient of the token-mean loss of `batch`, over `num_micro_batches` passes.

    Args:
      loss_fn: `loss_fn(params, micro_batch, rng) -> (loss_sum, (weight_sum, aux))`
        where loss_sum is the *summed* (not averaged) loss, weight_sum the number
        (weight) of the tokens it sums over, and aux a pytree of sums (e.g.
        metric (sum, count) pairs) that is added across micro-batches.
      params: the float32 parameters (any pytree, e.g. an nnx.State).
      batch: pytree of arrays with a common leading batch axis B.
      num_micro_batches: k (config.train.grad_accum_steps); B % k == 0.
      rng: optional key; micro-batch i gets fold_in(rng, i) (the key itself when k = 1).

    Returns:
      ((loss_sum, weight_sum, aux_sum), grads) with grads = d loss_sum / d params
      divided by the total weight_sum (zero when there is no weight). Within
      float summation order this equals the gradient of one pass over `batch`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro_batches == 1:
        (loss_sum, (weight_sum, aux)), grads = grad_fn(params, batch, rng)
    else:
        micro_batches = split_micro_batches(batch, num_micro_batches)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        out_shapes = jax.eval_shape(loss_fn, params, first, rng)

        def zeros_like_shape(s):
            return jnp.zeros(s.shape, s.dtype)

        init = (
            jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
            jnp.zeros([], jnp.float32),
            jnp.zeros([], jnp.float32),
            jax.tree.map(zeros_like_shape, out_shapes[1][1]),
        )

        def body(carry, inputs):
            grad_sum, loss_acc, weight_acc, aux_acc = carry
            index, micro_batch = inputs
            micro_rng = None if rng is None else jax.random.fold_in(rng, index)
            (loss, (weight, aux)), grads = grad_fn(params, micro_batch, micro_rng)
            carry = (
                jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads),
                loss_acc + loss,
                weight_acc + weight,
                jax.tree.map(jnp.add, aux_acc, aux),
            )
            return carry, None

        indices = jnp.arange(num_micro_batches)
        (grads, loss_sum, weight_sum, aux), _ = jax.lax.scan(body, init, (indices, micro_batches))
    denominator = jnp.where(weight_sum > 0, weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    return (loss_sum, weight_sum, aux), grads


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    optimizer: optax.GradientTransformation,
    *,
    label_smoothing: float,
    grad_accum_steps: int = 1,
    loss_terms: LossTerms | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, tuple[Array, Array]]]]:
    """One optimizer update over a global batch (split into `grad_accum_steps` passes)."""

    def train_step(state: TrainState, batch: Batch):
        loss_fn = make_loss_fn(
            graphdef,
            rest,
            label_smoothing=label_smoothing,
            loss_terms=loss_terms,
            extra=state.extra,
        )
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (_, _, sums), grads = accumulate_gradients(
            loss_fn, state.params, batch, grad_accum_steps, rng=rng
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        sums = dict(sums)
        sums["grad_norm"] = (optax.tree.norm(grads), jnp.ones([], jnp.float32))
        extra = state.extra
        if loss_terms is not None:
            extra, sums = loss_terms.update(extra, sums)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, extra=extra
        )
        return new_state, sums

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, rest: nnx.State, *, label_smoothing: float
) -> Callable[[Any, Batch], dict[str, tuple[Array, Array]]]:
    """Teacher-forced loss, token accuracy and perplexity sums of one batch (no dropout)."""

    def eval_step(params, batch: Batch):
        # copy: fresh Variables in this trace (rest is a constant from outside it).
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits = forward(model, batch, train=False)
        targets = batch["targets"]
        return metrics_lib.token_metrics(logits, targets, targets > 0, label_smoothing)

    return eval_step
