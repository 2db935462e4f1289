"""Show, Attend and Tell: an LSTM captioner with spatial attention (Xu et al. 2015).

Xu, Ba, Kiros, Cho, Courville, Salakhutdinov, Zemel & Bengio (2015), "Show,
Attend and Tell: Neural Image Caption Generation with Visual Attention".

An encoder (`attnx.models.image_encoders`) turns the image into L annotation
vectors a_i in R^C (sec. 3.1.1). An LSTM decoder emits one word per step
(sec. 3.1.2); with E the embedding matrix, y_{t-1} the previous word and
z_t the context,

  z_t = beta_t sum_i alpha_ti a_i,  alpha_t = softmax_i(f_att(a_i, h_{t-1}))  (eq. 4-6, 13)
  beta_t = sigmoid(f_beta(h_{t-1}))                                         (sec. 4.2.1)
  [i_t; f_t; o_t; g_t] = [sigma; sigma; sigma; tanh](T [E y_{t-1}; h_{t-1}; z_t])  (eq. 1)
  c_t = f_t * c_{t-1} + i_t * g_t,  h_t = o_t * tanh(c_t)                   (eq. 2-3)
  c_0 = f_init,c(mean_i a_i),  h_0 = f_init,h(mean_i a_i)   (sec. 3.1.2, "top right of p. 4")
  p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))                          (eq. 7)

The f_att MLP and its hoisted feature projection are
`attnx.layers.spatial.SpatialAttention` (used with `gate=False`: the
captioner owns beta_t, so that the same gate multiplies a soft context and a
hard sample, and beta_t can be returned). f_init,{h,c} are tanh layers on top
of `init_hidden_layers` shared ReLU layers (the authors' code). Dropout
(`dropout_rate`) is applied where the authors' code applies it: after the
init MLP's hidden layers, on h_t before L_h, and on the deep output before L_o.

Attention types (`attention=`):

* 'soft' (sec. 4.2): z_t uses the expectation sum_i alpha_ti a_i.
* 'hard' (sec. 4.1): in training (`train=True`) a location s_t ~
  Multinoulli(alpha_t) is sampled every step and z_t = beta_t a_{s_t}; as in
  the paper, for each image with probability `hard_expectation_prob` (0.5)
  the sample is replaced by its expected value alpha_t. Train with
  `attnx.models.caption_losses.hard_attention_loss` (REINFORCE, eq. 12), as
  the training loop does for `experiments/digits_spatial.py:hard`.
  In evaluation (`train=False`, and every `decode_step`) decoding must be
  deterministic for beam search: `hard_eval='expectation'` (default) uses
  alpha_t as in soft attention (the paper's deterministic approximation);
  'argmax' attends to the single most likely location.

Efficiency: the feature projection W_a a_i (attention) and the embedding
projection W_e E y_{t-1} (LSTM input, for all t at once) are computed
outside the `lax.scan`; the loop only does the h_{t-1}-dependent work (one
product with the fused [z_t; h_{t-1}] kernel, the attention's query
projection, the gate). The deep output (eq. 7) is applied to all steps after
the loop.

Interface (shared by the attnx seq2seq models, see attnx.decoding):
`encode(src)` -> `CaptionerEncoding`; `decode(tgt_in, encoded)` -> logits
`[batch, T, vocab]` (+ weights); `__call__`; `init_cache(encoded, max_length)`;
`decode_step(tokens)`. The weights dict holds
'decoder/spatial_attention' and 'alignment' (alpha, `[batch, T, L]`, L =
H x W row-major; `encoded.memory.as_grid(w)` gives `[batch, T, H, W]`),
'gate' (beta, `[batch, T]`), and with hard attention 'location' (what z_t
used: a one-hot sample, alpha, or an argmax one-hot, `[batch, T, L]`) and in
training 'sampled' (`[batch]` bool, False where the expectation replaced the
sample).
"""

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnx.layers.params import param
from attnx.layers.source_cache import SourceCache
from attnx.layers.spatial import SpatialAttention, SpatialMemory, sample_location
from attnx.models.captioner_config import (
    CaptionerConfig,
    coco_features,
    coco_vgg,
    digits_small,
    tiny,
)
from attnx.models.checks import check_at_least, check_tokens
from attnx.models.image_encoders import ConvEncoder, PrecomputedFeatures

# The presets are re-exported so that `attnx.models.captioner` is the one import users need.
__all__ = [
    "Captioner",
    "CaptionerConfig",
    "CaptionerEncoding",
    "coco_features",
    "coco_vgg",
    "digits_small",
    "tiny",
]

Array = jax.Array

# LeCun normal with the fan-in on axis 0, for gate-stacked kernels [in, 4, hidden].
_stacked_kernel_init = nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
)
_dense_init = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()


