"""Mesh construction and the logical-axis rules table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from attnx.layers import MultiHeadAttention
from attnx.training import sharding


def test_make_mesh_fills_the_free_axis_and_names_bad_keys():
    mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match=r"mesh.data x mesh.fsdp x mesh.tensor = 3 x 1 x 1"):
        sharding.make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="do not divide"):
        sharding.make_mesh(data=-1, fsdp=3)


def test_rules_map_logical_axes_and_skip_what_does_not_fit():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_mesh_spec(("embed", "heads", "kv"), (16, 4, 8), mesh, rules) == P(
        "fsdp", "tensor", None
    )
    # 5 heads do not divide over tensor=2: replicated on that axis.
    assert sharding.logical_to_mesh_spec(("embed", "heads"), (16, 5), mesh, rules) == P(
        "fsdp", None
    )
    # Two axes wanting the same mesh axis: the first wins.
    assert sharding.logical_to_mesh_spec(("channels", "channels"), (4, 4), mesh, rules) == P(
        "tensor", None
    )
    assert sharding.logical_to_mesh_spec(("batch", "length"), (8, 3), mesh, rules) == P(
        ("data", "fsdp"), None
    )
    with pytest.raises(ValueError, match="'embedd'"):
        sharding.logical_to_mesh_spec(("embedd",), (4,), mesh, rules)


def test_parse_rules_overrides_by_name_and_checks_mesh_axes():
    rules = dict(sharding.parse_rules([["embed", None], ["vocab", ["fsdp", "tensor"]]]))
    assert rules["embed"] is None and rules["vocab"] == ("fsdp", "tensor")
    assert rules["heads"] == "tensor"
    with pytest.raises(ValueError, match="'model'"):
        sharding.parse_rules({"heads": "model"})


def test_state_shardings_place_a_module_on_the_mesh():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    module = MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))
    state = nnx.state(module)
    shardings = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
    placed = jax.device_put(state, shardings)
    kernel = placed["query_kernel"].get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor", None)
    np.testing.assert_array_equal(kernel, module.query_kernel[...])
    # A jitted call over the sharded parameters equals the unsharded one.
    nnx.update(module, placed)
    x = jax.device_put(jnp.ones((4, 3, 16)), sharding.batch_sharding(mesh))
    np.testing.assert_allclose(
        jax.jit(lambda m, x: m(x))(module, x), module(jnp.ones((4, 3, 16))), atol=1e-6
    )
