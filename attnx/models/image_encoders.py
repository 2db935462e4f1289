"""Image encoders that turn pixels into a grid of annotation vectors (Xu et al. 2015, sec. 3.1.1).

"Show, Attend and Tell" reads an image through a convolutional network and
keeps a lower convolutional layer, not the fully connected ones, so that each
of the L = H x W feature vectors a_i (C channels) describes one region:

  a = {a_1, ..., a_L},  a_i in R^C.

Three encoders produce that `[batch, H, W, C]` grid:

* `ConvEncoder` with the `DIGITS_BLOCKS` layout: conv 32/64/128 (3x3, ReLU),
  each followed by a 2x2 max-pool, so a 64 x 64 x 1 canvas of the bundled
  `digit_captions` task becomes an 8 x 8 x 128 grid (the "spatial cpu-small"
  setting of the benchmarks).
* `ConvEncoder` with `VGG19_BLOCKS` and `pool_last_block=False`: the sixteen
  3x3 convolutions of VGG-19 (Simonyan & Zisserman 2014, configuration E) up to
  conv5_4, before the last max-pool. A 224 x 224 x 3 image gives the paper's
  14 x 14 x 512 grid (sec. 4.3, 5.1: L = 196, C = 512). The paper uses an
  ImageNet-trained VGG without fine-tuning; load such weights into the
  parameters, or precompute the features and use `PrecomputedFeatures`.
  Inputs are expected already normalised (e.g. mean-subtracted RGB).
* `PrecomputedFeatures`: the identity on feature maps computed elsewhere.

`ConvEncoder(coord_channels=True)` appends two channels holding each pixel's
row and column (scaled to [-1, 1]) to the image, CoordConv (Liu et al. 2018,
"An intriguing failing of convolutional neural networks and the CoordConv
solution"). A convolution is translation-equivariant, so without them an
annotation vector a_i says what is in region i but hardly where region i is
(only zero padding near the border leaks it), and f_att(a_i, h) cannot prefer
"the region right of the one read last". Natural-image captions need no
reading order; digit strings do.

Parameters carry logical axis names: a convolution kernel `[kh, kw, in, out]`
is named `(None, 'conv_width', None, 'channels')` (only the output channels
are worth sharding; one name may not appear twice in a parameter).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.layers.attention import target_platform
from attnx.layers.params import Initializer, param
from attnx.models.checks import check_at_least

Array = jax.Array

# Channels of each block; a block is a run of 3x3 convolutions (ReLU) followed by a 2x2 max-pool.
DIGITS_BLOCKS: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,))
# VGG-19 (configuration E of Simonyan & Zisserman 2014): conv1_1 .. conv5_4.
VGG19_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256, 256),
    (512, 512, 512, 512),
    (512, 512, 512, 512),
)
# VGG-16 (configuration D), for users with VGG-16 weights.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class Conv2D(nnx.Module):
    """A 'SAME'-padded, stride-1 2-D convolution with bias, NHWC layout.

    `implementation`: 'xla' (`lax.conv_general_dilated`), 'patches' (one
    matrix product over shifted copies), or None for the backend's faster one
    (`resolve_conv_implementation`). Both compute the same function.

    Attributes:
      kernel: `[kernel_size, kernel_size, in_channels, out_channels]` (HWIO).
      bias: `[out_channels]`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        kernel_init: Initializer = nnx.initializers.he_normal(),
        implementation: str | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        resolve_conv_implementation(implementation)  # an unknown name fails here
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.implementation = implementation
        self.dtype = dtype
        self.kernel = param(
            rngs,
            kernel_init,
            (kernel_size, kernel_size, in_channels, out_channels),
            (None, "conv_width", None, "channels"),
            param_dtype,
        )
        self.bias = param(
            rngs, nnx.initializers.zeros_init(), (out_channels,), ("channels",), param_dtype
        )

    def __call__(self, x: Array) -> Array:
        """`[batch, H, W, in_channels]` -> `[batch, H, W, out_channels]`."""
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if resolve_conv_implementation(self.implementation) == "patches":
            y = _conv_as_matmul(x, kernel)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, 1),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        return y + self.bias[...].astype(self.dtype)


CONV_IMPLEMENTATIONS = ("xla", "patches")


def resolve_conv_implementation(implementation: str | None) -> str:
    """None picks 'patches' on CPU and 'xla' on GPU and TPU (cuDNN / the MXU convolutions).

    The platform is the one compiled for (`attnx.layers.attention.target_platform`):
    a TPU mesh's, when a step is compiled ahead of time on a CPU machine.

    XLA's CPU convolutions are slow to differentiate: the kernel gradient of
    a 3x3 convolution from 32 to 64 channels on 64 x 32 x 32 inputs takes
    about 4x longer than the same product written as one matrix multiply
    (benchmarks/train_step.py, the spatial setting).
    """
    if implementation is None:
        return "patches" if target_platform() == "cpu" else "xla"
    if implementation not in CONV_IMPLEMENTATIONS:
        raise ValueError(
            f"conv implementation must be one of {CONV_IMPLEMENTATIONS} or None, "
            f"got {implementation!r}"
        )
    return implementation


def _conv_as_matmul(x: Array, kernel: Array) -> Array:
    """'SAME' stride-1 convolution as one matrix product over k*k shifted copies (im2col).

    `[b, h, w, c] x [k, k, c, o] -> [b, h, w, o]`; the copies cost k*k times
    the input's memory, and both gradients become matrix products too.
    """
    size = kernel.shape[0]
    before, after = (size - 1) // 2, size // 2
    _, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, dy : dy + height, dx : dx + width] for dy in range(size) for dx in range(size)],
        axis=-1,
    )  # [b, h, w, k*k*c], ordered (dy, dx, c) like the HWIO kernel's rows
    return patches @ kernel.reshape(size * size * channels, -1)


