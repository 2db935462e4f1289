"""Parameter creation with logical axis names.

Every attnx parameter carries the logical names of its axes (t5x / MaxText
style: 'embed', 'heads', 'kv', 'mlp', 'vocab', ...). The training code maps
those names to mesh axes with one table of rules, so layers never mention the
mesh. Eager sharding is off because the names are logical, not mesh axes.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def logical_axes(*axes: str | None) -> dict[str, Any]:
    """Variable metadata giving a parameter logical axis names (the *_metadata of nnx.Linear/Embed/LayerNorm)."""
    return {"out_sharding": tuple(axes), "eager_sharding": False}


def param(
    rngs: nnx.Rngs,
    initializer: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """Creates an `nnx.Param` whose axes carry logical names.

    Args:
      rngs: the module's random streams; the 'params' stream is used.
      initializer: a `jax.nn.initializers` function `(key, shape, dtype)`.
      shape: the parameter's shape.
      axes: one logical name (or None) per axis of `shape`.
      dtype: parameter dtype (float32 by default, also under bf16 compute).
    """
    if len(axes) != len(shape):
        raise ValueError(f"param: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
    value = initializer(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, **logical_axes(*axes))
