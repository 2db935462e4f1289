"""The attention terms of the Show, Attend and Tell losses (Xu et al. 2015), by hand.

The losses that use them (`captioner_loss`, `hard_attention_loss`) are tested
against a captioner in `tests/models/test_captioner.py`.
"""

import math

import jax
import numpy as np
import pytest

from attnx.models.caption_losses import doubly_stochastic_penalty, location_entropy


def test_doubly_stochastic_penalty_matches_hand_computation():
    rng = np.random.default_rng(2)
    weights = rng.dirichlet(np.ones(5), size=(3, 4)).astype(np.float32)  # [b=3, T=4, L=5]
    caption_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    lam = 0.5
    per_example = []
    for b in range(2):  # example 2 has no caption step: excluded from the average
        total = 0.0
        for i in range(5):
            seen = sum(weights[b, t, i] for t in range(4) if caption_mask[b, t])
            total += (1.0 - seen) ** 2
        per_example.append(lam * total)
    penalty = jax.jit(doubly_stochastic_penalty)(weights, caption_mask, lam)
    np.testing.assert_allclose(penalty, np.mean(per_example), rtol=1e-5)
    # Location mask: padded locations drop out of the sum over i.
    location_mask = np.ones((3, 5), bool)
    location_mask[:, 4] = False
    masked = jax.jit(doubly_stochastic_penalty)(weights, caption_mask, lam, location_mask)
    want = np.mean(
        [
            lam * sum((1.0 - weights[b, caption_mask[b], i].sum()) ** 2 for i in range(4))
            for b in range(2)
        ]
    )
    np.testing.assert_allclose(masked, want, rtol=1e-5)
    with pytest.raises(ValueError, match="caption_mask"):
        doubly_stochastic_penalty(weights, caption_mask[:, :3])


def test_location_entropy_matches_hand_computation_and_finite_gradient():
    weights = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], np.float32)
    want = [-sum(p * math.log(p) for p in row if p > 0) for row in weights]
    entropy, grad = jax.jit(jax.value_and_grad(lambda w: location_entropy(w)[1:2].sum()))(weights)
    np.testing.assert_allclose(entropy, want[1], atol=1e-6)
    np.testing.assert_allclose(jax.jit(location_entropy)(weights), want, rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all()
