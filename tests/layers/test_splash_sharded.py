"""Splash attention on a mesh: under `jax.shard_map`, batch and heads split over the devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.layers.attention import attention, select_implementation
from attnx.layers.masks import MaskSpec
from attnx.training import sharding

P = jax.sharding.PartitionSpec


@pytest.fixture(scope="module")
def tpu_mesh():
    """data=2 x tensor=2 over a v5e:2x2 topology that libtpu describes (no TPU needed)."""
    pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu: pip install -e '.[aot]'")
    from attnx.training import compile_mode

    return sharding.make_mesh(2, 1, 2, devices=compile_mode.topology_devices("v5e:2x2"))


def _compile_forward_backward(mesh, **kwargs):
    # [batch 4, 2,048 tokens, 8 heads, 128] bf16, sharded as the training step shards them.
    layout = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    x = jax.ShapeDtypeStruct((4, 2048, 8, 128), jnp.bfloat16, sharding=layout)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, **kwargs).astype(jnp.float32))

    # conftest asks for 'highest' matmul precision, which Mosaic refuses for bf16 operands
    # ("Bad lhs type"); a training step runs at the default.
    with (
        jax.default_matmul_precision("default"),
        sharding.activate(mesh, sharding.DEFAULT_RULES),
    ):
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()


def test_attention_picks_splash_for_a_tpu_mesh_and_it_compiles_split(tpu_mesh):
    compiled = _compile_forward_backward(tpu_mesh, is_causal=True)
    hlo = compiled.as_text()
    kernels = set(re.findall(r"splash_mha_\w+", hlo))
    assert {"splash_mha_fwd_residuals", "splash_mha_dq_no_residuals"} <= kernels, kernels
    assert any(name.startswith("splash_mha_dkv") for name in kernels), kernels
    # Every device runs the kernel on its own rows and heads: nothing is gathered.
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    # Each device holds a quarter of q, k, v (and of their gradients).
    assert compiled.memory_analysis().argument_size_in_bytes == 3 * 4 * 2048 * 8 * 128 * 2 // 4


@pytest.mark.parametrize("implementation", ["chunked", "xla"])
def test_the_other_implementations_compile_for_tpu_too(tpu_mesh, implementation):
    compiled = _compile_forward_backward(tpu_mesh, is_causal=True, implementation=implementation)
    assert "splash_mha" not in compiled.as_text()


def test_the_target_platform_is_the_meshs():
    query = jnp.zeros((2, 256, 4, 32))
    choose = dict(spec=MaskSpec(is_causal=True), bias=None, normalizer="softmax")
    choose.update(dropout_rate=0.0, return_weights=False)
    assert select_implementation(query, query, query, **choose) == "xla"  # CPU here


def test_splash_under_a_cpu_mesh_equals_reference():
    # The shard_map path on 8 simulated CPU devices (Pallas interpret mode): batch over
    # data, heads over tensor, grouped-query heads (8 query heads read 4 key/value heads).
    mesh = sharding.make_mesh(2, 1, 4, devices=jax.devices()[:8])
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 256, 8, 32))
    k, v = (jax.random.normal(key, (2, 256, 4, 32)) for key in keys[1:])
    segments = jnp.array([[1] * 100 + [2] * 156, [1] * 256])
    expected = attention(q, k, v, is_causal=True, segment_ids=segments, implementation="reference")
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        got = jax.jit(
            lambda q, k, v: attention(
                q, k, v, is_causal=True, segment_ids=segments, implementation="splash"
            )
        )(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5)
