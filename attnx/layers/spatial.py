"""Spatial attention over a grid of convolutional features ("Show, Attend and Tell").

Xu, Ba, Kiros, Cho, Courville, Salakhutdinov, Zemel & Bengio (2015). A CNN
turns an image into L = H x W annotation vectors a_i (C channels each); at
every step t an LSTM decoder with previous state h_{t-1} picks where to look:

  e_ti    = f_att(a_i, h_{t-1}) = v^T tanh(W_a a_i + W_h h_{t-1} + b)   (eq. 4)
  alpha_t = softmax_i(e_ti)                                             (eq. 5)
  z_t     = beta_t sum_i alpha_ti a_i,  beta_t = sigmoid(f_beta(h_{t-1})) (eq. 6, 13; sec. 4.2.1)

(soft, "deterministic" attention, sec. 4.2). The paper only calls f_att a
multilayer perceptron; the additive form with the bias b is the authors'
released code. `sample_location` draws the one location that hard
("stochastic") attention looks at (sec. 4.1). The training objectives (the
doubly stochastic regulariser of eq. 14, REINFORCE with its location entropy,
eq. 11-12) are losses, not layers: they live in `attnx.models.caption_losses`.

The feature-side projection W_a a_i + b does not depend on t: `prepare_features`
computes it once and returns a `SpatialMemory` pytree; the per-step call only
projects h_{t-1}, so a decoder in `jax.lax.scan` never re-projects the grid.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnx.layers import interventions
from attnx.layers.attention_memory import scoring_vector_init
from attnx.layers.normalizers import Normalizer, get_normalizer
from attnx.layers.params import Initializer, param

Array = jax.Array


@struct.dataclass
class SpatialMemory:
    """An image's annotation vectors with their step-independent projection.

    Attributes:
      features: `[batch, L, C]`, the annotation vectors a_i, row-major over the grid.
      projected: `[batch, L, attention_dim]`, W_a a_i (+ b).
      mask: `[batch, L]` bool, True at real locations (e.g. not image padding).
      grid: `(H, W)` when the features came as a grid (static), else None.
    """

    features: Array
    projected: Array
    mask: Array
    grid: tuple[int, int] | None = struct.field(pytree_node=False, default=None)

    def as_grid(self, weights: Array) -> Array:
        """Weights `[..., L]` -> `[..., H, W]`, for plotting where the model looks."""
        if self.grid is None:
            raise ValueError("SpatialMemory.as_grid: the features were given flat [batch, L, C]")
        height, width = self.grid
        if weights.shape[-1] != height * width:
            raise ValueError(
                f"SpatialMemory.as_grid: weights end in {weights.shape[-1]} locations, "
                f"grid is {height} x {width}"
            )
        return weights.reshape(*weights.shape[:-1], height, width)


class SpatialAttention(nnx.Module):
    """Soft attention over feature locations with the gating scalar (Xu et al. 2015, sec. 4.2).

    Args:
      feature_dim: C, channels of the annotation vectors a_i.
      hidden_dim: D, size of the decoder state h_{t-1}.
      attention_dim: A, hidden size of the f_att MLP.
      gate: multiply the context by beta_t = sigmoid(w_beta . h_{t-1} + b_beta)
        (sec. 4.2.1); off gives z_t = sum_i alpha_ti a_i (eq. 13 without beta).
      use_bias: the bias b inside the tanh (authors' code); the paper's text
        does not specify one.
      normalizer: 'softmax' (the paper), 'sparsemax' or 'entmax15'.
      dropout_rate: dropout on the weights used for the context; the weights
        returned or sown are the ones before dropout.
      sow_weights: sow the weights `[batch, L]` into `nnx.Intermediate` as
        'attention_weights' on every step.
      dtype: compute dtype (weights are normalised in float32).

    Attributes (parameters, `x @ kernel` layout):
      feature_kernel: W_a^T, `[C, A]`; hidden_kernel: W_h^T, `[D, A]`;
      bias: b, `[A]` (only with `use_bias`); v: `[A]`;
      gate_kernel: w_beta, `[D]`; gate_bias: b_beta, `[]` (only with `gate`).
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_dim: int,
        attention_dim: int,
        *,
        gate: bool = True,
        use_bias: bool = True,
        normalizer: str | Normalizer = "softmax",
        dropout_rate: float = 0.0,
        sow_weights: bool = False,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for arg, size in [
            ("feature_dim", feature_dim),
            ("hidden_dim", hidden_dim),
            ("attention_dim", attention_dim),
        ]:
            if size < 1:
                raise ValueError(f"SpatialAttention: {arg} must be >= 1, got {size}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(
                f"SpatialAttention: dropout_rate must be in [0, 1), got {dropout_rate}"
            )
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.attention_dim = attention_dim
        self.gate = gate
        self.normalizer: Callable[..., Array] = get_normalizer(normalizer)
        self.sow_weights = sow_weights
        self.dtype = dtype
        zeros = nnx.initializers.zeros_init()
        self.feature_kernel = param(
            rngs, kernel_init, (feature_dim, attention_dim), ("channels", "mlp"), param_dtype
        )
        self.hidden_kernel = param(
            rngs, kernel_init, (hidden_dim, attention_dim), ("rnn_hidden", "mlp"), param_dtype
        )
        self.bias = (
            param(rngs, zeros, (attention_dim,), ("mlp",), param_dtype)
            if use_bias
            else nnx.data(None)
        )
        self.v = param(rngs, scoring_vector_init, (attention_dim,), ("mlp",), param_dtype)
        if gate:
            self.gate_kernel = param(
                rngs, scoring_vector_init, (hidden_dim,), ("rnn_hidden",), param_dtype
            )
            self.gate_bias = param(rngs, zeros, (), (), param_dtype)
        else:
            self.gate_kernel = self.gate_bias = nnx.data(None)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

    def prepare_features(self, features: Array, mask: Array | None = None) -> SpatialMemory:
        """Flattens the grid and projects it once: W_a a_i (+ b).

        Args:
          features: `[batch, H, W, C]` (a CNN feature map) or `[batch, L, C]`.
          mask: `[batch, H, W]` or `[batch, L]`, True at real locations; default all.

        Returns:
          A `SpatialMemory` (a pytree; pass it through `lax.scan` as a constant).
        """
        features = jnp.asarray(features)
        if features.ndim not in (3, 4) or features.shape[-1] != self.feature_dim:
            raise ValueError(
                "SpatialAttention.prepare_features: features must be [batch, H, W, C] or "
                f"[batch, L, C] with C={self.feature_dim}, got {features.shape}"
            )
        grid = tuple(features.shape[1:3]) if features.ndim == 4 else None
        batch = features.shape[0]
        flat = features.reshape(batch, -1, self.feature_dim)
        if mask is None:
            flat_mask = jnp.ones(flat.shape[:2], bool)
        else:
            mask = jnp.asarray(mask)
            if mask.shape != features.shape[:-1]:
                raise ValueError(
                    f"SpatialAttention.prepare_features: mask must be {features.shape[:-1]} "
                    f"(the features without channels), got {mask.shape}"
                )
            flat_mask = mask.reshape(batch, -1).astype(bool)
        flat = flat.astype(self.dtype)
        projected = flat @ self.feature_kernel[...].astype(self.dtype)
        if self.bias is not None:
            projected = projected + self.bias[...].astype(self.dtype)
        return SpatialMemory(flat, projected, flat_mask, grid)

    def __call__(
        self, hidden: Array, memory: SpatialMemory, return_weights: bool = False
    ) -> Array | tuple[Array, Array]:
        """One decoding step: where to look given h_{t-1}, and the context z_t.

        Args:
          hidden: h_{t-1}, `[batch, D]`.
          memory: from `prepare_features`.
          return_weights: also return alpha_t.

        Returns:
          z_t `[batch, C]`, and with `return_weights` alpha_t `[batch, L]`
          (`memory.as_grid(alpha_t)` gives `[batch, H, W]`). Masked
          locations get weight 0; an all-masked example gets z_t = 0.
        """
        hidden = jnp.asarray(hidden)
        batch = memory.features.shape[0]
        if hidden.shape != (batch, self.hidden_dim):
            raise ValueError(
                f"SpatialAttention: hidden must be [batch, hidden_dim] = {(batch, self.hidden_dim)}, "
                f"got {hidden.shape}"
            )
        if memory.projected.shape[-1] != self.attention_dim:
            raise ValueError(
                "SpatialAttention: memory must come from this module's prepare_features "
                f"(projected dim {self.attention_dim}), got {memory.projected.shape}"
            )
        dt = self.dtype
        hidden = hidden.astype(dt)
        projected_hidden = hidden @ self.hidden_kernel[...].astype(dt)  # [b, A]
        energy = jnp.tanh(memory.projected + projected_hidden[:, None, :]) @ self.v[...].astype(dt)
        weights = self.normalizer(energy.astype(jnp.float32), memory.mask)  # eq. 4-5, [b, L]
        weights = interventions.apply(weights, memory.mask, "spatial", missing_axes=(1, 2))
        context = jnp.einsum("bl,blc->bc", self.dropout(weights).astype(dt), memory.features)
        if self.gate:
            logit = hidden @ self.gate_kernel[...].astype(dt) + self.gate_bias[...].astype(dt)
            context = context * jax.nn.sigmoid(logit)[:, None]  # beta_t, sec. 4.2.1
        weights = weights.astype(dt)
        if self.sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        return (context, weights) if return_weights else context


def _safe_log(weights: Array) -> Array:
    """log(w) where w > 0, else 0 (finite values and gradients at w = 0)."""
    positive = weights > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, weights, 1.0)), 0.0)


