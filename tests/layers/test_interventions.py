"""Tests of `attnx.layers.interventions`: edits at every attention site.

Oracles: with no edit, the program and its outputs are those of the layer
itself (the jaxpr is unchanged and every architecture's outputs are
bit-identical to a run under an edit that changes nothing); uniform weights
are 1 / |support| on the support of the model's own weights (softmax is
positive exactly on the keys a query may attend), checked on every map each
architecture returns; a permutation keeps every row's sorted weights; the
gradient with respect to a zero delta is the hand-derived d output / d A of
the functional core, and a finite difference on a recurrent layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.layers import interventions
from attnx.layers.attention import attention
from attnx.layers.luong_attention import LocalAttention, LuongAttention
from attnx.layers.multi_step import MultiStepAttention
from attnx.layers.recurrent_attention import AdditiveAttention
from attnx.layers.spatial import SpatialAttention
from attnx.models import build_model, make_model_config

VOCAB = 13
ARCHITECTURES = ("transformer", "rnn", "convs2s", "captioner")
# Weights-dict entries that are not attention maps.
NOT_MAPS = ("gate", "location", "sampled")


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """Tiny models: XLA's optimisation passes cost more time than they save here."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def _normal(seed, shape):
    # NumPy data: the tests compile only the code under test.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _rngs(seed=0):
    # 'rbg' keys: the same kind of random parameters, compiled in a fraction of threefry's time.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _qkv(seed=0, batch=2, q_length=3, kv_length=5, heads=2, dim=4):
    query = _normal(seed, (batch, q_length, heads, dim))
    key = _normal(seed + 1, (batch, kv_length, heads, dim))
    value = _normal(seed + 2, (batch, kv_length, heads, dim))
    # Example 1 has two padded keys.
    mask = jnp.array([[True] * kv_length, [True] * (kv_length - 2) + [False] * 2])
    return query, key, value, mask[:, None, None, :]


def _model(name):
    config = make_model_config(
        {"name": name, "preset": "tiny"}, source_vocab_size=VOCAB, target_vocab_size=VOCAB
    )
    return build_model(name, config, rngs=_rngs())


def _batch(arch):
    rng = np.random.default_rng(0)
    targets = rng.integers(4, VOCAB, (2, 4)).astype(np.int32)
    tgt_in = np.concatenate([np.ones((2, 1), np.int32), targets[:, :-1]], axis=1)
    if arch == "captioner":
        return jnp.asarray(rng.uniform(size=(2, 16, 16, 1)).astype(np.float32)), tgt_in
    src = rng.integers(4, VOCAB, (2, 5)).astype(np.int32)
    src[:, -1] = 2
    src[1, 3:] = 0  # padding
    src[1, 2] = 2
    return jnp.asarray(src), jnp.asarray(tgt_in)


