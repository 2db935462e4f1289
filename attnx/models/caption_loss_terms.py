"""The captioner's `LossTerms`: the doubly stochastic regulariser and hard attention's REINFORCE.

Built from `config.train` (`ModelSpec.loss_terms` of the captioner):

- `attention_penalty` > 0: lambda of eq. 14 (Xu et al. 2015), for soft or
  hard attention.
- `config.model.attention.kind='hard'`: the REINFORCE surrogate of eq. 12
  (`caption_losses.hard_attention_loss`) with `reward_weight` (lambda_r),
  `entropy_weight` (lambda_e) and the moving-average baseline b (decay
  `baseline_decay`), which the train state carries as `extra['baseline']`,
  updated once per optimizer step from the mean log p(y | s, a) of every real
  caption of the global batch (all micro-batches).

Each term is the caption loss's token mean, added to the summed token loss
times the token count, so that the step's token-mean loss carries it once;
the label-smoothed token loss stands in for the surrogate's plain NLL.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from attnx.models.caption_losses import captioner_loss, hard_attention_loss, update_baseline
from attnx.models.loss_terms import Array, LossTerms, Sums

# The config.train keys these terms read; other architectures leave them unset.
TRAIN_KEYS = ("attention_penalty", "reward_weight", "entropy_weight", "baseline_decay")


@dataclasses.dataclass(frozen=True)
class HardAttention:
    """REINFORCE settings of hard attention (eq. 12): config.train's reward, entropy, decay."""

    reward_weight: float = 0.1
    entropy_weight: float = 0.002
    baseline_decay: float = 0.9


@dataclasses.dataclass(frozen=True)
class CaptionLossTerms(LossTerms):
    """The doubly stochastic penalty (`attention_penalty` = lambda) and/or hard attention.

    Attributes:
      attention_penalty: lambda of eq. 14; 0 for none.
      hard_attention: the REINFORCE settings, or None for soft attention.
    """

    attention_penalty: float = 0.0
    hard_attention: HardAttention | None = None
    needs_attention: bool = True

    def initial_state(self) -> dict[str, Array]:
        if self.hard_attention is None:
            return {}
        return {"baseline": jnp.zeros([], jnp.float32)}  # b_0 = 0, as the authors' code

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
        lam = self.attention_penalty
        sums: Sums = {}
        if self.hard_attention is None:
            _, parts = captioner_loss(logits, targets, dict(attention), lam=lam)
            sums["penalty"] = (parts["penalty"] * count, count)
            return loss_sum + parts["penalty"] * count, sums
        hard = self.hard_attention
        hard_loss, parts = hard_attention_loss(
            logits,
            targets,
            dict(attention),
            state["baseline"],
            reward_weight=hard.reward_weight,
            entropy_weight=hard.entropy_weight,
            lam=lam,
            token_weights=token_weights,
        )
        has_tokens = jnp.any(targets > 0, axis=-1).astype(jnp.float32)
        sums["reinforce"] = (parts["reinforce"] * count, count)
        sums["entropy"] = (parts["entropy"] * count, count)
        # Summed per caption for the baseline (`update`), not logged.
        sums["log_likelihood"] = (
            jnp.sum(parts["log_likelihood"] * has_tokens),
            jnp.sum(has_tokens),
        )
        if lam > 0:
            sums["penalty"] = (parts["penalty"] * count, count)
        return loss_sum + (hard_loss - parts["nll"]) * count, sums

    def update(self, state: Mapping[str, Array], sums: Sums) -> tuple[dict[str, Array], Sums]:
        if self.hard_attention is None:
            return dict(state), sums
        # b_k = decay b_{k-1} + (1 - decay) mean log p(y | s, a) over the global
        # batch's real captions; a batch without any keeps b.
        sums = dict(sums)
        total, captions = sums.pop("log_likelihood")
        baseline = state["baseline"]
        mean = total / jnp.maximum(captions, 1.0)
        updated = update_baseline(baseline, mean[None], self.hard_attention.baseline_decay)
        return {**state, "baseline": jnp.where(captions > 0, updated, baseline)}, sums

    def logged(self, state: Mapping[str, Array]) -> dict[str, Any]:
        return {"baseline": state["baseline"]} if "baseline" in state else {}


def caption_loss_terms(model_config: Any, train: Mapping[str, Any]) -> CaptionLossTerms | None:
    """The captioner's terms for `config.train`; None when it trains on the token loss alone."""
    penalty = float(train.get("attention_penalty", 0.0))
    hard = None
    if model_config.mechanism.kind == "hard":
        hard = HardAttention(
            reward_weight=float(train.get("reward_weight", HardAttention.reward_weight)),
            entropy_weight=float(train.get("entropy_weight", HardAttention.entropy_weight)),
            baseline_decay=float(train.get("baseline_decay", HardAttention.baseline_decay)),
        )
    if penalty == 0 and hard is None:
        return None
    return CaptionLossTerms(attention_penalty=penalty, hard_attention=hard)