def sample_location(weights: Array, rng: Array) -> tuple[Array, Array]:
    """Draws one location s_t ~ Multinoulli(alpha_t) for hard attention (Xu et al. 2015, sec. 4.1).

    The hard context is then z_t = sum_i s_ti a_i, e.g.
    `jnp.einsum('bl,blc->bc', sample, memory.features)`, and REINFORCE
    (eq. 11-12) weighs the gradient of `log_prob` by the reward.

    Args:
      weights: `[..., L]` attention weights alpha_t (rows sum to 1, or are all
        zero for an example with no real location).
      rng: a PRNG key.

    Returns:
      `(sample, log_prob)`: a one-hot float `[..., L]` (no gradient) and
      log alpha_{t, s_t} `[...]` (differentiable w.r.t. `weights`). A row of
      zeros samples nothing: an all-zero one-hot and log-probability 0.
    """
    weights = jnp.asarray(weights)
    positive = weights > 0
    logits = jnp.where(positive, _safe_log(jax.lax.stop_gradient(weights)), -jnp.inf)
    index = jax.random.categorical(rng, logits, axis=-1)
    sample = jax.nn.one_hot(index, weights.shape[-1], dtype=weights.dtype)
    sample = jnp.where(jnp.any(positive, axis=-1, keepdims=True), sample, 0.0)
    log_prob = jnp.sum(sample * _safe_log(weights), axis=-1)
    return sample, log_prob
