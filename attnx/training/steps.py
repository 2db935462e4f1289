"""Train and evaluation steps: pure functions of (state, batch), compiled by the loop.

The model travels as `nnx.split` parts: a static `graphdef`, the float32
parameters (in `TrainState.params`) and the rest of its state (`rest`: RNG
streams and other non-parameter variables), which the step merges back into
a module. Dropout keys come from `fold_in(state.rng, state.step)` and are
reseeded into the model every step, so a resumed run draws exactly the keys
the uninterrupted run would have; the captioner's hard-attention location
samples get their own key from the same step key.

Hard attention (Xu et al. 2015, sec. 4.1) trains with the REINFORCE surrogate
of `caption_losses.hard_attention_loss`; its moving-average baseline b is part
of `TrainState`, updated once per optimizer step from the mean log p(y | s, a)
of every real caption of the global batch (all micro-batches).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnx.models.caption_losses import captioner_loss, hard_attention_loss, update_baseline
from attnx.training import metrics as metrics_lib
from attnx.training.optimizers import accumulate_gradients

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
      baseline: float32 scalar, hard attention's moving average b of
        log p(y | s, a) (sec. 4.1); 0 and unused for every other model.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    baseline: Array

    @classmethod
    def create(
        cls, params: Any, optimizer: optax.GradientTransformation, key: Array
    ) -> "TrainState":
        """The state before the first step: step 0, fresh optimizer state, baseline 0."""
        return cls(
            step=jnp.zeros([], jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(key),
            baseline=jnp.zeros([], jnp.float32),
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


@dataclasses.dataclass(frozen=True)
class HardAttention:
    """REINFORCE settings of hard attention (eq. 12): config.train's reward, entropy, decay."""

    reward_weight: float = 0.1
    entropy_weight: float = 0.002
    baseline_decay: float = 0.9


def step_keys(rng: Array) -> dict[str, Array]:
    """The model's RNG streams for one step: dropout, and the location samples of hard attention."""
    return {"dropout": rng, "location": jax.random.fold_in(rng, 1)}


def make_loss_fn(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    *,
    label_smoothing: float,
    attention_penalty: float = 0.0,
    hard_attention: HardAttention | None = None,
    baseline: Array | float = 0.0,
) -> Callable[..., tuple[Array, tuple[Array, Any]]]:
    """`loss_fn(params, batch, rng) -> (loss_sum, (token_count, metric_sums))`.

    `attention_penalty` > 0 adds Show, Attend and Tell's doubly stochastic
    regulariser (lambda of eq. 14; for the captioner), scaled by the token
    count so that the step's token-mean loss carries it once.

    With `hard_attention` the (label-smoothed) token loss gains the REINFORCE
    and entropy terms of `hard_attention_loss` against `baseline` (token-mean,
    scaled by the count like the penalty); the metric sums then also hold
    'reinforce', 'entropy' and 'log_likelihood' (summed over the captions that
    have a token, counted per caption) for the baseline update.
    """

    def loss_fn(params, batch, rng):
        # copy: fresh Variables in this trace (rest is a constant from outside it).
        model = nnx.merge(graphdef, params, rest, copy=True)
        if rng is not None:
            nnx.reseed(model, **step_keys(rng))
        targets = batch["targets"]
        weights = (targets > 0).astype(jnp.float32)
        if attention_penalty > 0 or hard_attention is not None:
            logits, attention = forward(model, batch, train=True, return_weights=True)
        else:
            logits = forward(model, batch, train=True)
        sums = metrics_lib.token_metrics(logits, targets, weights, label_smoothing)
        loss_sum, count = sums["loss"]
        if hard_attention is not None:
            hard_loss, parts = hard_attention_loss(
                logits,
                targets,
                attention,
                baseline,
                reward_weight=hard_attention.reward_weight,
                entropy_weight=hard_attention.entropy_weight,
                lam=attention_penalty,
                token_weights=weights,
            )
            # The smoothed token loss stands in for the plain NLL of the surrogate.
            loss_sum = loss_sum + (hard_loss - parts["nll"]) * count
            has_tokens = jnp.any(targets > 0, axis=-1).astype(jnp.float32)
            sums["reinforce"] = (parts["reinforce"] * count, count)
            sums["entropy"] = (parts["entropy"] * count, count)
            sums["log_likelihood"] = (
                jnp.sum(parts["log_likelihood"] * has_tokens),
                jnp.sum(has_tokens),
            )
            if attention_penalty > 0:
                sums["penalty"] = (parts["penalty"] * count, count)
        elif attention_penalty > 0:
            _, parts = captioner_loss(logits, targets, attention, lam=attention_penalty)
            loss_sum = loss_sum + parts["penalty"] * count
            sums["penalty"] = (parts["penalty"] * count, count)
        return loss_sum, (count, sums)

    return loss_fn


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    optimizer: optax.GradientTransformation,
    *,
    label_smoothing: float,
    grad_accum_steps: int = 1,
    attention_penalty: float = 0.0,
    hard_attention: HardAttention | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, tuple[Array, Array]]]]:
    """One optimizer update over a global batch (split into `grad_accum_steps` passes)."""

    def train_step(state: TrainState, batch: Batch):
        loss_fn = make_loss_fn(
            graphdef,
            rest,
            label_smoothing=label_smoothing,
            attention_penalty=attention_penalty,
            hard_attention=hard_attention,
            baseline=state.baseline,
        )
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (_, _, sums), grads = accumulate_gradients(
            loss_fn, state.params, batch, grad_accum_steps, rng=rng
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        sums = dict(sums)
        sums["grad_norm"] = (optax.tree.norm(grads), jnp.ones([], jnp.float32))
        baseline = state.baseline
        if hard_attention is not None:
            # b_k = decay b_{k-1} + (1 - decay) mean log p(y | s, a) over the
            # batch's real captions; a batch without any keeps b.
            total, captions = sums.pop("log_likelihood")
            mean = total / jnp.maximum(captions, 1.0)
            updated = update_baseline(baseline, mean[None], hard_attention.baseline_decay)
            baseline = jnp.where(captions > 0, updated, baseline)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, baseline=baseline
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
