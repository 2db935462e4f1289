"""Building blocks of ConvS2S (Gehring et al. 2017, "Convolutional Sequence to
Sequence Learning"): weight-normalised linear and convolution layers, the GLU
blocks of the encoder and decoder, and the encoder-gradient scaling.

* Weight normalisation (Salimans & Kingma 2016, eq. 2; ConvS2S sec. 3.4):
  w = g v / ||v||, with one gain g per output unit and the norm taken over all
  the other axes (the input features, and the kernel width of a convolution),
  as PyTorch's `weight_norm(dim=<output axis>)` in fairseq.
* Initialisation (sec. 3.5): v ~ N(0, sqrt(p / n_l)) for a layer whose output is
  not fed to a GLU and v ~ N(0, sqrt(4 p / n_l)) for the convolutions feeding a
  GLU, where n_l = fan-in (k x d for a convolution) and p the probability of
  *retaining* a unit (1 - dropout rate) when the layer's input was dropped out
  (p = 1 otherwise); biases are zero and g = ||v||, so that w = v at the start.
* GLU block (sec. 3.2): Y = conv(X) in R^{2d}, [A B] = Y, v([A B]) = A * sigmoid(B)
  (eq. of sec. 3.2), residual h^l = (v(conv(h^{l-1})) + h^{l-1}) sqrt(0.5)
  (sec. 3.2 and the sqrt(0.5) of sec. 3.4). Encoder convolutions are centred
  (pad (k-1)/2 each side, the extra one on the right for even k); decoder ones
  are causal (pad k-1 on the left) so no future target is seen.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.layers.mesh_axes import split_over_batch_only
from attnx.layers.multi_step import MultiStepAttention
from attnx.layers.params import param

Array = jax.Array

SQRT_HALF = math.sqrt(0.5)


# ---------------------------------------------------------------- gradient scaling


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: Array, factor: float) -> Array:
    """Identity in the forward pass; multiplies the incoming gradient by `factor`.

    ConvS2S sec. 3.4 scales the gradients of the encoder by the number of
    attention mechanisms using it; fairseq applies this as `GradMultiply` on
    the encoder output z with factor 1 / (2 x number of attention layers).
    """
    return x


def _scale_gradient_fwd(x, factor):
    return x, None


def _scale_gradient_bwd(factor, _, cotangent):
    return (cotangent * jnp.asarray(factor, cotangent.dtype),)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


# ---------------------------------------------------------------- GLU, weight norm


def glu(y: Array) -> Array:
    """Gated linear unit (sec. 3.2): [A B] -> A * sigmoid(B), halving the last axis."""
    a, b = jnp.split(y, 2, axis=-1)
    return a * jax.nn.sigmoid(b)


def _normalized(direction: Array, gain: Array | None, norm_axes: tuple[int, ...]) -> Array:
    """w = g v / ||v|| (Salimans & Kingma 2016, eq. 2), norm over `norm_axes` per output unit."""
    if gain is None:
        return direction
    norm = jnp.sqrt(jnp.sum(jnp.square(direction), axis=norm_axes, keepdims=True))
    return direction * (gain / norm)


class WeightNormLinear(nnx.Module):
    """y = x w + b with w = g v / ||v|| (norm over the input axis of each output unit).

    Args:
      in_features / out_features: sizes.
      axes: logical names of the kernel's two axes, e.g. ('embed', 'channels').
      retain: p of sec. 3.5, the probability of retaining an input unit
        (1 - dropout rate when the input is dropped out); v ~ N(0, sqrt(p / in)).
      weight_norm: False = a plain kernel w = v (no gain).

    Attributes:
      direction: v `[in, out]`; gain: g `[out]` (None without weight norm); bias `[out]`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        *,
        retain: float = 1.0,
        weight_norm: bool = True,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        std = math.sqrt(retain / in_features)
        self.direction = param(
            rngs, nnx.initializers.normal(std), (in_features, out_features), axes, param_dtype
        )
        self.gain = _initial_gain(rngs, self.direction, (0,), axes[1], param_dtype, weight_norm)
        self.bias = param(
            rngs, nnx.initializers.zeros_init(), (out_features,), axes[1:], param_dtype
        )

    def kernel(self) -> Array:
        """The effective kernel w `[in, out]`, computed in the parameter dtype."""
        gain = None if self.gain is None else self.gain[...]
        return _normalized(self.direction[...], gain, (0,))

    def __call__(self, x: Array) -> Array:
        """`[..., in]` -> `[..., out]` in the compute dtype."""
        dt = self.dtype
        return x.astype(dt) @ self.kernel().astype(dt) + self.bias[...].astype(dt)


