"""The attentional decoders of the RNN encoder-decoders: Bahdanau (2014) and Luong (2015).

Both decoders offer the same three operations to `attnx.models.rnn`:

  initial_state(finals)                  the decoder state from the encoder's final states
  decode(tgt_in, memory, state, train)   teacher forcing, one `lax.scan` over target steps
  step(tokens, memory, state, t)         one step, for incremental decoding

A decoder state is a dict of arrays with a leading batch axis: 'hidden'
`[batch, layers, n]`, 'cell' `[batch, layers, n]` (LSTM only) and 'feed'
`[batch, n]` (Luong's input feeding only). The attention memory (with its
key-side projection) is prepared once per source by the attention module's
`prepare_memory` and passed into the loops, never recomputed inside them.
Input projections of the target embeddings are hoisted out of the loops,
and so is every output layer that does not feed back into the recurrence.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.layers.attention_memory import AttentionMemory
from attnx.layers.luong_attention import LocalAttention, LuongAttention
from attnx.layers.params import param
from attnx.layers.recurrent_attention import AdditiveAttention
from attnx.models.rnn_cells import (
    CellState,
    dropout,
    make_cell,
    scan_cells,
    stacked_kernel_init,
)
from attnx.models.rnn_config import RNNConfig

Array = jax.Array
DecoderState = dict[str, Array]

_dense_init = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()
STATE_NAMES = ("hidden", "cell")
# The decoders' attention entries (keys of the models' weights dicts): a_t
# `[batch, (T,) src_length]`, and local-p's predicted centre p_t `[batch, (T,)]`.
ATTENTION = "decoder/attention"
ATTENTION_CENTER = "decoder/attention_center"
AttentionEntries = dict[str, Array]


def stack_states(states: list[CellState]) -> DecoderState:
    """Per-layer cell states -> {'hidden': [batch, layers, n], ('cell': ...)}."""
    return {
        name: jnp.stack([state[k] for state in states], axis=1)
        for k, name in enumerate(STATE_NAMES[: len(states[0])])
    }


def unstack_states(state: DecoderState, layers: int) -> list[CellState]:
    """The inverse of `stack_states`."""
    names = [name for name in STATE_NAMES if name in state]
    return [tuple(state[name][:, layer] for name in names) for layer in range(layers)]


class _Decoder(nnx.Module):
    """Target embeddings, the logits layer and the dropout stream shared by both decoders."""

    def __init__(self, config: RNNConfig, output_dim: int, *, rngs: nnx.Rngs):
        self.config = cfg = config
        self.dtype = cfg.dtype
        self.embedding = param(
            rngs,
            nnx.initializers.normal(1.0),
            (cfg.tgt_vocab_size, cfg.embed_dim),
            ("vocab", "embed"),
            cfg.param_dtype,
        )
        self.output_kernel = param(
            rngs, _dense_init, (output_dim, cfg.tgt_vocab_size), (None, "vocab"), cfg.param_dtype
        )
        self.output_bias = param(rngs, _zeros, (cfg.tgt_vocab_size,), ("vocab",), cfg.param_dtype)
        self.dropout_rngs = rngs["dropout"].fork() if cfg.dropout_rate > 0 else nnx.data(None)

    def _dropout_key(self, train: bool) -> Array | None:
        return self.dropout_rngs() if train and self.dropout_rngs is not None else None

    def _embed(self, tokens: Array) -> Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def _logits(self, x: Array) -> Array:
        """The softmax layer's pre-activations, float32 `[..., vocab]`."""
        dt = self.dtype
        logits = x @ self.output_kernel[...].astype(dt) + self.output_bias[...].astype(dt)
        return logits.astype(jnp.float32)


