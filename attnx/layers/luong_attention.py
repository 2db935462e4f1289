"""Luong et al. (2015) global and local attention for RNN decoders.

Global attention (sec. 3.1) scores the decoder's current state h_t against
every source state h_s and averages the source:

  a_t(s) = exp(score(h_t, h_s)) / sum_s' exp(score(h_t, h_s'))     (eq. 7)
  c_t    = sum_s a_t(s) h_s

with one of the scores of eq. (8) and (9):

  dot       h_t^T h_s
  general   h_t^T W_a h_s
  concat    v_a^T tanh(W_a [h_t; h_s])
  location  a_t = softmax(W_a h_t)   (from the decoder state alone)

Local attention (sec. 3.2) restricts the average to a window
[p_t - D, p_t + D] around an aligned position p_t: p_t = t for 'local-m',
and p_t = S sigmoid(v_p^T tanh(W_p h_t)) for 'local-p' (eq. 9), whose
weights are further multiplied by a Gaussian around p_t (eq. 10).

The modules return the context c_t. The attentional hidden state
h~_t = tanh(W_c [c_t; h_t]) (eq. 5) belongs to the decoder, which feeds it
to the softmax and, with input feeding, to the next step; the modules offer
it as `attentional_hidden` when built with `output_projection=True`.

Shapes, memory preparation and masking follow `attnx.layers.attention_memory`:
`prepare_memory(keys, values=None, mask=None)` once per source, then
`__call__(query, memory)` with query `[batch, query_dim]` (one step) or
`[batch, q_length, query_dim]` (a sequence).

Reference:
  Luong, Pham & Manning (2015), "Effective Approaches to Attention-based
    Neural Machine Translation".
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.layers import interventions
from attnx.layers.attention_memory import (
    AttentionMemory,
    check_memory_inputs,
    normalize_scores,
    query_as_sequence,
    scoring_vector_init,
    weighted_sum,
)
from attnx.layers.normalizers import Normalizer, get_normalizer
from attnx.layers.params import Initializer, param
from attnx.layers.scores import additive_scores, dot_scores, location_scores

Array = jax.Array

LUONG_SCORES = ("dot", "general", "concat", "location")
LOCAL_MODES = ("local-m", "local-p")

default_kernel_init: Initializer = nnx.initializers.lecun_normal()


class LuongAttention(nnx.Module):
    """Luong et al. (2015) global attention (sec. 3.1) with the scores of eq. (8), (9).

    Parameters (stored in the `x @ kernel` layout, per score):
      'dot': none; needs `query_dim == key_dim`.
      'general': `kernel` = W_a, `[query_dim, key_dim]`; the key side W_a h_s
        is computed once by `prepare_memory`, then the score is h_t . (W_a h_s).
      'concat': `kernel` = W_a^T, `[query_dim + key_dim, attention_dim]`, and
        `v` = v_a, `[attention_dim]`. W_a [h_t; h_s] is computed as
        W_a[:, :query_dim] h_t + W_a[:, query_dim:] h_s, the second term once
        by `prepare_memory`.
      'location': `kernel` = W_a^T, `[query_dim, max_source_length]`; the score
        of source position s is (W_a h_t)_s, for sources up to `max_source_length`.
      With `output_projection=True`: `output_kernel` = W_c^T,
        `[value_dim + query_dim, output_dim]` (eq. 5).
    The paper's W_a, v_a and W_c have no biases, and neither do these.

    `normalizer` replaces the softmax of eq. (7) by 'sparsemax' or 'entmax15'.
    Dropout (`dropout_rate`) acts on the weights used for the context; the
    weights handed back or sown are the ones before dropout.

    Weights are `[batch, kv_length]` for one step and `[batch, q_length, kv_length]`
    for a sequence; contexts `[batch, value_dim]` / `[batch, q_length, value_dim]`.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        *,
        score: str = "general",
        value_dim: int | None = None,
        attention_dim: int | None = None,
        max_source_length: int | None = None,
        output_projection: bool = False,
        output_dim: int | None = None,
        normalizer: str | Normalizer = "softmax",
        dropout_rate: float = 0.0,
        sow_weights: bool = False,
        kernel_init: Initializer = default_kernel_init,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        name = type(self).__name__
        if score not in LUONG_SCORES:
            raise ValueError(f"{name}: unknown score {score!r}; choose one of {LUONG_SCORES}")
        if query_dim < 1 or key_dim < 1:
            raise ValueError(
                f"{name}: query_dim and key_dim must be >= 1, got {query_dim}, {key_dim}"
            )
        if score == "dot" and query_dim != key_dim:
            raise ValueError(
                f"{name}: score 'dot' needs query_dim == key_dim, got {query_dim} and {key_dim}"
            )
        if attention_dim is not None and score != "concat":
            raise ValueError(f"{name}: attention_dim is used only by score 'concat', not {score!r}")
        if max_source_length is not None and score != "location":
            raise ValueError(
                f"{name}: max_source_length is used only by score 'location', not {score!r}"
            )
        if score == "location" and (max_source_length is None or max_source_length < 1):
            raise ValueError(f"{name}: score 'location' needs max_source_length >= 1")
        if output_dim is not None and not output_projection:
            raise ValueError(f"{name}: output_dim is given but output_projection is False")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"{name}: dropout_rate must be in [0, 1), got {dropout_rate}")
        self.query_dim = query_dim
        self.key_dim = key_dim
        self.value_dim = key_dim if value_dim is None else value_dim
        self.score = score
        self.max_source_length = max_source_length
        self.normalizer: Callable[..., Array] = get_normalizer(normalizer)
        self.sow_weights = sow_weights
        self.dtype = dtype

        self.kernel = nnx.data(None)
        self.v = nnx.data(None)
        if score == "general":
            self.kernel = param(
                rngs, kernel_init, (query_dim, key_dim), ("rnn_hidden", None), param_dtype
            )
        elif score == "concat":
            attention_dim = query_dim if attention_dim is None else attention_dim
            self.kernel = param(
                rngs,
                kernel_init,
                (query_dim + key_dim, attention_dim),
                ("rnn_hidden", "kv"),
                param_dtype,
            )
            self.v = param(rngs, scoring_vector_init, (attention_dim,), ("kv",), param_dtype)
        elif score == "location":
            self.kernel = param(
                rngs,
                kernel_init,
                (query_dim, max_source_length),
                ("rnn_hidden", "positions"),
                param_dtype,
            )
        self.output_kernel = nnx.data(None)
        if output_projection:
            output_dim = query_dim if output_dim is None else output_dim
            self.output_kernel = param(
                rngs,
                kernel_init,
                (self.value_dim + query_dim, output_dim),
                ("rnn_hidden", None),
                param_dtype,
            )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

    def prepare_memory(
        self, keys: Array, values: Array | None = None, mask: Array | None = None
    ) -> AttentionMemory:
        """Computes the step-independent, source-side part of the score once.

        Args:
          keys: `[batch, kv_length, key_dim]`, the source hidden states h_s.
          values: `[batch, kv_length, value_dim]`; defaults to `keys` (as in the paper).
          mask: `[batch, kv_length]` bool, True at real positions; default all True.

        Returns:
          An `AttentionMemory` whose `projected_keys` is W_a h_s
          (`[batch, kv_length, query_dim]`) for 'general', the key half of
          W_a [h_t; h_s] (`[batch, kv_length, attention_dim]`) for 'concat',
          and None for 'dot' and 'location'.
        """
        name = type(self).__name__
        keys, values, mask = check_memory_inputs(
            name, keys, values, mask, self.key_dim, self.value_dim
        )
        if self.score == "location" and keys.shape[1] > self.max_source_length:
            raise ValueError(
                f"{name}: source length {keys.shape[1]} exceeds max_source_length="
                f"{self.max_source_length} of the 'location' score"
            )
        keys = keys.astype(self.dtype)
        projected = None
        if self.score == "general":
            projected = jnp.einsum("bkd,qd->bkq", keys, self.kernel[...].astype(self.dtype))
        elif self.score == "concat":
            key_half = self.kernel[self.query_dim :].astype(self.dtype)
            projected = jnp.einsum("bkd,da->bka", keys, key_half)
        return AttentionMemory(keys, values.astype(self.dtype), mask, projected)

    def _scores(self, query: Array, memory: AttentionMemory) -> Array:
        """Query `[batch, q_length, query_dim]` -> scores `[batch, 1, q_length, kv_length]`."""
        name = type(self).__name__
        projected = memory.projected_keys
        expected_dim = None  # 'dot' and 'location' project nothing
        if self.score == "general":
            expected_dim = self.query_dim
        elif self.score == "concat":
            expected_dim = self.kernel[...].shape[1]
        if (None if projected is None else projected.shape[-1]) != expected_dim:
            raise ValueError(
                f"{name}: memory must come from this module's prepare_memory (score "
                f"{self.score!r}), got projected keys "
                f"{None if projected is None else projected.shape}"
            )
        query = query.astype(self.dtype)[:, :, None]  # one head
        if self.score == "dot":
            return dot_scores(query, memory.keys[:, :, None])
        if self.score == "general":
            return dot_scores(query, projected[:, :, None])
        if self.score == "concat":
            query_half = self.kernel[: self.query_dim].astype(self.dtype)
            projected_query = jnp.einsum("bqhd,da->bqha", query, query_half)
            v = self.v[...].astype(self.dtype)[None]
            return additive_scores(projected_query, projected[:, :, None], v)
        kernel = self.kernel[...].astype(self.dtype)[None]
        return location_scores(query, kernel, memory.keys.shape[1])

    def _attend(
        self, weights: Array, memory: AttentionMemory, single_step: bool, return_weights: bool
    ) -> Array | tuple[Array, Array]:
        """Weights `[batch, 1, q_length, kv_length]` -> context (and weights), output shapes."""
        context = weighted_sum(self.dropout(weights), memory.values)[:, :, 0]
        weights = weights[:, 0].astype(self.dtype)
        if single_step:
            context, weights = context[:, 0], weights[:, 0]
        if self.sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        return (context, weights) if return_weights else context

    def __call__(
        self, query: Array, memory: AttentionMemory, return_weights: bool = False
    ) -> Array | tuple[Array, Array]:
        """Global attention: a_t over all real source positions, c_t = sum_s a_t(s) h_s.

        Args:
          query: the current decoder state h_t, `[batch, query_dim]` (one
            step) or `[batch, q_length, query_dim]` (a sequence).
          memory: from `prepare_memory`.
          return_weights: also return a_t.

        Returns:
          c_t, `[batch, (q_length,) value_dim]`, and with `return_weights` the
          weights `[batch, (q_length,) kv_length]`.
        """
        query, single_step = query_as_sequence(
            type(self).__name__, query, self.query_dim, memory.keys.shape[0]
        )
        scores = self._scores(query, memory)
        weights = normalize_scores(self.normalizer, scores, memory.mask[:, None, None, :])
        weights = interventions.apply(weights, memory.mask[:, None, None, :], "luong")
        return self._attend(weights, memory, single_step, return_weights)

    def attentional_hidden(self, context: Array, query: Array) -> Array:
        """h~_t = tanh(W_c [c_t; h_t])  (eq. 5).

        Args:
          context: `[..., value_dim]`, c_t from `__call__`.
          query: `[..., query_dim]`, the decoder state h_t (same leading axes).

        Returns:
          `[..., output_dim]`.
        """
        name = type(self).__name__
        if self.output_kernel is None:
            raise ValueError(f"{name}: attentional_hidden needs output_projection=True")
        if (
            context.shape[-1] != self.value_dim
            or query.shape[-1] != self.query_dim
            or context.shape[:-1] != query.shape[:-1]
        ):
            raise ValueError(
                f"{name}.attentional_hidden: context [..., {self.value_dim}] and query "
                f"[..., {self.query_dim}] with the same leading axes expected, got "
                f"{context.shape} and {query.shape}"
            )
        joined = jnp.concatenate([context, query], axis=-1).astype(self.dtype)
        return jnp.tanh(joined @ self.output_kernel[...].astype(self.dtype))