def max_pool_2x2(x: Array) -> Array:
    """2x2 max-pool with stride 2 over `[batch, H, W, C]` (odd edges dropped, as 'VALID').

    A reshape and a max rather than `lax.reduce_window`, whose gradient
    (select-and-scatter) is several times slower on CPU. Where a window holds
    tied maxima the gradient is shared among them (reduce_window's goes to
    one); both are valid subgradients, and after a ReLU ties are zeros, whose
    gradient the ReLU stops anyway.
    """
    batch, height, width, channels = x.shape
    x = x[:, : height // 2 * 2, : width // 2 * 2]
    return jnp.max(x.reshape(batch, height // 2, 2, width // 2, 2, channels), axis=(2, 4))


class ConvEncoder(nnx.Module):
    """VGG-style convolutional encoder: blocks of 3x3 conv + ReLU, a 2x2 max-pool between blocks.

    Args:
      in_channels: channels of the input image (1 grayscale, 3 RGB).
      blocks: output channels of every convolution, grouped by block, e.g.
        `DIGITS_BLOCKS` or `VGG19_BLOCKS`.
      pool_last_block: max-pool after the last block too. False for the
        paper's VGG features, which are taken before the last pool (sec. 4.3).
      conv_implementation: `Conv2D`'s implementation (None: the backend's faster).
      coord_channels: append the pixel's row and column in [-1, 1] as two more
        input channels (CoordConv), so that the features know where they are.

    Each pool halves H and W, so the grid is `image_size / 2**pools` per side.
    """

    def __init__(
        self,
        in_channels: int,
        blocks: Sequence[Sequence[int]],
        *,
        pool_last_block: bool = True,
        conv_implementation: str | None = None,
        coord_channels: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_at_least("ConvEncoder", in_channels=in_channels)
        if not blocks or any(not block for block in blocks):
            raise ValueError(
                f"ConvEncoder: blocks must be non-empty lists of channels, got {blocks}"
            )
        if any(c < 1 for block in blocks for c in block):
            raise ValueError(f"ConvEncoder: every channel count must be >= 1, got {blocks}")
        self.in_channels = in_channels
        self.blocks = tuple(tuple(block) for block in blocks)
        self.pool_last_block = pool_last_block
        self.coord_channels = coord_channels
        self.num_pools = len(self.blocks) - (0 if pool_last_block else 1)
        layers = []
        channels = in_channels + (2 if coord_channels else 0)
        for block in self.blocks:
            for out in block:
                layers.append(
                    Conv2D(
                        channels,
                        out,
                        implementation=conv_implementation,
                        dtype=dtype,
                        param_dtype=param_dtype,
                        rngs=rngs,
                    )
                )
                channels = out
        self.layers = nnx.List(layers)
        self.out_channels = channels

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the feature grid for a `height x width` image."""
        return height // 2**self.num_pools, width // 2**self.num_pools

    def __call__(self, images: Array) -> Array:
        """Images `[batch, height, width, in_channels]` -> features `[batch, H, W, C]`."""
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(
                f"ConvEncoder: images must be [batch, height, width, {self.in_channels}], "
                f"got {images.shape}"
            )
        height, width = self.grid_shape(*images.shape[1:3])
        if height < 1 or width < 1:
            raise ValueError(
                f"ConvEncoder: images {images.shape[1:3]} are too small for "
                f"{self.num_pools} 2x2 poolings"
            )
        x = with_coordinates(images) if self.coord_channels else images
        index = 0
        for block_index, block in enumerate(self.blocks):
            for _ in block:
                x = jax.nn.relu(self.layers[index](x))
                index += 1
            if block_index < len(self.blocks) - 1 or self.pool_last_block:
                x = max_pool_2x2(x)
        return x


def with_coordinates(images: Array) -> Array:
    """Images `[batch, h, w, c]` -> `[batch, h, w, c + 2]`: row, then column, each in [-1, 1]."""
    batch, height, width, _ = images.shape
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    rows = jnp.linspace(-1.0, 1.0, height, dtype=images.dtype)
    cols = jnp.linspace(-1.0, 1.0, width, dtype=images.dtype)
    grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1)
    return jnp.concatenate([images, jnp.broadcast_to(grid, (batch, height, width, 2))], axis=-1)


def vgg19_encoder(
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> ConvEncoder:
    """VGG-19 up to conv5_4 (before the last pool): 224 x 224 x 3 -> 14 x 14 x 512 (Xu et al., sec. 4.3)."""
    return ConvEncoder(
        3, VGG19_BLOCKS, pool_last_block=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class PrecomputedFeatures(nnx.Module):
    """The identity encoder: the source already is a feature map (e.g. stored VGG conv5_4 outputs).

    Args:
      feature_dim: C, the channels every feature vector must have.
    """

    def __init__(self, feature_dim: int, *, dtype: jnp.dtype = jnp.float32):
        check_at_least("PrecomputedFeatures", feature_dim=feature_dim)
        self.out_channels = feature_dim
        self.dtype = dtype

    def __call__(self, features: Array) -> Array:
        """`[batch, H, W, C]` or `[batch, L, C]` -> the same array (in the compute dtype)."""
        features = jnp.asarray(features)
        if features.ndim not in (3, 4) or features.shape[-1] != self.out_channels:
            raise ValueError(
                "PrecomputedFeatures: features must be [batch, H, W, C] or [batch, L, C] with "
                f"C={self.out_channels}, got {features.shape}"
            )
        return features.astype(self.dtype)