class BahdanauDecoder(_Decoder):
    """RNNsearch's decoder (Bahdanau et al. 2014, sec. 3.1 and appendix A.1.2, A.2.2).

    With s_{i-1} the previous state, E y_{i-1} the previous word's embedding
    and h_j the annotations:

      e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j),  alpha_i = softmax_j(e_ij)   (eq. 6)
      c_i  = sum_j alpha_ij h_j                                             (eq. 5)
      s_i  = f(s_{i-1}, E y_{i-1}, c_i)   (GRU of A.2.2, or an LSTM)         (eq. 4)
      t~_i = U_o s_{i-1} + V_o E y_{i-1} + C_o c_i,   t~_i in R^{2l}
      t_i,j = max(t~_i,2j-1, t~_i,2j)     (maxout, l units)
      p(y_i | ...) = softmax(W_o t_i)                                        (A.2.2)
      s_0 = tanh(W_s h<-_1)                                                  (A.2.2)

    h<-_1 is the top encoder layer's backward state at the first word (the
    forward final state for a unidirectional encoder). With an LSTM cell, s
    is (h, c) and W_s maps h<-_1 to both; the attention uses h. As the paper
    omits biases "to make the equations less cluttered", the cell, W_s, the
    maxout layer and W_o have biases; the attention has none (A.1.2).

    Parameters: `embedding` E `[tgt_vocab, m]`; `cell`; `attention`
    (`AdditiveAttention`: W_a, U_a, v_a); `init_kernel` W_s `[n_enc, S, n]`,
    `init_bias` `[S, n]` (S = 1 GRU, 2 LSTM); `readout_kernel` [U_o; V_o; C_o]
    `[n + m + 2 n_enc, 2l]`, `readout_bias` `[2l]`; `output_kernel` W_o
    `[l, tgt_vocab]`, `output_bias`.
    """

    def __init__(self, config: RNNConfig, *, rngs: nnx.Rngs):
        super().__init__(config, config.maxout_units, rngs=rngs)
        cfg, pdt = config, config.param_dtype
        n, m, annotation = cfg.decoder_dim, cfg.embed_dim, cfg.encoder_output_dim
        self.cell = make_cell(
            cfg.cell, m, n, step_input_dim=annotation, dtype=cfg.dtype, param_dtype=pdt, rngs=rngs
        )
        states = self.cell.num_states
        self.init_kernel = param(
            rngs, stacked_kernel_init, (cfg.hidden_dim, states, n), (None, None, "rnn_hidden"), pdt
        )
        self.init_bias = param(rngs, _zeros, (states, n), (None, "rnn_hidden"), pdt)
        a = cfg.mechanism
        if a.score == "additive":
            self.attention = AdditiveAttention(
                n,
                annotation,
                cfg.attention_dim or n,
                normalizer=a.normalizer,
                dtype=cfg.dtype,
                param_dtype=pdt,
                rngs=rngs,
            )
        else:
            # Luong's scores of s_{i-1}: the same context c_i, other alignment.
            self.attention = LuongAttention(
                n,
                annotation,
                score=a.score,
                attention_dim=(cfg.attention_dim or n) if a.score == "concat" else None,
                max_source_length=cfg.max_source_length if a.score == "location" else None,
                normalizer=a.normalizer,
                dtype=cfg.dtype,
                param_dtype=pdt,
                rngs=rngs,
            )
        self.readout_kernel = param(
            rngs, _dense_init, (n + m + annotation, 2 * cfg.maxout_units), (None, "mlp"), pdt
        )
        self.readout_bias = param(rngs, _zeros, (2 * cfg.maxout_units,), ("mlp",), pdt)

    def initial_state(self, finals: list[list[CellState]]) -> DecoderState:
        """s_0 = tanh(W_s h<-_1 + b) from the encoder's final states (`RNNEncoder`)."""
        source = finals[-1][-1][0].astype(self.dtype)
        state = jnp.tanh(
            jnp.einsum("bi,isn->bsn", source, self.init_kernel[...].astype(self.dtype))
            + self.init_bias[...].astype(self.dtype)
        )
        return stack_states([tuple(state[:, k] for k in range(state.shape[1]))])

    def prepare_memory(self, annotations: Array, mask: Array) -> AttentionMemory:
        """U_a h_j for every source position, once per source."""
        return self.attention.prepare_memory(annotations, mask=mask)

    def _step(
        self, state: CellState, projected: Array, memory: AttentionMemory
    ) -> tuple[CellState, tuple[Array, Array, Array]]:
        """Attention from s_{i-1}, then the cell on [E y_{i-1}; c_i]; returns s_i and (s_{i-1}, c_i, alpha_i)."""
        query = state[0]
        context, alpha = self.attention(query, memory, return_weights=True)
        return self.cell(state, projected, context), (query, context, alpha)

    def _readout(self, query: Array, embedded: Array, context: Array, key: Array | None) -> Array:
        """Maxout deep output and W_o: logits `[..., vocab]` from s_{i-1}, E y_{i-1}, c_i."""
        dt = self.dtype
        joined = jnp.concatenate([query, embedded, context], axis=-1)
        pre = joined @ self.readout_kernel[...].astype(dt) + self.readout_bias[...].astype(dt)
        maxout = jnp.max(pre.reshape(*pre.shape[:-1], self.config.maxout_units, 2), axis=-1)
        return self._logits(dropout(maxout, self.config.dropout_rate, key))

    def decode(
        self, tgt_in: Array, memory: AttentionMemory, state: DecoderState, *, train: bool = False
    ) -> tuple[Array, AttentionEntries]:
        """Teacher forcing. Returns logits `[batch, T, vocab]` and the attention entries (`[batch, T, ...]`)."""
        embedded = self._embed(tgt_in)
        projected = self.cell.project_inputs(embedded)  # hoisted: W E y_{i-1} + b for all i

        def body(carry, projected_t):
            return self._step(carry, projected_t, memory)

        (initial,) = unstack_states(state, 1)
        _, outputs = jax.lax.scan(body, initial, jnp.swapaxes(projected, 0, 1))
        queries, contexts, alphas = (jnp.swapaxes(x, 0, 1) for x in outputs)
        # The deep output does not feed back into the recurrence: all steps at once.
        logits = self._readout(queries, embedded, contexts, self._dropout_key(train))
        return logits, {ATTENTION: alphas}

    def step(
        self, tokens: Array, memory: AttentionMemory, state: DecoderState, step: Array
    ) -> tuple[Array, AttentionEntries, DecoderState]:
        """One step from y_{i-1} `[batch]`: logits `[batch, vocab]`, {ATTENTION: alpha_i `[batch, src_length]`}, s_i."""
        del step  # the additive attention does not depend on the position
        embedded = self._embed(tokens)
        (current,) = unstack_states(state, 1)
        new, (query, context, alpha) = self._step(
            current, self.cell.project_inputs(embedded), memory
        )
        return (
            self._readout(query, embedded, context, None),
            {ATTENTION: alpha},
            stack_states([new]),
        )


