"""The recurrent encoder of the RNN encoder-decoders: embeddings, stacked (bi)directional RNNs.

Bahdanau et al. (2014), sec. 3.2 and A.1.2: a bidirectional RNN reads the
source forwards and backwards, and the annotation of word j is the
concatenation h_j = [h->_j; h<-_j], so that it summarises the words around
j. Luong et al. (2015), sec. 3: stacked unidirectional LSTMs, optionally on
the reversed source.

Padding (token 0, at the end of each row) never leaks into a state: the
forward scan carries the state unchanged across padded steps, and the
backward direction reads each sentence reversed *within its real length*
(`rnn_cells.reversal_indices`), so that h<-_j summarises words j .. n-1 and
the backward final state is the one after word 0 (Bahdanau's h<-_1).

Efficiency: each layer's input projection (both directions) is one matmul
over the whole sequence before its scan, and the two directions of a layer
run in the same `lax.scan`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.layers.params import param
from attnx.models.checks import check_tokens
from attnx.models.rnn_cells import (
    CellState,
    dropout,
    make_cell,
    reversal_indices,
    scan_cells,
    take_time,
)
from attnx.models.rnn_config import RNNConfig

Array = jax.Array


class RNNEncoder(nnx.Module):
    """Source embeddings and `encoder_layers` stacked (bi)directional RNN layers.

    Parameters: `embedding` E_x `[src_vocab, m]`; `layers[l][d]` the cell of
    layer l, direction d (0 forward, 1 backward), input size m for l = 0 and
    `hidden_dim` x directions above.
    """

    def __init__(self, config: RNNConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        self.dtype = cfg.dtype
        self.embedding = param(
            rngs,
            nnx.initializers.normal(1.0),
            (cfg.src_vocab_size, cfg.embed_dim),
            ("vocab", "embed"),
            cfg.param_dtype,
        )
        layers = []
        for layer in range(cfg.encoder_layers):
            input_dim = cfg.embed_dim if layer == 0 else cfg.encoder_output_dim
            layers.append(
                nnx.List(
                    [
                        make_cell(
                            cfg.cell,
                            input_dim,
                            cfg.hidden_dim,
                            input_axis="embed" if layer == 0 else None,
                            dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype,
                            rngs=rngs,
                        )
                        for _ in range(cfg.directions)
                    ]
                )
            )
        self.layers = nnx.List(layers)
        self.dropout_rngs = rngs["dropout"].fork() if cfg.dropout_rate > 0 else nnx.data(None)

    def __call__(
        self, src: Array, *, train: bool = False
    ) -> tuple[Array, Array, list[list[CellState]]]:
        """Encodes a padded batch of token ids.

        Args:
          src: int `[batch, src_length]`, 0 = padding at the end of each row.
          train: dropout between layers.

        Returns:
          outputs: the top layer's annotations h_j, `[batch, src_length,
            hidden_dim x directions]` (the state carried at padded positions
            is meaningless; the mask excludes them).
          mask: `[batch, src_length]` bool, True at real tokens.
          finals: `finals[l][d]`, the final state of layer l, direction d
            (forward: after the last real word; backward: after word 0).
        """
        cfg = self.config
        src = check_tokens("RNNEncoder", src, name="src")
        mask = src != 0
        reverse = reversal_indices(mask)
        if cfg.reverse_source:
            src = take_time(src, reverse)
        x = jnp.take(self.embedding[...], src, axis=0).astype(self.dtype)
        batch = src.shape[0]
        finals = []
        for index, cells in enumerate(self.layers):
            if index > 0 and train and self.dropout_rngs is not None:
                x = dropout(x, cfg.dropout_rate, self.dropout_rngs())
            projected = [cell.project_inputs(x) for cell in cells]  # hoisted out of the scan
            if len(cells) == 2:
                projected[1] = take_time(projected[1], reverse)
            outputs, layer_finals = scan_cells(
                cells, projected, [cell.zero_state(batch) for cell in cells], mask
            )
            if len(cells) == 2:
                outputs[1] = take_time(outputs[1], reverse)
            x = jnp.concatenate(outputs, axis=-1) if len(outputs) == 2 else outputs[0]
            finals.append(layer_finals)
        if cfg.reverse_source:  # back to source order (the map is its own inverse)
            x = take_time(x, reverse)
        return x, mask, finals