class LocalAttention(LuongAttention):
    """Luong et al. (2015) local attention (sec. 3.2): 'local-m' and 'local-p'.

    At target step t an aligned source position p_t is chosen, and the
    context averages only the source states in the window [p_t - D, p_t + D]:

      local-m:  p_t = t (monotonic alignment);
                a_t(s) = align(h_t, h_s), normalised over the window (eq. 7).
      local-p:  p_t = S sigmoid(v_p^T tanh(W_p h_t))              (eq. 9)
                a_t(s) = align(h_t, h_s) exp(-(s - p_t)^2 / (2 sigma^2)),
                sigma = D / 2                                     (eq. 10)

    `align` is eq. (7) with one of Luong's content scores ('general' by
    default, as in the paper's best local models; 'dot' and 'concat' too),
    normalised over the real source positions inside the window. As in the
    paper, the Gaussian multiplies the already normalised weights and the
    result is NOT renormalised, so local-p weights sum to at most 1. The
    Gaussian belongs to local-p only; local-m uses the plain window (the
    paper defines local-m's a_t by eq. 7).

    Positions are 0-based: s = 0 .. kv_length - 1, t = 0, 1, ... S is each
    example's real (unpadded) source length, the number of True entries of
    the memory's mask, so padding is assumed at the end; p_t is real-valued in
    [0, S]. The window is computed as a mask over the whole padded source
    (static shapes under `jit`), not by slicing: positions outside the window
    or in padding get weight 0, and a window holding no real position gives a
    zero context.

    Parameters: those of `LuongAttention` for the align score, and for
    'local-p' `position_kernel` = W_p^T, `[query_dim, position_dim]`, and
    `position_v` = v_p, `[position_dim]` (no biases, as eq. 9).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        *,
        window: int,
        mode: str = "local-p",
        score: str = "general",
        position_dim: int | None = None,
        value_dim: int | None = None,
        attention_dim: int | None = None,
        output_projection: bool = False,
        output_dim: int | None = None,
        normalizer: str | Normalizer = "softmax",
        dropout_rate: float = 0.0,
        sow_weights: bool = False,
        kernel_init: Initializer = default_kernel_init,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if mode not in LOCAL_MODES:
            raise ValueError(f"LocalAttention: unknown mode {mode!r}; choose one of {LOCAL_MODES}")
        if score == "location":
            raise ValueError(
                "LocalAttention: the align score must depend on h_s ('dot', 'general' or "
                "'concat'); 'location' is a global-attention score"
            )
        # local-p's sigma = D / 2 must be positive; local-m may use D = 0 (a_t one-hot at t).
        min_window = 1 if mode == "local-p" else 0
        if window < min_window:
            raise ValueError(f"LocalAttention: {mode} needs window D >= {min_window}, got {window}")
        if position_dim is not None and mode != "local-p":
            raise ValueError("LocalAttention: position_dim is used only by mode 'local-p'")
        super().__init__(
            query_dim,
            key_dim,
            score=score,
            value_dim=value_dim,
            attention_dim=attention_dim,
            output_projection=output_projection,
            output_dim=output_dim,
            normalizer=normalizer,
            dropout_rate=dropout_rate,
            sow_weights=sow_weights,
            kernel_init=kernel_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.window = window
        self.mode = mode
        self.position_kernel = nnx.data(None)
        self.position_v = nnx.data(None)
        if mode == "local-p":
            position_dim = query_dim if position_dim is None else position_dim
            self.position_kernel = param(
                rngs, kernel_init, (query_dim, position_dim), ("rnn_hidden", "kv"), param_dtype
            )
            self.position_v = param(
                rngs, scoring_vector_init, (position_dim,), ("kv",), param_dtype
            )

    def _positions(self, query: Array, memory: AttentionMemory, step: int | Array | None) -> Array:
        """Query `[batch, q_length, query_dim]` -> p_t `[batch, q_length]` (float32)."""
        batch, q_length = query.shape[:2]
        if self.mode == "local-p":
            hidden = jnp.tanh(
                query.astype(self.dtype) @ self.position_kernel[...].astype(self.dtype)
            )
            gate = jax.nn.sigmoid(
                (hidden @ self.position_v[...].astype(self.dtype)).astype(jnp.float32)
            )
            return memory.lengths[:, None].astype(jnp.float32) * gate
        step = jnp.asarray(0 if step is None else step)
        if step.ndim == 0:
            step = jnp.broadcast_to(step, (batch,))
        if step.shape != (batch,):
            raise ValueError(
                f"LocalAttention: step must be a scalar or [batch={batch}], got {step.shape}"
            )
        return (step[:, None] + jnp.arange(q_length)[None, :]).astype(jnp.float32)

    def positions(
        self, query: Array, memory: AttentionMemory, step: int | Array | None = None
    ) -> Array:
        """The aligned positions p_t: `[batch]` for one step, `[batch, q_length]` for a sequence.

        Arguments as for `__call__`.
        """
        query, single_step = self._check_call(query, memory, step)
        positions = self._positions(query, memory, step)
        return positions[:, 0] if single_step else positions

    def _check_call(
        self, query: Array, memory: AttentionMemory, step: int | Array | None
    ) -> tuple[Array, bool]:
        query, single_step = query_as_sequence(
            "LocalAttention", query, self.query_dim, memory.keys.shape[0]
        )
        if self.mode == "local-m" and single_step and step is None:
            raise ValueError(
                "LocalAttention: local-m needs the decoder step (p_t = t): "
                "call it as attention(query, memory, step=t)"
            )
        return query, single_step

    def __call__(
        self,
        query: Array,
        memory: AttentionMemory,
        step: int | Array | None = None,
        return_weights: bool = False,
    ) -> Array | tuple[Array, Array]:
        """Local attention over the window [p_t - D, p_t + D].

        Args:
          query: the current decoder state h_t, `[batch, query_dim]` (one
            step) or `[batch, q_length, query_dim]` (a sequence).
          memory: from `prepare_memory`.
          step: the target position t of the (first) query, a scalar or a
            `[batch]` array, possibly traced. Required by local-m for one
            step; for a sequence the queries are at t = step, step + 1, ...
            (default step 0). local-p predicts p_t and does not use it, so
            one decoder loop can drive both modes.
          return_weights: also return a_t.

        Returns:
          c_t, `[batch, (q_length,) value_dim]`, and with `return_weights` the
          weights `[batch, (q_length,) kv_length]`.
        """
        query, single_step = self._check_call(query, memory, step)
        positions = self._positions(query, memory, step)  # [batch, q_length]
        scores = self._scores(query, memory)  # [batch, 1, q_length, kv_length]
        source = jnp.arange(memory.keys.shape[1], dtype=jnp.float32)
        offset = source[None, None, :] - positions[:, :, None]  # s - p_t
        in_window = (jnp.abs(offset) <= self.window) & memory.mask[:, None, :]
        weights = normalize_scores(self.normalizer, scores, in_window[:, None])
        if self.mode == "local-p":
            sigma = self.window / 2.0
            weights = weights * jnp.exp(-jnp.square(offset) / (2.0 * sigma**2))[:, None]
        # After local-p's Gaussian: these are the weights the context uses; the window is the mask.
        weights = interventions.apply(weights, in_window[:, None], "local")
        return self._attend(weights, memory, single_step, return_weights)