class WeightNormConv(nnx.Module):
    """1-d convolution over time with a weight-normalised kernel (sec. 3.2, 3.4).

    y_t = sum_{j < k} x_{t + j - left} w_j + b, w = g v / ||v|| with the norm over
    (width, in) per output channel. `padding='causal'` puts all k - 1 padding
    positions on the left (decoder), 'centered' splits them (encoder).

    Args:
      in_features / out_features / width: C_in, C_out, kernel width k.
      padding: 'causal' or 'centered'.
      retain: p of sec. 3.5; v ~ N(0, sqrt(4 p / (k C_in))) as the output feeds a GLU.
      weight_norm: False = a plain kernel.

    Attributes:
      direction: v `[k, C_in, C_out]`; gain: g `[C_out]`; bias `[C_out]`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: int,
        *,
        padding: str,
        retain: float = 1.0,
        weight_norm: bool = True,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if padding not in ("causal", "centered"):
            raise ValueError(
                f"WeightNormConv: padding must be 'causal' or 'centered', got {padding!r}"
            )
        self.in_features, self.out_features, self.width = in_features, out_features, width
        self.padding, self.dtype = padding, dtype
        std = math.sqrt(4.0 * retain / (width * in_features))
        axes = ("conv_width", "embed", "channels")
        self.direction = param(
            rngs,
            nnx.initializers.normal(std),
            (width, in_features, out_features),
            axes,
            param_dtype,
        )
        self.gain = _initial_gain(
            rngs, self.direction, (0, 1), "channels", param_dtype, weight_norm
        )
        self.bias = param(
            rngs, nnx.initializers.zeros_init(), (out_features,), ("channels",), param_dtype
        )

    def kernel(self) -> Array:
        """The effective kernel w `[k, C_in, C_out]`."""
        gain = None if self.gain is None else self.gain[...]
        return _normalized(self.direction[...], gain, (0, 1))

    def __call__(self, x: Array) -> Array:
        """Whole sequences: `[batch, t, C_in]` -> `[batch, t, C_out]`.

        The input is laid out with its rows split over the batch axes and its
        channels whole before the convolution: with jax 0.10.2 (Shardy and
        GSPMD alike) XLA's SPMD partitioner otherwise miscompiles the
        convolution's gradient when its input comes from a product with an
        fsdp- and tensor-split kernel on a mesh with data, fsdp and tensor axes
        of 2 (a ConvS2S train step's gradients were off by up to 70%;
        tests/training/test_architecture_sharding.py checks the step).
        """
        k = self.width
        pads = (k - 1, 0) if self.padding == "causal" else ((k - 1) // 2, k // 2)
        dt = self.dtype
        x = split_over_batch_only(x)
        y = jax.lax.conv_general_dilated(
            x.astype(dt),
            self.kernel().astype(dt),
            window_strides=(1,),
            padding=(pads,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + self.bias[...].astype(dt)

    def step(self, window: Array) -> Array:
        """One output position from its k inputs: `[batch, k, C_in]` -> `[batch, C_out]`.

        With `padding='causal'`, `window` holds inputs t-k+1 .. t and the result is
        output t of `__call__` (the linearised convolution of incremental decoding).
        """
        dt = self.dtype
        y = jnp.einsum("bki,kio->bo", window.astype(dt), self.kernel().astype(dt))
        return y + self.bias[...].astype(dt)


def _initial_gain(rngs, direction, norm_axes, axis_name, param_dtype, weight_norm):
    """g = ||v|| per output unit, so that the initial w equals v (sec. 3.4-3.5)."""
    if not weight_norm:
        return nnx.data(None)
    norm = jnp.sqrt(jnp.sum(jnp.square(direction[...]), axis=norm_axes))
    return param(
        rngs, lambda key, shape, dtype: norm.astype(dtype), norm.shape, (axis_name,), param_dtype
    )


# ---------------------------------------------------------------- GLU blocks


class _GLUBlock(nnx.Module):
    """Shared parts of an encoder and a decoder block: residual projection,
    dropout on the block input, convolution to 2C channels and the GLU.

    Args:
      in_channels / channels / width: C_{l-1}, C_l, kernel width k.
      dropout_rate: on the block input (also sets the conv init, sec. 3.5).
      weight_norm: weight-normalise the convolution and the residual projection.
    """

    padding = "centered"  # the convolution's padding; the decoder's is causal

    def __init__(
        self,
        in_channels: int,
        channels: int,
        width: int,
        *,
        dropout_rate: float,
        weight_norm: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(weight_norm=weight_norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_channels, self.channels, self.width, self.dtype = (
            in_channels,
            channels,
            width,
            dtype,
        )
        # A block that changes the channel count needs a linear map on its residual path.
        if in_channels != channels:
            self.residual_projection = WeightNormLinear(
                in_channels, channels, ("embed", "channels"), **kw
            )
        else:
            self.residual_projection = nnx.data(None)
        self.conv = WeightNormConv(
            in_channels, 2 * channels, width, padding=self.padding, retain=1.0 - dropout_rate, **kw
        )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

    def _residual(self, x: Array) -> Array:
        return x if self.residual_projection is None else self.residual_projection(x)


class EncoderBlock(_GLUBlock):
    """Encoder block l (sec. 3.2): z^l = (GLU(conv(dropout(z^{l-1}))) + z^{l-1}) sqrt(0.5),
    centred convolution; padding positions are zeroed before the convolution so
    that they never leak into real positions.

    Args: as `_GLUBlock`.
    """

    def __call__(self, x: Array, valid: Array, *, deterministic: bool) -> Array:
        """x `[batch, s, C_{l-1}]`, valid bool `[batch, s]` -> `[batch, s, C_l]`."""
        residual = self._residual(x)
        x = jnp.where(valid[..., None], x, 0)
        h = glu(self.conv(self.dropout(x, deterministic=deterministic)))
        return (h + residual) * SQRT_HALF


class DecoderBlock(_GLUBlock):
    """Decoder block l (sec. 3.2-3.3): h = GLU(causal conv(dropout(x))); with an
    attention, h <- sqrt(0.5)(h + W_o sqrt(m) c + b_o) (`MultiStepAttention`);
    output (h + x) sqrt(0.5).

    Incremental decoding keeps the last k - 1 block inputs in `conv_buffer`
    (`nnx.Cache`, `[batch, k-1, C_{l-1}]`, None for k = 1): a step shifts the new
    input in and convolves only the k inputs of the new position.

    Args (besides those of `_GLUBlock`):
      embed_dim: size of g_i and of the encoder outputs (the attention's E).
      attention: whether this block attends to the source.
      query_scale: multiplies d_i (1 in the paper, sqrt(0.5) in fairseq; see
        `attnx.layers.multi_step`).
      normalizer: the attention's 'softmax' (the paper), 'sparsemax' or 'entmax15'.
      sow_weights: the attention sows its weights.
    """

    padding = "causal"  # no future target position reaches the output

    def __init__(
        self,
        in_channels: int,
        channels: int,
        width: int,
        embed_dim: int,
        *,
        attention: bool,
        query_scale: float,
        normalizer: str = "softmax",
        dropout_rate: float,
        weight_norm: bool,
        sow_weights: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_channels,
            channels,
            width,
            dropout_rate=dropout_rate,
            weight_norm=weight_norm,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if attention:
            # fairseq initialises both attention projections N(0, sqrt(1 / fan_in)) (sec. 3.5).
            self.attention = MultiStepAttention(
                channels,
                embed_dim,
                query_scale=query_scale,
                residual_scale=SQRT_HALF,
                normalizer=normalizer,
                sow_weights=sow_weights,
                kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "normal"),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            self.attention = nnx.data(None)
        self.conv_buffer = nnx.data(None)

    def _attend(self, h, target_embedding, keys, values, valid):
        if self.attention is None:
            return h, None
        return self.attention(h, target_embedding, keys, values, valid, return_weights=True)

    def __call__(
        self,
        x: Array,
        target_embedding: Array,
        keys: Array,
        values: Array,
        valid: Array,
        *,
        deterministic: bool,
    ) -> tuple[Array, Array | None]:
        """Teacher forcing.

        Args:
          x: `[batch, t, C_{l-1}]` block input; target_embedding: g `[batch, t, E]`;
          keys / values: z and z + e `[batch, s, E]`; valid: bool `[batch, s]`.

        Returns:
          `[batch, t, C_l]` and the attention weights `[batch, t, s]` (None without attention).
        """
        residual = self._residual(x)
        h = glu(self.conv(self.dropout(x, deterministic=deterministic)))
        h, weights = self._attend(h, target_embedding, keys, values, valid)
        return (h + residual) * SQRT_HALF, weights

    def init_cache(self, batch_size: int) -> None:
        """Zeros stand for the k - 1 positions before the first target (the causal padding)."""
        if self.width == 1:
            self.conv_buffer = nnx.data(None)
            return
        shape = (batch_size, self.width - 1, self.in_channels)
        self.conv_buffer = nnx.Cache(jnp.zeros(shape, self.dtype))

    def step(
        self, x: Array, target_embedding: Array, keys: Array, values: Array, valid: Array
    ) -> tuple[Array, Array | None]:
        """One incremental step (no dropout): x `[batch, 1, C_{l-1}]` -> `[batch, 1, C_l]`."""
        x = x.astype(self.dtype)
        if self.conv_buffer is None:
            window = x
        else:
            window = jnp.concatenate([self.conv_buffer[...], x], axis=1)  # inputs t-k+1 .. t
            self.conv_buffer[...] = window[:, 1:]
        h = glu(self.conv.step(window))[:, None]
        h, weights = self._attend(h, target_embedding, keys, values, valid)
        return (h + self._residual(x)) * SQRT_HALF, weights
