"""Bahdanau et al. (2014) additive attention for RNN encoder-decoders.

`AdditiveAttention` projects the source once (`prepare_memory`, returning an
`attnx.layers.attention_memory.AttentionMemory`) and then, at every decoder
step, scores the previous decoder state against it. It takes one step or a
whole sequence of queries, and a padding mask, as described in
`attnx.layers.attention_memory`.

Reference:
  Bahdanau, Cho & Bengio (2014), "Neural Machine Translation by Jointly
    Learning to Align and Translate", eq. (5), (6) and appendix A.1.2.
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
from attnx.layers.scores import additive_scores

Array = jax.Array


# LeCun scaling with the fan-in taken from axis 0 only, so that a
# `[in, heads, dim]` kernel is initialised like an `[in, heads * dim]` one.
head_kernel_init: Initializer = nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
)


class AdditiveAttention(nnx.Module):
    """Bahdanau et al. (2014) additive ("concat") attention.

    For decoder state s_{i-1} and encoder states h_j (appendix A.1.2):

      e_ij     = v_a^T tanh(W_a s_{i-1} + U_a h_j)         (eq. 6)
      alpha_ij = exp(e_ij) / sum_k exp(e_ik)               (eq. 6)
      c_i      = sum_j alpha_ij h_j                        (eq. 5)

    The paper's W_a, U_a and v_a have no bias (A.1.2); `use_bias=True` adds one
    bias b_a inside the tanh, as many later implementations do. One bias is
    enough: separate biases on W_a and U_a would only add up to one. It is kept
    on the key side so that it is computed once with U_a h_j. As the paper
    notes, U_a h_j does not depend on i and is precomputed: call
    `prepare_memory` once per source, then `__call__` at every step.

    With `num_heads = H > 1` every head has its own W_a, U_a, v_a and attends
    over the full values; the contexts of the heads are concatenated
    (`[..., H * value_dim]`) and the weights gain a heads axis right after
    batch (`[batch, H, kv_length]` per step, `[batch, H, q_length, kv_length]`
    for a sequence, the multi-head layout). With one head there is no heads axis.

    `normalizer` replaces the softmax of eq. 6 by 'sparsemax' or 'entmax15'
    for sparse alignments. Dropout (`dropout_rate`) acts on the weights used
    for the context; the weights handed back or sown are the ones before
    dropout, which sum to 1.

    Attributes (parameters, stored in the `x @ kernel` layout):
      query_kernel: W_a^T, `[query_dim, heads, attention_dim]`.
      key_kernel: U_a^T, `[key_dim, heads, attention_dim]`.
      v: v_a, `[heads, attention_dim]`.
      bias: b_a, `[heads, attention_dim]` (only with `use_bias=True`).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attention_dim: int,
        *,
        num_heads: int = 1,
        use_bias: bool = False,
        normalizer: str | Normalizer = "softmax",
        dropout_rate: float = 0.0,
        sow_weights: bool = False,
        kernel_init: Initializer = head_kernel_init,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for arg, size in [
            ("query_dim", query_dim),
            ("key_dim", key_dim),
            ("attention_dim", attention_dim),
            ("num_heads", num_heads),
        ]:
            if size < 1:
                raise ValueError(f"AdditiveAttention: {arg} must be >= 1, got {size}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(
                f"AdditiveAttention: dropout_rate must be in [0, 1), got {dropout_rate}"
            )
        self.query_dim = query_dim
        self.key_dim = key_dim
        self.attention_dim = attention_dim
        self.num_heads = num_heads
        self.normalizer: Callable[..., Array] = get_normalizer(normalizer)
        self.sow_weights = sow_weights
        self.dtype = dtype
        shape = (num_heads, attention_dim)
        self.query_kernel = param(
            rngs, kernel_init, (query_dim, *shape), ("rnn_hidden", "heads", "kv"), param_dtype
        )
        self.key_kernel = param(
            rngs, kernel_init, (key_dim, *shape), ("rnn_hidden", "heads", "kv"), param_dtype
        )
        self.v = param(rngs, scoring_vector_init, shape, ("heads", "kv"), param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros, shape, ("heads", "kv"), param_dtype)
            if use_bias
            else nnx.data(None)
        )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

    def prepare_memory(
        self, keys: Array, values: Array | None = None, mask: Array | None = None
    ) -> AttentionMemory:
        """Projects the encoder states once: U_a h_j (+ b_a).

        Args:
          keys: `[batch, kv_length, key_dim]`, the annotations h_j.
          values: `[batch, kv_length, value_dim]`; defaults to `keys` (as in the paper).
          mask: `[batch, kv_length]` bool, True at real positions; default all True.

        Returns:
          An `AttentionMemory` whose `projected_keys` is
          `[batch, kv_length, heads, attention_dim]`.
        """
        keys, values, mask = check_memory_inputs(
            "AdditiveAttention", keys, values, mask, self.key_dim
        )
        keys = keys.astype(self.dtype)
        projected = jnp.einsum("bkd,dha->bkha", keys, self.key_kernel[...].astype(self.dtype))
        if self.bias is not None:
            projected = projected + self.bias[...].astype(self.dtype)
        return AttentionMemory(keys, values.astype(self.dtype), mask, projected)

    def __call__(
        self, query: Array, memory: AttentionMemory, return_weights: bool = False
    ) -> Array | tuple[Array, Array]:
        """Attends from the decoder state(s) to the memory.

        Args:
          query: the previous decoder state s_{i-1}, `[batch, query_dim]` for
            one step or `[batch, q_length, query_dim]` for a whole sequence.
          memory: from `prepare_memory`.
          return_weights: also return the alignment weights alpha.

        Returns:
          The context c_i, `[batch, (q_length,) heads * value_dim]`, and with
          `return_weights` the weights `[batch, (heads,) (q_length,) kv_length]`
          (axes in parentheses only for a sequence / more than one head).
        """
        projected_keys = memory.projected_keys
        if projected_keys is None or projected_keys.shape[2:] != (
            self.num_heads,
            self.attention_dim,
        ):
            raise ValueError(
                "AdditiveAttention: memory must come from this module's prepare_memory "
                f"(projected keys [batch, kv_length, {self.num_heads}, {self.attention_dim}]), got "
                f"{None if projected_keys is None else projected_keys.shape}"
            )
        query, single_step = query_as_sequence(
            "AdditiveAttention", query, self.query_dim, memory.keys.shape[0]
        )
        query = query.astype(self.dtype)
        projected_query = jnp.einsum(
            "bqd,dha->bqha", query, self.query_kernel[...].astype(self.dtype)
        )
        scores = additive_scores(projected_query, projected_keys, self.v[...].astype(self.dtype))
        weights = normalize_scores(self.normalizer, scores, memory.mask[:, None, None, :])
        weights = interventions.apply(weights, memory.mask[:, None, None, :], "additive")
        context = weighted_sum(self.dropout(weights), memory.values)
        batch, q_length = context.shape[:2]
        context = context.reshape(batch, q_length, -1)
        if self.num_heads == 1:
            weights = weights[:, 0]
        if single_step:
            context, weights = context[:, 0], weights[..., 0, :]
        weights = weights.astype(self.dtype)
        if self.sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        return (context, weights) if return_weights else context
