"""The convolution and pooling of the image encoders against lax's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.models.image_encoders import (
    Conv2D,
    ConvEncoder,
    max_pool_2x2,
    resolve_conv_implementation,
)


@pytest.mark.parametrize(("size", "height", "width"), [(3, 9, 7), (2, 6, 5), (1, 4, 4), (5, 8, 8)])
def test_patches_convolution_equals_lax_with_gradients(size, height, width):
    layers = {
        name: Conv2D(3, 4, size, implementation=name, rngs=nnx.Rngs(0))
        for name in ("xla", "patches")
    }
    x = jax.random.normal(jax.random.key(1), (2, height, width, 3))
    cotangent = jax.random.normal(jax.random.key(2), (2, height, width, 4))

    def loss(layer, x):
        return jnp.sum(layer(x) * cotangent)

    results = {name: nnx.grad(loss, argnums=(0, 1))(layer, x) for name, layer in layers.items()}
    np.testing.assert_allclose(layers["patches"](x), layers["xla"](x), rtol=1e-5, atol=1e-5)
    (patches_params, patches_x), (xla_params, xla_x) = results["patches"], results["xla"]
    np.testing.assert_allclose(patches_x, xla_x, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(patches_params), jax.tree.leaves(xla_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_default_implementation_follows_the_backend():
    assert resolve_conv_implementation(None) == "patches"  # tests run on the CPU
    assert resolve_conv_implementation("xla") == "xla"
    with pytest.raises(ValueError, match="'winograd'"):
        Conv2D(1, 2, implementation="winograd", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 5, 2)])
def test_max_pool_equals_reduce_window(shape):
    # Continuous random values: no ties, so the gradients agree exactly too.
    x = jax.random.normal(jax.random.key(0), shape)

    def reference(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
    cotangent = jax.random.normal(jax.random.key(1), reference(x).shape)
    grad = jax.grad(lambda x, f: jnp.sum(f(x) * cotangent), argnums=0)
    np.testing.assert_allclose(grad(x, max_pool_2x2), grad(x, reference), rtol=1e-6)


def test_encoder_is_the_same_function_with_either_convolution():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
    encoders = [
        ConvEncoder(1, ((4,), (8, 8)), conv_implementation=name, rngs=nnx.Rngs(3))
        for name in ("xla", "patches")
    ]
    np.testing.assert_allclose(encoders[1](images), encoders[0](images), rtol=1e-5, atol=1e-5)


def test_coord_channels_are_the_pixel_row_and_column():
    coord = ConvEncoder(1, ((4,), (6,)), coord_channels=True, rngs=nnx.Rngs(0))
    plain = ConvEncoder(3, ((4,), (6,)), rngs=nnx.Rngs(0))  # the same kernels, 3 input channels
    images = jax.random.uniform(jax.random.key(1), (2, 8, 12, 1))
    rows, cols = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 12), indexing="ij")
    by_hand = np.concatenate(
        [np.asarray(images), np.broadcast_to(np.stack([rows, cols], -1), (2, 8, 12, 2))], -1
    )
    np.testing.assert_allclose(coord(images), plain(jnp.asarray(by_hand)), rtol=1e-5, atol=1e-6)
    # A blank canvas: without the coordinates every interior cell reads the same; with them, not.
    blank = jnp.zeros((1, 16, 16, 1))
    no_coord = ConvEncoder(1, ((4,), (6,)), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(no_coord(blank)[0, 1, 1], no_coord(blank)[0, 2, 2], atol=1e-7)
    assert not np.allclose(coord(blank)[0, 1, 1], coord(blank)[0, 2, 2])
