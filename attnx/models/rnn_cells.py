"""Recurrent cells and the scan that runs them, for the RNN encoder-decoders.

The cells split every gate pre-activation into a part that depends only on
the input sequence and a part that depends on the recurrent state:

  gates_t = (W x_t + b)  +  U [e_t; h_{t-1}]
            `project_inputs`, once for all t     `__call__`, inside the loop

W x_t for the whole sequence is one large matmul over `[batch, time, in]`
done before `jax.lax.scan`; the loop only multiplies by U. `e_t` is an
optional per-step input that is not known in advance (the attention context
c_i of Bahdanau's decoder, the fed-back h~_{t-1} of Luong's input feeding);
it shares U's matmul with h_{t-1}. The gates of a cell are fused into one
kernel (`[in, 4, hidden]` for the LSTM, `[in, 3, hidden]` for the GRU).

A cell state is a tuple whose first entry is the output h: `(h, c)` for the
LSTM and `(h,)` for the GRU.

Padding is handled by masking (`scan_cells`: a padded step keeps the previous
state, so the final state is the one after the last real token) and, for the
backward direction of a bidirectional encoder, by reversing each sequence
within its real length (`reversal_indices`), which keeps padding at the end.

References:
  Hochreiter & Schmidhuber (1997); Zaremba, Sutskever & Vinyals (2014),
    "Recurrent Neural Network Regularization", eq. of sec. 3.1 (the LSTM).
  Cho et al. (2014), "Learning Phrase Representations using RNN
    Encoder-Decoder", eq. (5)-(8) (the GRU, as in Bahdanau et al. A.1.1).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.layers.params import param
from attnx.models.checks import check_at_least

Array = jax.Array
CellState = tuple[Array, ...]

CELL_TYPES = ("lstm", "gru")

# LeCun normal with the fan-in on axis 0, for gate-stacked kernels [in, gates, hidden].
stacked_kernel_init = nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
)
_zeros = nnx.initializers.zeros_init()


class _GatedCell(nnx.Module):
    """Parameters and input projection shared by the LSTM and GRU cells.

    Attributes (`x @ kernel` layout, G gates):
      input_kernel: W, `[input_dim, G, hidden_dim]`, applied by `project_inputs`.
      bias: b, `[G, hidden_dim]`, added by `project_inputs`.
      recurrent_kernel: U, `[step_input_dim + hidden_dim, G, hidden_dim]`,
        applied to [e_t; h_{t-1}] inside the loop.
    """

    num_gates: int = 0
    num_states: int = 0

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        *,
        step_input_dim: int = 0,
        input_axis: str | None = "embed",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        name = type(self).__name__
        check_at_least(name, input_dim=input_dim, hidden_dim=hidden_dim)
        check_at_least(name, minimum=0, step_input_dim=step_input_dim)
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.step_input_dim = step_input_dim
        self.dtype = dtype
        g, n = self.num_gates, hidden_dim
        self.input_kernel = param(
            rngs,
            stacked_kernel_init,
            (input_dim, g, n),
            (input_axis, None, "rnn_hidden"),
            param_dtype,
        )
        self.bias = param(rngs, _zeros, (g, n), (None, "rnn_hidden"), param_dtype)
        self.recurrent_kernel = param(
            rngs,
            stacked_kernel_init,
            (step_input_dim + n, g, n),
            (None, None, "rnn_hidden"),
            param_dtype,
        )

    def project_inputs(self, inputs: Array) -> Array:
        """W x + b for any number of leading axes: `[..., input_dim]` -> `[..., G, hidden_dim]`."""
        if inputs.shape[-1] != self.input_dim:
            raise ValueError(
                f"{type(self).__name__}.project_inputs: inputs must be [..., {self.input_dim}], "
                f"got {inputs.shape}"
            )
        kernel = self.input_kernel[...].astype(self.dtype)
        projected = jnp.einsum("...i,ign->...gn", inputs.astype(self.dtype), kernel)
        return projected + self.bias[...].astype(self.dtype)

    def zero_state(self, batch: int) -> CellState:
        """All-zero state: a tuple of `num_states` arrays `[batch, hidden_dim]`."""
        return tuple(
            jnp.zeros((batch, self.hidden_dim), self.dtype) for _ in range(self.num_states)
        )

    def _recurrent(self, step_input: Array | None, hidden: Array, gates: slice) -> Array:
        """U[:, gates] [e_t; h]: `[batch, len(gates), hidden_dim]`."""
        kernel = self.recurrent_kernel[:, gates].astype(self.dtype)
        if self.step_input_dim:
            if step_input is None or step_input.shape[-1] != self.step_input_dim:
                raise ValueError(
                    f"{type(self).__name__}: a step input [batch, {self.step_input_dim}] is "
                    f"required, got {None if step_input is None else step_input.shape}"
                )
            hidden = jnp.concatenate([step_input.astype(self.dtype), hidden], axis=-1)
        elif step_input is not None:
            raise ValueError(
                f"{type(self).__name__}: built without a step input (step_input_dim=0)"
            )
        return jnp.einsum("bi,ign->bgn", hidden, kernel)


class LSTMCell(_GatedCell):
    """LSTM without peepholes (Zaremba et al. 2014, sec. 3.1), the cell of Luong et al. (2015).

      [i; f; o; g] = [sigma; sigma; sigma; tanh](W x_t + b + U [e_t; h_{t-1}])
      c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)

    State `(h, c)`. Gate order in the fused kernels: i, f, o, g.
    """

    num_gates = 4
    num_states = 2

    def __call__(
        self, state: CellState, projected: Array, step_input: Array | None = None
    ) -> CellState:
        """One step: `state` `(h, c)`, `projected` W x_t + b `[batch, 4, hidden]`, e_t `[batch, step_input_dim]`."""
        hidden, cell = state
        gates = projected + self._recurrent(step_input, hidden, slice(None))
        i, f, o = (jax.nn.sigmoid(gates[:, k]) for k in range(3))
        cell = f * cell + i * jnp.tanh(gates[:, 3])
        return o * jnp.tanh(cell), cell


class GRUCell(_GatedCell):
    """Gated recurrent unit of Cho et al. (2014), as in Bahdanau et al. (2014) A.1.1 / A.2.2.

      r = sigma(W_r x_t + U_r h_{t-1} + C_r e_t)
      z = sigma(W_z x_t + U_z h_{t-1} + C_z e_t)
      h~ = tanh(W x_t + U [r * h_{t-1}] + C e_t)
      h_t = (1 - z) * h_{t-1} + z * h~

    The reset gate multiplies h_{t-1} before U (the paper's form, not the
    cuDNN variant r * (U h_{t-1})); it does not touch the step input e_t.
    State `(h,)`. Gate order in the fused kernels: r, z, candidate.
    """

    num_gates = 3
    num_states = 1

    def __call__(
        self, state: CellState, projected: Array, step_input: Array | None = None
    ) -> CellState:
        """One step: `state` `(h,)`, `projected` W x_t + b `[batch, 3, hidden]`, e_t `[batch, step_input_dim]`."""
        (hidden,) = state
        gates = projected[:, :2] + self._recurrent(step_input, hidden, slice(0, 2))
        reset, update = jax.nn.sigmoid(gates[:, 0]), jax.nn.sigmoid(gates[:, 1])
        candidate = jnp.tanh(
            projected[:, 2] + self._recurrent(step_input, reset * hidden, slice(2, 3))[:, 0]
        )
        return ((1.0 - update) * hidden + update * candidate,)


def make_cell(kind: str, input_dim: int, hidden_dim: int, **kwargs) -> LSTMCell | GRUCell:
    """`LSTMCell` for 'lstm', `GRUCell` for 'gru' (keyword arguments as their constructors)."""
    if kind == "lstm":
        return LSTMCell(input_dim, hidden_dim, **kwargs)
    if kind == "gru":
        return GRUCell(input_dim, hidden_dim, **kwargs)
    raise ValueError(f"make_cell: unknown cell {kind!r}; choose one of {CELL_TYPES}")


def reversal_indices(mask: Array) -> Array:
    """Per-example indices that reverse each sequence within its real length.

    With padding at the end and n_b real positions, index j maps to
    n_b - 1 - j for j < n_b and to j (padding stays in place). The map is its
    own inverse, so the same indices put a reversed sequence back in order.

    Args:
      mask: `[batch, length]` bool, True at real positions (padding at the end).

    Returns:
      int32 `[batch, length]`, to use with `take_along_axis` on axis 1.
    """
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)[:, None]
    positions = jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :]
    return jnp.where(positions < lengths, lengths - 1 - positions, positions)


def take_time(x: Array, indices: Array) -> Array:
    """Reorders axis 1 of `x` `[batch, length, ...]` by `indices` `[batch, length]`."""
    indices = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, indices, axis=1)


def scan_cells(
    cells: Sequence[LSTMCell | GRUCell],
    projected: Sequence[Array],
    initial: Sequence[CellState],
    mask: Array | None = None,
) -> tuple[list[Array], list[CellState]]:
    """Runs independent cells side by side over time in ONE `jax.lax.scan`.

    Used for the two directions of a bidirectional encoder layer (the
    backward inputs already reversed) and for a single direction. Only the
    recurrent matmul is inside the loop.

    Args:
      cells: the cells.
      projected: per cell, its hoisted input projection `[batch, time, G, hidden]`.
      initial: per cell, its initial state.
      mask: `[batch, time]` bool, or None. Where False, the state is carried
        unchanged, so each final state is the one after the last real step.

    Returns:
      Per cell, the outputs h_t `[batch, time, hidden]` and the final state.
    """
    time_major = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
    inputs = (tuple(time_major(p) for p in projected), None if mask is None else time_major(mask))

    def body(states, step):
        projected_t, mask_t = step
        new_states = []
        for cell, state, proj in zip(cells, states, projected_t, strict=True):
            new = cell(state, proj)
            if mask_t is not None:
                new = tuple(
                    jnp.where(mask_t[:, None], n, s) for n, s in zip(new, state, strict=True)
                )
            new_states.append(new)
        return tuple(new_states), tuple(s[0] for s in new_states)

    finals, outputs = jax.lax.scan(body, tuple(initial), inputs)
    return [jnp.swapaxes(o, 0, 1) for o in outputs], list(finals)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout with an explicit key (usable inside `lax.scan` bodies); identity without key."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
