"""MultiHeadAttention against a NumPy transcription of Vaswani et al. sec. 3.2.2, and its cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.layers.multi_head import MultiHeadAttention


def numpy_multi_head(module: MultiHeadAttention, x_q, x_kv, mask=None):
    """Concat(head_i) W^O with head_i = softmax(Q_i K_i^T / sqrt(d)) V_i, loops over heads."""
    wq = np.asarray(module.query_kernel[...])  # [e, n, h]
    wkv = np.asarray(module.key_value_kernel[...])  # [e, 2, k, h]
    wo = np.asarray(module.out_kernel[...])  # [n, h, o]
    bq = np.asarray(module.query_bias[...])
    bkv = np.asarray(module.key_value_bias[...])
    bo = np.asarray(module.out_bias[...])
    n, k, d = module.num_heads, module.num_kv_heads, module.head_dim
    batch, t = x_q.shape[:2]
    out = np.zeros((batch, t, wo.shape[-1]))
    for b in range(batch):
        heads = []
        for i in range(n):
            j = i // (n // k)
            q = x_q[b] @ wq[:, i] + bq[i]
            key = x_kv[b] @ wkv[:, 0, j] + bkv[0, j]
            val = x_kv[b] @ wkv[:, 1, j] + bkv[1, j]
            scores = q @ key.T / np.sqrt(d)
            if mask is not None:
                scores = np.where(mask[b], scores, -np.inf)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w = w / w.sum(-1, keepdims=True)
            heads.append(w @ val)
        concat = np.concatenate(heads, -1)  # [t, n*d]
        out[b] = concat @ wo.reshape(n * d, -1) + bo
    return out


@pytest.fixture(scope="module")
def inputs():
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (2, 7, 16))
    memory = jax.random.normal(keys[1], (2, 5, 12))
    return x, memory


def _with_random_biases(module):
    for name in ("query_bias", "key_value_bias", "out_bias"):
        var = getattr(module, name)
        var[...] = jax.random.normal(jax.random.key(len(name)), var[...].shape) * 0.1
    return module


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_self_attention_matches_paper_formula(inputs, num_kv_heads):
    x, _ = inputs
    module = _with_random_biases(
        MultiHeadAttention(4, 16, num_kv_heads=num_kv_heads, rngs=nnx.Rngs(0))
    )
    causal = np.tril(np.ones((7, 7), bool))[None].repeat(2, 0)
    got = module(x, is_causal=True)
    want = numpy_multi_head(module, np.asarray(x), np.asarray(x), causal)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cross_attention_with_padding_matches_paper_formula(inputs):
    x, memory = inputs
    module = _with_random_biases(
        MultiHeadAttention(4, 16, kv_features=12, head_dim=6, rngs=nnx.Rngs(1))
    )
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mask = jnp.asarray(valid[:, None, None, :])
    got, weights = module(x, memory, mask=mask, return_weights=True)
    want = numpy_multi_head(module, np.asarray(x), np.asarray(memory), valid[:, None, :])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert weights.shape == (2, 4, 7, 5)
    np.testing.assert_array_equal(np.asarray(weights)[0, :, :, 3:], 0.0)


def test_projected_kv_equals_raw_inputs(inputs):
    x, memory = inputs
    module = MultiHeadAttention(2, 16, kv_features=12, rngs=nnx.Rngs(2))
    np.testing.assert_allclose(
        module(x, projected_kv=module.project_key_value(memory)), module(x, memory), atol=1e-6
    )


@pytest.mark.parametrize("rotary", [None, 10000.0])
def test_cache_token_by_token_and_prefill_equal_full_causal_pass(inputs, rotary):
    x, _ = inputs
    module = MultiHeadAttention(4, 16, num_kv_heads=2, rotary_base=rotary, rngs=nnx.Rngs(3))
    full = module(x, is_causal=True)

    module.init_cache(2, 9)
    step = [module(x[:, t : t + 1], decode=True) for t in range(7)]
    np.testing.assert_allclose(jnp.concatenate(step, 1), full, atol=1e-5)

    module.init_cache(2, 9)
    prefill = module(x[:, :4], decode=True)
    rest = [module(x[:, t : t + 1], decode=True) for t in range(4, 7)]
    np.testing.assert_allclose(jnp.concatenate([prefill, *rest], 1), full, atol=1e-5)
    assert int(module.cache_index[...]) == 7


def test_cached_decoding_under_jit(inputs):
    x, _ = inputs
    module = MultiHeadAttention(4, 16, rngs=nnx.Rngs(4))
    full = module(x, is_causal=True)
    module.init_cache(2, 7)

    @nnx.jit
    def step(module, token):
        return module(token, decode=True)

    outs = [step(module, x[:, t : t + 1]) for t in range(7)]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


def test_sow_weights_captures_every_call(inputs):
    x, _ = inputs
    module = MultiHeadAttention(4, 16, sow_weights=True, rngs=nnx.Rngs(5))

    def twice(module, x):
        module(x, is_causal=True)
        return module(x, is_causal=True)

    _, intermediates = nnx.capture(twice, nnx.Intermediate)(module, x)
    captured = intermediates["attention_weights"].get_value()
    assert len(captured) == 2 and captured[0].shape == (2, 4, 7, 7)
    np.testing.assert_allclose(np.asarray(captured[0]).sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.triu(np.asarray(captured[0])[0, 0], 1), 0.0)
    # Nothing is kept when not asked.
    quiet = MultiHeadAttention(4, 16, rngs=nnx.Rngs(5))
    quiet(x)
    assert not nnx.state(quiet, nnx.Intermediate)


def test_dropout_active_in_train_and_off_in_eval(inputs):
    x, _ = inputs
    module = MultiHeadAttention(4, 16, dropout_rate=0.5, rngs=nnx.Rngs(6))
    a, b = module(x), module(x)
    assert not np.allclose(a, b)
    module.eval()
    np.testing.assert_allclose(module(x), module(x))


def test_gradients_finite_with_an_empty_row(inputs):
    x, _ = inputs
    module = MultiHeadAttention(4, 16, rngs=nnx.Rngs(7))
    mask = jnp.ones((2, 1, 7, 7), bool).at[:, :, 2].set(False)

    def loss(module):
        return jnp.sum(module(x, mask=mask) ** 2)

    grads = nnx.grad(loss)(module)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(4, 16, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(3, 16, rngs=nnx.Rngs(0))
    module = MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="inputs_q"):
        module(jnp.ones((2, 3, 8)))
    with pytest.raises(ValueError, match="init_cache"):
        module(jnp.ones((2, 1, 16)), decode=True)


def test_parameters_carry_logical_axes():
    module = MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
    assert tuple(specs["query_kernel"].get_value()) == ("embed", "heads", "kv")
    assert tuple(specs["out_kernel"].get_value()) == ("heads", "kv", "embed")