@struct.dataclass
class CaptionerEncoding:
    """What `Captioner.encode` returns (every leaf has a leading batch axis).

    Attributes:
      memory: the annotation vectors a_i `[batch, L, C]`, their attention
        projection `[batch, L, attention_dim]` and mask `[batch, L]`.
      mean: (1/L) sum_i a_i over real locations, `[batch, C]`.
      hidden: h_0 = f_init,h(mean), `[batch, hidden_dim]`.
      cell: c_0 = f_init,c(mean), `[batch, hidden_dim]`.
    """

    memory: SpatialMemory
    mean: Array
    hidden: Array
    cell: Array


class Captioner(nnx.Module):
    """Show, Attend and Tell (Xu et al. 2015) with soft or hard spatial attention.

    Args:
      config: a `CaptionerConfig` (see `digits_small`, `coco_vgg`, `tiny`).
      rngs: 'params' for initialisation; 'dropout' (or 'default') for dropout
        and, with hard attention, the first key of the model's own 'location'
        stream, which samples locations (reseed it with
        `nnx.reseed(model, location=key)`).

    Parameters (besides the encoder's and the attention's), `x @ kernel` layout:
      embedding E `[vocab, m]`; init_layers (ReLU, `[C, C]`);
      init_kernel `[C, 2, n]` / init_bias `[2, n]` (f_init,h and f_init,c);
      gate_kernel `[n]` / gate_bias `[]` (beta); input_kernel `[m, 4, n]`
      (E y_{t-1} -> gates i, f, o, g), recurrent_kernel `[C + n, 4, n]`
      ([z_t; h_{t-1}] -> gates), lstm_bias `[4, n]`; readout_kernel
      `[n + C, m]` ([L_h; L_z]), readout_bias `[m]`; logits_kernel `[m, vocab]`
      (L_o), logits_bias `[vocab]`.
    """

    def __init__(self, config: CaptionerConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        self.dtype = cfg.dtype
        pdt = cfg.param_dtype
        if cfg.encoder == "conv":
            self.encoder = ConvEncoder(
                cfg.image_channels,
                cfg.conv_blocks,
                pool_last_block=cfg.pool_last_block,
                conv_implementation=cfg.conv_implementation,
                coord_channels=cfg.coord_channels,
                dtype=cfg.dtype,
                param_dtype=pdt,
                rngs=rngs,
            )
        else:
            self.encoder = PrecomputedFeatures(cfg.feature_dim, dtype=cfg.dtype)
        c, n, m, v = cfg.annotation_dim, cfg.hidden_dim, cfg.embed_dim, cfg.vocab_size
        self.embedding = param(rngs, nnx.initializers.normal(1.0), (v, m), ("vocab", "embed"), pdt)
        self.init_layers = nnx.List(
            [
                nnx.Dict(
                    kernel=param(rngs, _dense_init, (c, c), ("channels", None), pdt),
                    bias=param(rngs, _zeros, (c,), (None,), pdt),
                )
                for _ in range(cfg.init_hidden_layers)
            ]
        )
        self.init_kernel = param(
            rngs, _stacked_kernel_init, (c, 2, n), ("channels", None, "rnn_hidden"), pdt
        )
        self.init_bias = param(rngs, _zeros, (2, n), (None, "rnn_hidden"), pdt)
        a = cfg.mechanism
        self.attention = SpatialAttention(
            c,
            n,
            cfg.attention_dim,
            gate=False,
            normalizer=a.normalizer,
            dtype=cfg.dtype,
            param_dtype=pdt,
            rngs=rngs,
        )
        if a.gate:
            self.gate_kernel = param(
                rngs, nnx.initializers.normal(n**-0.5), (n,), ("rnn_hidden",), pdt
            )
            self.gate_bias = param(rngs, _zeros, (), (), pdt)
        else:
            self.gate_kernel = self.gate_bias = nnx.data(None)
        self.input_kernel = param(
            rngs, _stacked_kernel_init, (m, 4, n), ("embed", None, "rnn_hidden"), pdt
        )
        self.recurrent_kernel = param(
            rngs, _stacked_kernel_init, (c + n, 4, n), (None, None, "rnn_hidden"), pdt
        )
        self.lstm_bias = param(rngs, _zeros, (4, n), (None, "rnn_hidden"), pdt)
        self.readout_kernel = param(rngs, _dense_init, (n + c, m), (None, "embed"), pdt)
        self.readout_bias = param(rngs, _zeros, (m,), ("embed",), pdt)
        self.logits_kernel = param(rngs, _dense_init, (m, v), ("embed", "vocab"), pdt)
        self.logits_bias = param(rngs, _zeros, (v,), ("vocab",), pdt)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs if cfg.dropout_rate > 0 else None)
        self.hard = a.kind == "hard"
        # Location samples have their own stream ('location'), so that a
        # training step can reseed it apart from dropout (attnx.training.steps).
        self.location_rngs = (
            nnx.RngStream(rngs["dropout"](), tag="location") if self.hard else nnx.data(None)
        )

    # -- encoder -------------------------------------------------------------

    def encode(
        self, src: Array, *, train: bool = False, mask: Array | None = None
    ) -> CaptionerEncoding:
        """Annotation vectors, their attention projection and the initial LSTM state.

        Args:
          src: images `[batch, height, width, image_channels]` ('conv'), or
            feature maps `[batch, H, W, C]` / `[batch, L, C]` ('features').
          train: dropout on.
          mask: `[batch, H, W]` / `[batch, L]` True at real locations (padded
            precomputed grids); default all.

        Returns:
          A `CaptionerEncoding`.
        """
        features = self.encoder(src)
        memory = self.attention.prepare_features(features, mask)  # W_a a_i + b, hoisted
        real = memory.mask.astype(jnp.float32)[..., None]
        mean = jnp.sum(memory.features.astype(jnp.float32) * real, axis=1) / jnp.maximum(
            jnp.sum(real, axis=1), 1.0
        )
        x = mean.astype(self.dtype)
        for layer in self.init_layers:
            kernel, bias = layer["kernel"][...], layer["bias"][...]
            x = jax.nn.relu(x @ kernel.astype(self.dtype) + bias.astype(self.dtype))
            x = self.dropout(x, deterministic=not train)
        state = jnp.tanh(
            jnp.einsum("bc,cgn->bgn", x, self.init_kernel[...].astype(self.dtype))
            + self.init_bias[...].astype(self.dtype)
        )
        return CaptionerEncoding(memory, mean.astype(self.dtype), state[:, 0], state[:, 1])

    # -- decoder -------------------------------------------------------------

    def _embed(self, tokens: Array) -> tuple[Array, Array]:
        """E y `[..., m]` and its LSTM input projection W_e E y + b `[..., 4, n]`."""
        embedded = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
        projected = jnp.einsum(
            "...m,mgn->...gn", embedded, self.input_kernel[...].astype(self.dtype)
        )
        return embedded, projected + self.lstm_bias[...].astype(self.dtype)

    def _step(self, memory: SpatialMemory, hidden, cell, projected_input, key, use_sample):
        """One step of eq. 1-6 from h_{t-1}, c_{t-1}; returns the new state and the step's outputs."""
        dt = self.dtype
        soft_context, alpha = self.attention(hidden, memory, return_weights=True)
        location = alpha
        context = soft_context
        if self.hard:
            if key is not None:  # training: s_t ~ Multinoulli(alpha_t), or alpha_t for some images
                sample, _ = sample_location(alpha, key)
                location = jnp.where(use_sample[:, None], sample, alpha)
            elif self.config.hard_eval == "argmax":
                location = jax.nn.one_hot(jnp.argmax(alpha, axis=-1), alpha.shape[-1], dtype=dt)
                location = location * jnp.any(memory.mask, axis=-1, keepdims=True)
            if location is not alpha:
                context = jnp.einsum("bl,blc->bc", location.astype(dt), memory.features)
        if self.gate_kernel is not None:
            gate = jax.nn.sigmoid(
                hidden @ self.gate_kernel[...].astype(dt) + self.gate_bias[...].astype(dt)
            )
        else:
            gate = jnp.ones(hidden.shape[:1], dt)
        z = gate[:, None] * context
        gates = projected_input + jnp.einsum(
            "bi,ign->bgn",
            jnp.concatenate([z, hidden], axis=-1),
            self.recurrent_kernel[...].astype(dt),
        )
        i, f, o = (jax.nn.sigmoid(gates[:, k]) for k in range(3))
        # The cell state accumulates over the caption: keep it in float32 under bf16 compute.
        cell = (f * cell + i * jnp.tanh(gates[:, 3])).astype(jnp.float32)
        hidden = (o * jnp.tanh(cell)).astype(dt)
        return hidden, cell, (z, alpha, gate, location)

    def _readout(self, embedded: Array, hidden: Array, z: Array, train: bool) -> Array:
        """eq. 7: logits = L_o(E y_{t-1} + L_h h_t + L_z z_t), `[..., vocab]` float32."""
        dt = self.dtype
        hidden = self.dropout(hidden, deterministic=not train)
        out = (
            embedded
            + jnp.concatenate([hidden, z], axis=-1) @ self.readout_kernel[...].astype(dt)
            + self.readout_bias[...].astype(dt)
        )
        if self.config.deep_output_tanh:
            out = jnp.tanh(out)
        out = self.dropout(out, deterministic=not train)
        logits = out @ self.logits_kernel[...].astype(dt) + self.logits_bias[...].astype(dt)
        return logits.astype(jnp.float32)

    def decode(
        self,
        tgt_in: Array,
        encoded: CaptionerEncoding,
        *,
        train: bool = False,
        return_weights: bool = False,
    ) -> Array | tuple[Array, dict[str, Array]]:
        """Teacher forcing: logits for every step given the previous words.

        Args:
          tgt_in: int `[batch, T]`, the caption shifted right (bos first).
          encoded: from `encode`.
          train: dropout on; with hard attention, sample locations (sec. 4.1).
          return_weights: also return the weights dict (module docstring).

        Returns:
          logits `[batch, T, vocab]` (float32), and the weights dict if asked.
        """
        batch = encoded.hidden.shape[0]
        tgt_in = check_tokens("Captioner.decode", tgt_in, batch=batch)
        embedded, projected = self._embed(tgt_in)  # hoisted: all steps at once
        steps = tgt_in.shape[1]
        sampling = self.hard and train
        if sampling:
            keys = jax.random.split(self.location_rngs(), steps)
            use_sample = jax.random.bernoulli(
                self.location_rngs(), 1.0 - self.config.hard_expectation_prob, (batch,)
            )
        else:
            keys, use_sample = None, None
        memory = encoded.memory

        def body(carry, inputs):
            hidden, cell = carry
            projected_t, key = inputs
            hidden, cell, (z, alpha, gate, location) = self._step(
                memory, hidden, cell, projected_t, key, use_sample
            )
            return (hidden, cell), (hidden, z, alpha, gate, location)

        _, (hiddens, zs, alphas, gates, locations) = jax.lax.scan(
            body,
            (encoded.hidden.astype(self.dtype), encoded.cell.astype(jnp.float32)),
            (jnp.swapaxes(projected, 0, 1), keys),
        )
        to_batch_major = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
        hiddens, zs, alphas, gates, locations = map(
            to_batch_major, (hiddens, zs, alphas, gates, locations)
        )
        logits = self._readout(embedded, hiddens, zs, train)
        if not return_weights:
            return logits
        return logits, self._weights(alphas, gates, locations, use_sample)

    def _weights(self, alphas, gates, locations, use_sample) -> dict[str, Array]:
        weights = {"decoder/spatial_attention": alphas, "alignment": alphas, "gate": gates}
        if self.hard:
            weights["location"] = locations
            if use_sample is not None:
                weights["sampled"] = use_sample
        return weights

    def __call__(
        self, src: Array, tgt_in: Array, *, train: bool = False, return_weights: bool = False
    ) -> Array | tuple[Array, dict[str, Array]]:
        """`decode(tgt_in, encode(src))`."""
        encoded = self.encode(src, train=train)
        return self.decode(tgt_in, encoded, train=train, return_weights=return_weights)

    # -- incremental decoding ------------------------------------------------

    def init_cache(self, encoded: CaptionerEncoding, max_length: int) -> None:
        """Holds the LSTM state and the (projected) annotations in `nnx.Cache` variables.

        Args:
          encoded: from `encode` (tiled by beam if needed).
          max_length: the longest caption to decode; the LSTM state does not
            grow with it, so it is only checked.
        """
        check_at_least("Captioner.init_cache", max_length=max_length)
        memory = encoded.memory
        self.cache_hidden = nnx.Cache(encoded.hidden.astype(self.dtype))
        self.cache_cell = nnx.Cache(encoded.cell.astype(jnp.float32))
        self.cache_features = SourceCache(memory.features)
        self.cache_projected = SourceCache(memory.projected)
        self.cache_mask = SourceCache(memory.mask)

    def decode_step(
        self, tokens: Array, *, return_weights: bool = False
    ) -> Array | tuple[Array, dict[str, Array]]:
        """One step from the cache: tokens int `[batch, 1]` (the previous words) -> logits `[batch, vocab]`.

        Evaluation mode (no dropout; hard attention uses `hard_eval`). The
        weights dict is that of `decode` with T = 1.
        """
        if not hasattr(self, "cache_hidden"):
            raise ValueError("Captioner.decode_step: call init_cache(encoded, max_length) first")
        hidden, cell = self.cache_hidden[...], self.cache_cell[...]
        tokens = check_tokens("Captioner.decode_step", tokens, batch=hidden.shape[0], length=1)
        embedded, projected = self._embed(tokens[:, 0])
        memory = SpatialMemory(
            self.cache_features[...], self.cache_projected[...], self.cache_mask[...]
        )
        hidden, cell, (z, alpha, gate, location) = self._step(
            memory, hidden, cell, projected, None, None
        )
        self.cache_hidden[...] = hidden
        self.cache_cell[...] = cell
        logits = self._readout(embedded, hidden, z, train=False)
        if not return_weights:
            return logits
        return logits, self._weights(alpha[:, None], gate[:, None], location[:, None], None)