def test_no_edit_is_the_identity_and_adds_nothing_to_the_program():
    weights = jnp.ones((1, 1, 2, 3))
    assert not interventions.active()
    assert interventions.apply(weights, None, "attention") is weights
    query, key, value, mask = _qkv()

    def core(query):
        return attention(query, key, value, mask=mask, return_weights=True)

    before = str(jax.make_jaxpr(core)(query))
    with interventions.attention_edit(lambda w, m, s: w):
        assert interventions.active()
        # The edit returns its argument: the traced program is the same.
        assert str(jax.make_jaxpr(core)(query)) == before
    assert not interventions.active()
    assert str(jax.make_jaxpr(core)(query)) == before


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_is_bit_identical_without_edit_and_uniform_under_it(arch):
    model = _model(arch)
    src, tgt_in = _batch(arch)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        def forward():
            return nnx.merge(graphdef, state, copy=True)(src, tgt_in, return_weights=True)

        plain = forward()
        recorder = interventions.Recorder()
        with interventions.attention_edit(recorder):
            recorded = forward()
        with interventions.attention_edit(interventions.uniform):
            uniform = forward()
        return plain, recorded, uniform, len(recorder.records)

    plain, recorded, uniform, sites = run(state)
    assert int(sites) > 0
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(recorded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    logits, weights = plain
    assert not np.allclose(np.asarray(logits), np.asarray(uniform[0]))
    maps = {k: v for k, v in weights.items() if k not in NOT_MAPS}
    assert maps
    for name, own in maps.items():
        own, edited = np.asarray(own), np.asarray(uniform[1][name])
        support = own > 0
        count = support.sum(axis=-1, keepdims=True)
        expected = np.where(support, 1.0 / np.maximum(count, 1), 0.0)
        np.testing.assert_allclose(edited, expected, atol=1e-6, err_msg=name)


def test_uniform_forces_the_materialising_path_and_averages_the_values():
    query, key, value, mask = _qkv()
    with interventions.attention_edit(interventions.uniform):
        output = attention(query, key, value, mask=mask, implementation="xla")
        chunked = attention(query, key, value, mask=mask, implementation="chunked")
    keep = np.asarray(mask[:, 0, 0, :], np.float32)  # [b, s]
    mean = np.einsum("bs,bsnh->bnh", keep, np.asarray(value)) / keep.sum(-1)[:, None, None]
    np.testing.assert_allclose(
        np.asarray(output), np.broadcast_to(mean[:, None], output.shape), atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(output), atol=1e-6)


def test_permutation_keeps_every_rows_weights_among_the_valid_keys():
    query, key, value, mask = _qkv(q_length=4, kv_length=7)

    @jax.jit
    def run(seed):
        _, weights = attention(query, key, value, mask=mask, return_weights=True)
        with interventions.attention_edit(interventions.permute(jax.random.key(seed, impl="rbg"))):
            _, permuted = attention(query, key, value, mask=mask, return_weights=True)
        return weights, permuted

    weights, permuted = (np.asarray(x) for x in run(3))
    np.testing.assert_array_equal(np.sort(weights, -1), np.sort(permuted, -1))
    np.testing.assert_array_equal(permuted[1, ..., -2:], 0.0)  # padded keys stay empty
    assert not np.array_equal(weights, permuted)
    np.testing.assert_array_equal(permuted, np.asarray(run(3)[1]))  # one key, one permutation
    assert not np.array_equal(permuted, np.asarray(run(4)[1]))


def test_uniform_at_the_recurrent_multi_step_and_spatial_layers():
    """Every layer with its own hook: Luong global and local-p, ConvS2S's, the spatial one."""
    rngs = _rngs()
    luong = LuongAttention(4, 4, rngs=rngs)
    local = LocalAttention(4, 4, window=1, mode="local-p", rngs=rngs)
    multi_step = MultiStepAttention(6, 4, rngs=rngs)
    spatial = SpatialAttention(4, 3, 5, rngs=rngs)
    keys = _normal(0, (2, 5, 4))
    valid = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
    queries = _normal(1, (2, 3, 4))

    @jax.jit
    def run():
        def maps():
            return [
                luong(queries, luong.prepare_memory(keys, mask=valid), return_weights=True)[1],
                local(queries, local.prepare_memory(keys, mask=valid), return_weights=True)[1],
                multi_step(jnp.ones((2, 3, 6)), queries, keys, keys, valid, return_weights=True)[1],
                spatial(
                    queries[:, 0, :3], spatial.prepare_features(keys, valid), return_weights=True
                )[1],
            ]

        own = maps()
        with interventions.attention_edit(interventions.uniform):
            return own, maps()

    own, edited = run()
    for name, a, b in zip(("luong", "local", "multi_step", "spatial"), own, edited, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        support = a > 0
        expected = np.where(support, 1.0 / np.maximum(support.sum(-1, keepdims=True), 1), 0.0)
        np.testing.assert_allclose(b, expected, atol=1e-6, err_msg=name)
    assert np.asarray(edited[1]).sum(-1).max() < 1.0 + 1e-6  # local-p: the window's 3 keys at most


def test_sites_are_counted_in_order_and_named_by_layer():
    query, key, value, mask = _qkv()
    recorder = interventions.Recorder()
    layer = AdditiveAttention(4, 4, 8, rngs=_rngs())
    memory = layer.prepare_memory(jnp.ones((2, 5, 4)), mask=mask[:, 0, 0, :])
    with interventions.attention_edit(recorder):
        attention(query, key, value, mask=mask)
        layer(jnp.ones((2, 4)), memory)
        attention(query, key, value)
    assert [(r.site.index, r.site.layer) for r in recorder.records] == [
        (0, "attention"),
        (1, "additive"),
        (2, "attention"),
    ]
    assert recorder.records[1].weights.shape == (2, 1, 1, 5)  # canonical [b, h, q, k]
    assert recorder.records[2].mask is None


def test_gradient_through_a_zero_delta_is_the_gradient_wrt_the_weights():
    # One layer of the functional core: out[b, i, n] = sum_j A[b, n, i, j] v[b, j, n].
    # For f = sum(c * out), df/dA[b, n, i, j] = sum_h c[b, i, n, h] v[b, j, n, h].
    query, key, value, mask = _qkv()
    cotangent = _normal(7, query.shape)
    _, weights = attention(query, key, value, mask=mask, return_weights=True)

    def f(delta):
        with interventions.attention_edit(interventions.add_deltas([delta])):
            output = attention(query, key, value, mask=mask)
        return jnp.sum(cotangent * output)

    zero = jnp.zeros(weights.shape)
    grad = jax.grad(f)(zero)
    expected = jnp.einsum("binh,bjnh->bnij", cotangent, value)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-5, atol=1e-6)
    # A zero delta changes nothing.
    np.testing.assert_allclose(
        float(f(zero)),
        float(jnp.sum(cotangent * attention(query, key, value, mask=mask))),
        rtol=1e-6,
    )


def test_delta_gradient_of_a_recurrent_layer_matches_finite_differences():
    layer = AdditiveAttention(3, 4, 6, num_heads=2, rngs=_rngs(1))
    keys = _normal(0, (2, 5, 4))
    mask = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
    query = _normal(1, (2, 3))
    direction = _normal(2, (2, 2, 1, 5))
    eps = 1e-3

    @jax.jit
    def run():
        memory = layer.prepare_memory(keys, mask=mask)

        def f(delta):
            with interventions.attention_edit(interventions.add_deltas([delta])):
                context = layer(query, memory)
            return jnp.sum(jnp.tanh(context))  # nonlinear in the weights

        grad = jax.grad(f)(jnp.zeros((2, 2, 1, 5)))
        finite = (f(eps * direction) - f(-eps * direction)) / (2 * eps)
        return jnp.sum(grad * direction), finite

    directional, finite = run()
    np.testing.assert_allclose(float(directional), float(finite), rtol=1e-3)