class LuongDecoder(_Decoder):
    """The stacking-LSTM decoder of Luong et al. (2015), sec. 3 and 3.3.

    With h_t the top layer's CURRENT state and h_s the annotations:

      a_t = align(h_t, h_s) (global, eq. 7-9) or local-m / local-p (sec. 3.2, eq. 9-10)
      c_t = sum_s a_t(s) h_s
      h~_t = tanh(W_c [c_t; h_t])                                   (eq. 5)
      p(y_t | y_<t, x) = softmax(W_s h~_t)                          (eq. 6)

    Input feeding (sec. 3.3, `input_feeding=True`): h~_{t-1} is concatenated
    with E y_{t-1} as the first layer's input (h~_0 = 0). The decoder starts
    from the encoder's final states, layer by layer (directions concatenated
    for a bidirectional encoder). Dropout (Zaremba et al. 2014) between the
    layers and on h~_t, which is also what gets fed back. W_s has a bias.

    Without input feeding the layers do not depend on the attention, so the
    teacher-forced pass runs each layer as its own scan with its input
    projection hoisted, and attends for all t at once after the loops.

    Parameters: `embedding` E `[tgt_vocab, m]`; `cells[l]` (layer 0's
    recurrent kernel takes [h~_{t-1}; h] with input feeding); `attention`
    (`LuongAttention` / `LocalAttention` with `output_kernel` = W_c^T
    `[n_enc + n, n]`); `output_kernel` W_s^T `[n, tgt_vocab]`, `output_bias`.
    """

    def __init__(self, config: RNNConfig, *, rngs: nnx.Rngs):
        super().__init__(config, config.decoder_dim, rngs=rngs)
        cfg, pdt = config, config.param_dtype
        n, annotation = cfg.decoder_dim, cfg.encoder_output_dim
        self.cells = nnx.List(
            [
                make_cell(
                    cfg.cell,
                    cfg.embed_dim if layer == 0 else n,
                    n,
                    step_input_dim=n if layer == 0 and cfg.input_feeding else 0,
                    input_axis="embed" if layer == 0 else None,
                    dtype=cfg.dtype,
                    param_dtype=pdt,
                    rngs=rngs,
                )
                for layer in range(cfg.decoder_layers)
            ]
        )
        a = cfg.mechanism
        common = dict(
            score=a.score,
            attention_dim=(cfg.attention_dim or n) if a.score == "concat" else None,
            output_projection=True,
            output_dim=n,
            normalizer=a.normalizer,
            dtype=cfg.dtype,
            param_dtype=pdt,
            rngs=rngs,
        )
        if not a.is_local:
            self.attention = LuongAttention(
                n,
                annotation,
                max_source_length=cfg.max_source_length if a.score == "location" else None,
                **common,
            )
        else:
            # The layer names the modes as the paper does: 'local-m', 'local-p'.
            mode = a.local.replace("_", "-")
            self.attention = LocalAttention(n, annotation, window=a.window, mode=mode, **common)

    def initial_state(self, finals: list[list[CellState]]) -> DecoderState:
        """Layer l starts from encoder layer l's final state; h~_0 = 0 for input feeding."""
        states = [
            tuple(
                jnp.concatenate(parts, axis=-1).astype(self.dtype)
                for parts in zip(*directions, strict=True)
            )
            for directions in finals
        ]
        state = stack_states(states)
        if self.config.input_feeding:
            state["feed"] = jnp.zeros(state["hidden"][:, 0].shape, self.dtype)
        return state

    def prepare_memory(self, annotations: Array, mask: Array) -> AttentionMemory:
        """The key side of the score (W_a h_s for 'general'), once per source."""
        return self.attention.prepare_memory(annotations, mask=mask)

    def _attend(
        self, hidden: Array, memory: AttentionMemory, t: Array | int, key: Array | None
    ) -> tuple[Array, dict[str, Array]]:
        """h_t (`[batch, n]` or `[batch, T, n]` from step t) -> (h~_t, attention entries).

        The entries: a_t under `ATTENTION`, and for local-p the predicted
        centre p_t (`[batch]` or `[batch, T]`) under `ATTENTION_CENTER`: the
        window |s - p_t| <= D is the mask a_t was computed under, which a
        trace records (p_t is a function of h_t alone; XLA drops it from
        steps that do not use it, e.g. training).
        """
        mechanism = self.config.mechanism
        if not mechanism.is_local:
            context, alpha = self.attention(hidden, memory, return_weights=True)
        else:
            context, alpha = self.attention(hidden, memory, step=t, return_weights=True)
        entries = {ATTENTION: alpha}
        if mechanism.local == "local_p":
            entries[ATTENTION_CENTER] = self.attention.positions(hidden, memory, step=t)
        attentional = self.attention.attentional_hidden(context, hidden)
        return dropout(attentional, self.config.dropout_rate, key), entries

    def _layers_step(
        self, states: list[CellState], projected: Array, feed: Array | None, key: Array | None
    ) -> list[CellState]:
        """One step up the stack; `projected` is layer 0's hoisted W E y_{t-1} + b."""
        new_states = []
        for index, cell in enumerate(self.cells):
            if index == 0:
                new = cell(states[0], projected, feed)
            else:
                below = new_states[-1][0]
                if key is not None:
                    below = dropout(below, self.config.dropout_rate, jax.random.fold_in(key, index))
                new = cell(states[index], cell.project_inputs(below))
            new_states.append(new)
        return new_states

    def decode(
        self, tgt_in: Array, memory: AttentionMemory, state: DecoderState, *, train: bool = False
    ) -> tuple[Array, AttentionEntries]:
        """Teacher forcing. Returns logits `[batch, T, vocab]` and the attention entries (`[batch, T, ...]`)."""
        cfg = self.config
        embedded = self._embed(tgt_in)
        initial = unstack_states(state, cfg.decoder_layers)
        key = self._dropout_key(train)
        if not cfg.input_feeding:
            x = embedded
            for index, cell in enumerate(self.cells):
                if index > 0 and key is not None:
                    x = dropout(x, cfg.dropout_rate, jax.random.fold_in(key, index))
                (x,), _ = scan_cells([cell], [cell.project_inputs(x)], [initial[index]])
            attentional, entries = self._attend(x, memory, 0, key)
            return self._logits(attentional), entries

        steps = tgt_in.shape[1]
        projected = self.cells[0].project_inputs(embedded)  # hoisted: layer 0's W E y + b
        keys = None if key is None else jax.random.split(key, steps)

        def body(carry, inputs):
            states, feed = carry
            projected_t, t, key_t = inputs
            states = self._layers_step(states, projected_t, feed, key_t)
            output_key = None if key_t is None else jax.random.fold_in(key_t, 0)
            attentional, entries = self._attend(states[-1][0], memory, t, output_key)
            return (states, attentional), (attentional, entries)

        _, (attentionals, entries) = jax.lax.scan(
            body,
            (initial, state["feed"]),
            (jnp.swapaxes(projected, 0, 1), jnp.arange(steps), keys),
        )
        attentionals = jnp.swapaxes(attentionals, 0, 1)
        entries = {name: jnp.swapaxes(value, 0, 1) for name, value in entries.items()}
        return self._logits(attentionals), entries  # softmax layer hoisted out of the loop

    def step(
        self, tokens: Array, memory: AttentionMemory, state: DecoderState, step: Array
    ) -> tuple[Array, AttentionEntries, DecoderState]:
        """One step from y_{t-1} `[batch]` at target position `step`: logits, entries (a_t, p_t), new state."""
        cfg = self.config
        projected = self.cells[0].project_inputs(self._embed(tokens))
        states = self._layers_step(
            unstack_states(state, cfg.decoder_layers), projected, state.get("feed"), None
        )
        attentional, entries = self._attend(states[-1][0], memory, step, None)
        new_state = stack_states(states)
        if cfg.input_feeding:
            new_state["feed"] = attentional
        return self._logits(attentional), entries, new_state
