"""What a model adds to the token cross-entropy, and the state that carries between steps.

Every architecture trains on the (label-smoothed) token cross-entropy. Some
add terms: Show, Attend and Tell's doubly stochastic regulariser (eq. 14) and
hard attention's REINFORCE surrogate, whose moving-average baseline is state
the optimizer steps carry. The training step asks the model's spec for its
`LossTerms` (`ModelSpec.loss_terms`) and never looks at the model's name:

    terms = spec.loss_terms(model_config, config.train)   # or None
    state = TrainState.create(..., extra=terms.initial_state())

    # in the jitted loss, per micro-batch:
    loss_sum, sums = terms.add(loss_sum, count, logits=..., targets=...,
                               token_weights=..., attention=..., state=state.extra)
    # once per optimizer step, over the summed metrics of the global batch:
    extra, sums = terms.update(state.extra, sums)

A new architecture with its own objective writes one `LossTerms` subclass and
names its factory in its `ModelSpec` entry.
"""

from collections.abc import Mapping
from typing import Any

import jax

Array = jax.Array
# Metric sums, as the step adds them over micro-batches: name -> (sum, count).
Sums = dict[str, tuple[Array, Array]]


class LossTerms:
    """Extra loss terms and their train state; every method runs inside `jax.jit`.

    Attributes:
      needs_attention: the step runs the model with `return_weights=True` and
        passes its weights dict as `attention`.
    """

    needs_attention: bool = False

    def initial_state(self) -> dict[str, Array]:
        """The extra train state before the first step (a pytree of arrays; {} for none)."""
        return {}

    def add(
        self,
        loss_sum: Array,
        count: Array,
        *,
        logits: Array,
        targets: Array,
        token_weights: Array,
        attention: Mapping[str, Array] | None,
        state: Mapping[str, Array],
    ) -> tuple[Array, Sums]:
        """The micro-batch's loss with the terms added, and metric sums to log.

        Args:
          loss_sum: the summed token loss of the micro-batch (its gradient is taken).
          count: the number of real tokens it sums over; the step divides the
            gradient of the global batch by the total count, so a term meant
            per token is added as `term * count`.
          logits: `[batch, T, vocab]`. targets, token_weights: `[batch, T]`.
          attention: the model's weights dict, when `needs_attention`.
          state: the extra train state of this step (no gradient flows into it).

        Returns:
          `(loss_sum, sums)`; `sums` maps metric names to `(sum, count)` pairs,
          added over micro-batches and logged as `train/<name>` = sum / count,
          unless `update` consumes them.
        """
        raise NotImplementedError

    def update(self, state: Mapping[str, Array], sums: Sums) -> tuple[dict[str, Array], Sums]:
        """The state after an optimizer step and the sums left to log.

        `sums` holds the metric sums of the whole global batch (every
        micro-batch); the sums that only feed the state are removed.
        """
        return dict(state), sums

    def logged(self, state: Mapping[str, Array]) -> dict[str, Any]:
        """Values of the state to log as `train/<name>` (e.g. a baseline)."""
        return {}
