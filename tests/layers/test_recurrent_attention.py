"""AdditiveAttention against Bahdanau et al. (2014), eq. (5), (6), A.1.2, written out in NumPy."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.layers.attention_memory import AttentionMemory
from attnx.layers.recurrent_attention import AdditiveAttention

BATCH, KV_LENGTH, Q_LENGTH = 3, 6, 4
QUERY_DIM, KEY_DIM, VALUE_DIM, ATTENTION_DIM = 5, 4, 3, 7
# Real source lengths: full, padded, and an example with no real position at all.
LENGTHS = np.array([6, 4, 0])


def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """exp(e_j) / sum_k exp(e_k) over the allowed j; all zeros when none is allowed."""
    if not mask.any():
        return np.zeros_like(scores)
    exp = np.where(mask, np.exp(scores - scores[mask].max()), 0.0)
    return exp / exp.sum()


def sparsemax_reference(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Euclidean projection of the allowed scores onto the simplex (Martins & Astudillo 2016)."""
    if not mask.any():
        return np.zeros_like(scores)
    z = np.sort(scores[mask])[::-1]
    k = np.arange(1, len(z) + 1)
    support = 1 + k * z > np.cumsum(z)
    tau = (np.cumsum(z)[support][-1] - 1) / k[support][-1]
    return np.where(mask, np.maximum(scores - tau, 0.0), 0.0)


