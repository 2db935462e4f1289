"""Linen adapters for every public attnx NNX module (through `flax.nnx.bridge`).

Each adapter takes the NNX module's constructor arguments (without `rngs`)
and returns a Linen module whose `init` / `apply` create the NNX module and
carry its state in Linen collections: parameters in 'params' (boxed with
their logical axis names, so `nn.get_partition_spec` works), sown attention
weights in 'intermediates', decode caches in 'cache'. Other methods of the
NNX module are reachable as methods of the adapter inside `@nn.compact`
(e.g. `layer.prepare_memory(keys)`).

    class Encoder(nn.Module):
      @nn.compact
      def __call__(self, x):
        return attnx.linen.MultiHeadAttention(num_heads=4, in_features=x.shape[-1])(x)

RNG streams: Linen's 'params' and 'dropout' streams feed the NNX module's.
"""

import inspect
from collections.abc import Callable

import flax.linen as nn
from flax import nnx

from attnx import layers


def _adapter(nnx_class: type[nnx.Module]) -> Callable[..., nn.Module]:
    # Parameter-free modules (sinusoidal positions) take no rngs.
    skip_rng = "rngs" not in inspect.signature(nnx_class.__init__).parameters

    def make(*args, name: str | None = None, **kwargs) -> nn.Module:
        return nnx.bridge.to_linen(nnx_class, *args, name=name, skip_rng=skip_rng, **kwargs)

    make.__name__ = make.__qualname__ = nnx_class.__name__
    make.__doc__ = (
        f"Linen adapter of `attnx.layers.{nnx_class.__name__}`; same arguments, without `rngs`.\n\n"
        + (nnx_class.__doc__ or "")
    )
    return make


MultiHeadAttention = _adapter(layers.MultiHeadAttention)
AdditiveAttention = _adapter(layers.AdditiveAttention)
LuongAttention = _adapter(layers.LuongAttention)
LocalAttention = _adapter(layers.LocalAttention)
MultiStepAttention = _adapter(layers.MultiStepAttention)
SpatialAttention = _adapter(layers.SpatialAttention)
SinusoidalPositions = _adapter(layers.SinusoidalPositions)
LearnedPositions = _adapter(layers.LearnedPositions)
RelativePositionBias = _adapter(layers.RelativePositionBias)
