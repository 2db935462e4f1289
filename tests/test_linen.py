"""Each Linen adapter equals its NNX module on the same parameters and works inside Linen code."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnx.linen
from attnx import layers

B, S, T, D = 2, 5, 3, 8
rng = np.random.default_rng(0)
KEYS = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
QUERY = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
STEP_QUERY = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
SOURCE_MASK = jnp.array([[True] * S, [True, True, True, False, False]])
GRID = jnp.asarray(rng.normal(size=(B, 2, 3, D)), jnp.float32)


def with_memory(prepare: str, inputs, mask=None):
    """A call that first builds the module's memory, then attends one query."""

    def call(module, *args):
        memory = getattr(module, prepare)(inputs, mask=mask)
        return module(*args, memory, return_weights=True)

    return call


# name -> (constructor args, constructor kwargs, call(module, *args), call args)
CASES = {
    "MultiHeadAttention": (
        (2, D),
        {},
        lambda m, q, kv: m(q, kv, mask=SOURCE_MASK[:, None, None, :], return_weights=True),
        (QUERY, KEYS),
    ),
    "AdditiveAttention": (
        (D, D, 6),
        {},
        with_memory("prepare_memory", KEYS, SOURCE_MASK),
        (QUERY,),
    ),
    "LuongAttention": (
        (D, D),
        {"score": "concat", "attention_dim": 6},
        with_memory("prepare_memory", KEYS, SOURCE_MASK),
        (QUERY,),
    ),
    "LocalAttention": (
        (D, D),
        {"window": 1},
        with_memory("prepare_memory", KEYS, SOURCE_MASK),
        (QUERY,),
    ),
    "MultiStepAttention": (
        (D, D),
        {},
        lambda m, h, g: m(h, g, KEYS, KEYS + 1.0, SOURCE_MASK, return_weights=True),
        (QUERY, QUERY * 0.5),
    ),
    "SpatialAttention": ((D, D, 6), {}, with_memory("prepare_features", GRID), (STEP_QUERY,)),
    "SinusoidalPositions": ((D,), {}, lambda m, x: m(x), (QUERY,)),
    "LearnedPositions": ((10, D), {}, lambda m, x: m(x), (QUERY,)),
    "RelativePositionBias": ((2,), {"num_buckets": 8, "max_distance": 16}, lambda m: m(T, S), ()),
}


def test_every_public_module_has_an_adapter_and_a_case():
    names = {cls.__name__ for cls in layers.PUBLIC_MODULES}
    assert names == set(CASES)
    assert all(hasattr(attnx.linen, name) for name in names)


class Host(nn.Module):
    """A Linen model that owns the adapter and feeds its output to a Linen Dense."""

    name_: str

    @nn.compact
    def __call__(self, *args):
        ctor_args, ctor_kwargs, call, _ = CASES[self.name_]
        adapter = getattr(attnx.linen, self.name_)(*ctor_args, name="attn", **ctor_kwargs)

        class Proxy:
            # Routes `module.method(...)` of the shared call functions to the adapter.
            def __getattr__(self, attr):
                return getattr(adapter, attr)

            def __call__(self, *a, **k):
                return adapter(*a, **k)

        result = call(Proxy(), *args)
        output = result[0] if isinstance(result, tuple) else result
        return nn.Dense(3, name="head")(output), result


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_equals_nnx_module_inside_a_linen_model(name):
    ctor_args, ctor_kwargs, call, args = CASES[name]
    host = Host(name)
    variables = host.init(jax.random.key(0), *args)
    (head_out, linen_result) = host.apply(variables, *args)
    assert np.isfinite(np.asarray(head_out)).all()

    # The same parameters, loaded into a fresh NNX module, give the same outputs.
    cls = getattr(layers, name)
    if name == "SinusoidalPositions":
        module = cls(*ctor_args, **ctor_kwargs)
    else:
        module = cls(*ctor_args, **ctor_kwargs, rngs=nnx.Rngs(123))
        nnx.update(module, nnx.State(nn.meta.unbox(variables["params"]["attn"])))
    nnx_result = call(module, *args)
    for got, want in zip(jax.tree.leaves(linen_result), jax.tree.leaves(nnx_result), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)

    # Parameters keep their logical axis names in Linen.
    if name != "SinusoidalPositions":
        specs = nn.get_partition_spec(variables)["params"]["attn"]
        named = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert any(axis is not None for spec in named for axis in spec)