def bahdanau_reference(module, query, keys, values, mask, normalize=masked_softmax):
    """e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j (+ b_a)); alpha = softmax_j(e_ij); c_i = sum alpha h_j.

    query `[batch, q, query_dim]` -> context `[batch, q, heads * value_dim]`,
    weights `[batch, heads, q, kv]`.
    """
    w_a = np.asarray(module.query_kernel[...])  # [query_dim, heads, attn]
    u_a = np.asarray(module.key_kernel[...])  # [key_dim, heads, attn]
    v_a = np.asarray(module.v[...])  # [heads, attn]
    b_a = np.zeros_like(v_a) if module.bias is None else np.asarray(module.bias[...])
    batch, q_length = query.shape[:2]
    heads = v_a.shape[0]
    weights = np.zeros((batch, heads, q_length, keys.shape[1]))
    context = np.zeros((batch, q_length, heads, values.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            for i in range(q_length):
                e = np.array(
                    [
                        v_a[h]
                        @ np.tanh(w_a[:, h].T @ query[b, i] + u_a[:, h].T @ keys[b, j] + b_a[h])
                        for j in range(keys.shape[1])
                    ]
                )
                alpha = normalize(e, mask[b])
                weights[b, h, i] = alpha
                context[b, i, h] = sum(alpha[j] * values[b, j] for j in range(keys.shape[1]))
    return context.reshape(batch, q_length, -1), weights


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return dict(
        query=rng.normal(size=(BATCH, Q_LENGTH, QUERY_DIM)).astype(np.float32),
        keys=rng.normal(size=(BATCH, KV_LENGTH, KEY_DIM)).astype(np.float32),
        values=rng.normal(size=(BATCH, KV_LENGTH, VALUE_DIM)).astype(np.float32),
        mask=np.arange(KV_LENGTH)[None, :] < LENGTHS[:, None],
    )


@pytest.fixture(scope="module")
def single_head():
    return AdditiveAttention(QUERY_DIM, KEY_DIM, ATTENTION_DIM, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def two_heads():
    module = AdditiveAttention(
        QUERY_DIM, KEY_DIM, ATTENTION_DIM, num_heads=2, use_bias=True, rngs=nnx.Rngs(1)
    )
    # A non-zero bias (it starts at zero), so that its place inside the tanh is checked.
    module.bias[...] = jnp.linspace(-1.0, 1.0, 2 * ATTENTION_DIM).reshape(2, ATTENTION_DIM)
    return module


def test_paper_has_no_bias_by_default(single_head, two_heads):
    assert single_head.bias is None
    assert two_heads.bias[...].shape == (2, ATTENTION_DIM)
    assert single_head.query_kernel[...].shape == (QUERY_DIM, 1, ATTENTION_DIM)
    assert single_head.key_kernel.get_metadata()["out_sharding"] == ("rnn_hidden", "heads", "kv")


@pytest.mark.parametrize("heads", [1, 2])
def test_sequence_matches_paper_formula(data, single_head, two_heads, heads):
    module = single_head if heads == 1 else two_heads
    memory = module.prepare_memory(data["keys"], data["values"], data["mask"])
    context, weights = module(data["query"], memory, return_weights=True)
    ref_context, ref_weights = bahdanau_reference(
        module, data["query"], data["keys"], data["values"], data["mask"]
    )
    assert context.shape == (BATCH, Q_LENGTH, heads * VALUE_DIM)
    if heads == 1:
        ref_weights = ref_weights[:, 0]
    np.testing.assert_allclose(context, ref_context, atol=1e-5)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6)


def test_single_step_matches_sequence_and_formula(data, two_heads):
    memory = two_heads.prepare_memory(data["keys"], data["values"], data["mask"])
    full_context, full_weights = two_heads(data["query"], memory, return_weights=True)
    ref_context, ref_weights = bahdanau_reference(
        two_heads, data["query"], data["keys"], data["values"], data["mask"]
    )
    for i in range(Q_LENGTH):
        context, weights = two_heads(data["query"][:, i], memory, return_weights=True)
        assert context.shape == (BATCH, 2 * VALUE_DIM) and weights.shape == (BATCH, 2, KV_LENGTH)
        np.testing.assert_allclose(context, full_context[:, i], atol=1e-6)
        np.testing.assert_allclose(context, ref_context[:, i], atol=1e-5)
        np.testing.assert_allclose(weights, ref_weights[:, :, i], atol=1e-6)


def test_padding_gets_zero_weight_and_empty_source_gives_zeros(data, single_head):
    memory = single_head.prepare_memory(data["keys"], data["values"], data["mask"])
    context, weights = single_head(data["query"], memory, return_weights=True)
    assert np.all(np.isfinite(context)) and np.all(np.isfinite(weights))
    np.testing.assert_array_equal(
        np.asarray(weights)[~np.broadcast_to(data["mask"][:, None], weights.shape)], 0.0
    )
    np.testing.assert_allclose(weights[:2].sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(context[2], 0.0)
    np.testing.assert_array_equal(weights[2], 0.0)


def test_values_default_to_keys_and_mask_to_all(data, single_head):
    memory = single_head.prepare_memory(data["keys"])
    assert memory.values is memory.keys or np.array_equal(memory.values, memory.keys)
    assert memory.mask.dtype == bool and memory.mask.all()
    np.testing.assert_array_equal(memory.lengths, [KV_LENGTH] * BATCH)
    ref_context, _ = bahdanau_reference(
        single_head, data["query"], data["keys"], data["keys"], np.ones((BATCH, KV_LENGTH), bool)
    )
    np.testing.assert_allclose(single_head(data["query"], memory), ref_context, atol=1e-5)


def test_hoisted_memory_equals_recomputing_each_step(data, single_head):
    # Hoisted: U_a h_j once, reused by every step. Recomputed: a fresh memory per step.
    memory = single_head.prepare_memory(data["keys"], data["values"], data["mask"])
    np.testing.assert_allclose(
        memory.projected_keys,
        np.einsum("bkd,dha->bkha", data["keys"], np.asarray(single_head.key_kernel[...])),
        atol=1e-6,
    )
    for i in range(Q_LENGTH):
        fresh = single_head.prepare_memory(data["keys"], data["values"], data["mask"])
        np.testing.assert_allclose(
            single_head(data["query"][:, i], memory),
            single_head(data["query"][:, i], fresh),
            atol=1e-7,
        )


@pytest.mark.parametrize("normalizer", ["sparsemax", "entmax15"])
def test_sparse_normalizers(data, normalizer):
    module = AdditiveAttention(
        QUERY_DIM, KEY_DIM, ATTENTION_DIM, normalizer=normalizer, rngs=nnx.Rngs(0)
    )
    # Larger scores spread the alignments enough for the sparse maps to cut.
    module.v[...] = module.v[...] * 4.0
    memory = module.prepare_memory(data["keys"], data["values"], data["mask"])
    context, weights = module(data["query"], memory, return_weights=True)
    weights = np.asarray(weights)
    np.testing.assert_allclose(weights[:2].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(weights[2], 0.0)
    assert np.all(weights >= 0)
    real = np.broadcast_to(data["mask"][:, None], weights.shape)
    assert np.any(weights[real] == 0.0), "no exact zero among the real positions"
    if normalizer == "sparsemax":
        ref_context, ref_weights = bahdanau_reference(
            module,
            data["query"],
            data["keys"],
            data["values"],
            data["mask"],
            normalize=sparsemax_reference,
        )
        np.testing.assert_allclose(weights, ref_weights[:, 0], atol=1e-5)
        np.testing.assert_allclose(context, ref_context, atol=1e-5)


def test_gradients_are_finite(data, two_heads):
    graphdef, params = nnx.split(two_heads, nnx.Param)

    def loss(params, query, keys):
        module = nnx.merge(graphdef, params)
        memory = module.prepare_memory(keys, data["values"], data["mask"])
        return jnp.sum(module(query, memory) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, data["query"], data["keys"])
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(grads[0]))
    # The empty example's keys cannot influence anything.
    np.testing.assert_array_equal(grads[2][2], 0.0)


def test_jit_and_scan_over_decoder_steps(data, single_head):
    """A decoder loop: the memory is prepared once, then lax.scan runs the steps."""
    graphdef, state = nnx.split(single_head)

    @jax.jit
    def decode(state, query, keys, values, mask):
        module = nnx.merge(graphdef, state)
        memory = module.prepare_memory(keys, values, mask)

        def step(carry, query_t):
            context, weights = nnx.merge(graphdef, state)(query_t, memory, return_weights=True)
            return carry + 1, (context, weights)

        _, (contexts, weights) = jax.lax.scan(step, 0, jnp.swapaxes(query, 0, 1))
        return jnp.swapaxes(contexts, 0, 1), jnp.swapaxes(weights, 0, 1)

    contexts, weights = decode(state, data["query"], data["keys"], data["values"], data["mask"])
    ref_context, ref_weights = bahdanau_reference(
        single_head, data["query"], data["keys"], data["values"], data["mask"]
    )
    np.testing.assert_allclose(contexts, ref_context, atol=1e-5)
    np.testing.assert_allclose(weights, ref_weights[:, 0], atol=1e-6)


def test_memory_is_a_pytree(data, single_head):
    memory = single_head.prepare_memory(data["keys"], data["values"], data["mask"])
    leaves = jax.tree.leaves(memory)
    assert len(leaves) == 4
    mapped = jax.tree.map(lambda x: x, memory)
    assert isinstance(mapped, AttentionMemory)


def test_sow_weights(data):
    module = AdditiveAttention(
        QUERY_DIM, KEY_DIM, ATTENTION_DIM, sow_weights=True, rngs=nnx.Rngs(0)
    )
    memory = module.prepare_memory(data["keys"], data["values"], data["mask"])

    def two_calls(module):
        _, weights = module(data["query"], memory, return_weights=True)
        _, step_weights = module(data["query"][:, 0], memory, return_weights=True)
        return weights, step_weights

    # flax 0.12's way: nnx.capture collects what the module sows.
    (weights, step_weights), sown = nnx.capture(two_calls, nnx.Intermediate)(module)
    captured = sown["attention_weights"].get_value()
    assert len(captured) == 2
    np.testing.assert_array_equal(captured[0], weights)
    np.testing.assert_array_equal(captured[1], step_weights)
    # The older way (deprecated in flax 0.12): sown onto the module, popped off.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        two_calls(module)
    popped = nnx.pop(module, nnx.Intermediate)["attention_weights"].get_value()
    np.testing.assert_array_equal(popped[0], weights)
    # Nothing is kept when not asked.
    quiet = AdditiveAttention(QUERY_DIM, KEY_DIM, ATTENTION_DIM, rngs=nnx.Rngs(0))
    _, sown = nnx.capture(quiet, nnx.Intermediate)(
        data["query"], quiet.prepare_memory(data["keys"])
    )
    assert not jax.tree.leaves(sown)


def test_dropout_acts_on_context_only_in_training(data):
    module = AdditiveAttention(
        QUERY_DIM, KEY_DIM, ATTENTION_DIM, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1)
    )
    memory = module.prepare_memory(data["keys"], data["values"], data["mask"])
    train_context, train_weights = module(data["query"], memory, return_weights=True)
    module.eval()
    eval_context, eval_weights = module(data["query"], memory, return_weights=True)
    np.testing.assert_array_equal(train_weights, eval_weights)
    assert not np.allclose(train_context, eval_context)
    ref_context, _ = bahdanau_reference(
        module, data["query"], data["keys"], data["values"], data["mask"]
    )
    np.testing.assert_allclose(eval_context, ref_context, atol=1e-5)


def test_bad_inputs_are_named(data, single_head):
    with pytest.raises(ValueError, match="keys must be"):
        single_head.prepare_memory(data["keys"][..., :2])
    with pytest.raises(ValueError, match="values must be"):
        single_head.prepare_memory(data["keys"], data["values"][:, :2])
    with pytest.raises(ValueError, match="mask must be"):
        single_head.prepare_memory(data["keys"], mask=data["mask"][:, :2])
    memory = single_head.prepare_memory(data["keys"])
    with pytest.raises(ValueError, match="query must be"):
        single_head(data["query"][..., :2], memory)
    with pytest.raises(ValueError, match="prepare_memory"):
        single_head(data["query"], memory.replace(projected_keys=None))
    with pytest.raises(ValueError, match="attention_dim"):
        AdditiveAttention(QUERY_DIM, KEY_DIM, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown normalizer"):
        AdditiveAttention(QUERY_DIM, KEY_DIM, 3, normalizer="hardmax", rngs=nnx.Rngs(0))
