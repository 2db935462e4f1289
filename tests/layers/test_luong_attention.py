"""LuongAttention and LocalAttention against Luong et al. (2015), written out in NumPy.

Global attention: eq. (7) with the scores of eq. (8) and (9), context
c_t = sum_s a_t(s) h_s, and h~_t = tanh(W_c [c_t; h_t]) (eq. 5). Local
attention: the window [p_t - D, p_t + D] of sec. 3.2 with p_t = t (local-m)
or eq. (9) (local-p), and the Gaussian of eq. (10) for local-p.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.layers.luong_attention import LocalAttention, LuongAttention

BATCH, KV_LENGTH, Q_LENGTH = 3, 6, 4
QUERY_DIM, KEY_DIM = 5, 4
# Real source lengths: full, padded, and an example with no real position at all.
LENGTHS = np.array([6, 4, 0])
WINDOW = 1


def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """exp(e_s) / sum_s' exp(e_s') over the allowed s; all zeros when none is allowed."""
    if not mask.any():
        return np.zeros_like(scores)
    exp = np.where(mask, np.exp(scores - scores[mask].max()), 0.0)
    return exp / exp.sum()


def luong_score(module, h_t: np.ndarray, h_s: np.ndarray, s: int) -> float:
    """score(h_t, h_s) of eq. (8), or the location score (W_a h_t)_s of eq. (9)."""
    if module.score == "dot":
        return h_t @ h_s
    if module.score == "general":
        w_a = np.asarray(module.kernel[...])  # [query_dim, key_dim]
        return h_t @ w_a @ h_s
    if module.score == "concat":
        w_a = np.asarray(module.kernel[...]).T  # [attention_dim, query_dim + key_dim]
        return np.asarray(module.v[...]) @ np.tanh(w_a @ np.concatenate([h_t, h_s]))
    w_a = np.asarray(module.kernel[...]).T  # [max_source_length, query_dim]
    return (w_a @ h_t)[s]


def global_reference(module, query, keys, mask):
    """a_t = softmax_s(score(h_t, h_s)) over real positions, c_t = sum_s a_t(s) h_s."""
    weights = np.zeros((BATCH, query.shape[1], KV_LENGTH))
    for b in range(BATCH):
        for t in range(query.shape[1]):
            scores = np.array(
                [luong_score(module, query[b, t], keys[b, s], s) for s in range(KV_LENGTH)]
            )
            weights[b, t] = masked_softmax(scores, mask[b])
    return np.einsum("bts,bsd->btd", weights, keys), weights


def predicted_position(module, h_t: np.ndarray, length: int) -> float:
    """p_t = S sigmoid(v_p^T tanh(W_p h_t))  (eq. 9)."""
    w_p = np.asarray(module.position_kernel[...]).T  # [position_dim, query_dim]
    v_p = np.asarray(module.position_v[...])
    return length / (1.0 + np.exp(-(v_p @ np.tanh(w_p @ h_t))))


def local_reference(module, query, keys, mask, step=0):
    """Eq. (7) over the window [p_t - D, p_t + D]; times the Gaussian (eq. 10) for local-p."""
    step = np.broadcast_to(step, (BATCH,))
    weights = np.zeros((BATCH, query.shape[1], KV_LENGTH))
    positions = np.zeros((BATCH, query.shape[1]))
    sigma = module.window / 2
    for b in range(BATCH):
        for t in range(query.shape[1]):
            if module.mode == "local-m":
                p_t = step[b] + t
            else:
                p_t = predicted_position(module, query[b, t], mask[b].sum())
            positions[b, t] = p_t
            in_window = np.array(
                [
                    mask[b, s] and p_t - module.window <= s <= p_t + module.window
                    for s in range(KV_LENGTH)
                ]
            )
            scores = np.array(
                [luong_score(module, query[b, t], keys[b, s], s) for s in range(KV_LENGTH)]
            )
            align = masked_softmax(scores, in_window)
            if module.mode == "local-p":
                # The paper multiplies the normalised align weights; no renormalisation.
                align = align * np.exp(-((np.arange(KV_LENGTH) - p_t) ** 2) / (2 * sigma**2))
            weights[b, t] = align
    return np.einsum("bts,bsd->btd", weights, keys), weights, positions


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return dict(
        query=rng.normal(size=(BATCH, Q_LENGTH, QUERY_DIM)).astype(np.float32),
        keys=rng.normal(size=(BATCH, KV_LENGTH, KEY_DIM)).astype(np.float32),
        mask=np.arange(KV_LENGTH)[None, :] < LENGTHS[:, None],
    )


def make_global(score: str, **kwargs) -> LuongAttention:
    query_dim = KEY_DIM if score == "dot" else QUERY_DIM
    if score == "location":
        kwargs["max_source_length"] = KV_LENGTH + 2
    if score == "concat":
        kwargs["attention_dim"] = 3
    return LuongAttention(query_dim, KEY_DIM, score=score, rngs=nnx.Rngs(0), **kwargs)


@pytest.fixture(scope="module")
def global_modules():
    return {score: make_global(score) for score in ("dot", "general", "concat", "location")}


def query_for(module, data):
    return data["query"][..., : module.query_dim]


@pytest.mark.parametrize("score", ["dot", "general", "concat", "location"])
def test_global_matches_paper_formula(data, global_modules, score):
    module = global_modules[score]
    query = query_for(module, data)
    memory = module.prepare_memory(data["keys"], mask=data["mask"])
    ref_context, ref_weights = global_reference(module, query, data["keys"], data["mask"])
    context, weights = module(query, memory, return_weights=True)
    np.testing.assert_allclose(context, ref_context, atol=1e-5)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6)
    for t in range(Q_LENGTH):
        context, weights = module(query[:, t], memory, return_weights=True)
        assert context.shape == (BATCH, KEY_DIM) and weights.shape == (BATCH, KV_LENGTH)
        np.testing.assert_allclose(context, ref_context[:, t], atol=1e-5)
        np.testing.assert_allclose(weights, ref_weights[:, t], atol=1e-6)
    # Padding gets weight 0; the empty example gives zeros and no NaN.
    assert np.all(np.isfinite(context))
    np.testing.assert_array_equal(np.asarray(weights)[~data["mask"]], 0.0)
    np.testing.assert_array_equal(context[2], 0.0)


def test_hoisted_key_projections(data, global_modules):
    keys = data["keys"]
    general = global_modules["general"].prepare_memory(keys)
    w_a = np.asarray(global_modules["general"].kernel[...])
    np.testing.assert_allclose(general.projected_keys, keys @ w_a.T, atol=1e-6)
    concat = global_modules["concat"].prepare_memory(keys)
    key_half = np.asarray(global_modules["concat"].kernel[...])[QUERY_DIM:]
    np.testing.assert_allclose(concat.projected_keys, keys @ key_half, atol=1e-6)
    assert global_modules["dot"].prepare_memory(keys).projected_keys is None


def test_attentional_hidden_is_eq_5(data):
    module = make_global("general", output_projection=True, output_dim=6)
    memory = module.prepare_memory(data["keys"], mask=data["mask"])
    context = module(data["query"], memory)
    hidden = module.attentional_hidden(context, data["query"])
    w_c = np.asarray(module.output_kernel[...]).T  # [output_dim, key_dim + query_dim]
    expected = np.tanh(np.concatenate([context, data["query"]], -1) @ w_c.T)
    assert hidden.shape == (BATCH, Q_LENGTH, 6)
    np.testing.assert_allclose(hidden, expected, atol=1e-6)
    with pytest.raises(ValueError, match="output_projection=True"):
        make_global("general").attentional_hidden(context, data["query"])


@pytest.mark.parametrize("normalizer", ["sparsemax", "entmax15"])
def test_sparse_normalizers(data, normalizer):
    module = make_global("general", normalizer=normalizer)
    module.kernel[...] = module.kernel[...] * 4.0
    memory = module.prepare_memory(data["keys"], mask=data["mask"])
    weights = np.asarray(module(data["query"], memory, return_weights=True)[1])
    np.testing.assert_allclose(weights[:2].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(weights[2], 0.0)
    real = np.broadcast_to(data["mask"][:, None], weights.shape)
    assert np.any(weights[real] == 0.0), "no exact zero among the real positions"


LOCAL_CASES = [
    ("local-m", "general"),
    ("local-p", "general"),
    ("local-p", "dot"),
    ("local-m", "concat"),
]


@pytest.fixture(scope="module")
def local_modules():
    modules = {}
    for mode, score in LOCAL_CASES:
        query_dim = KEY_DIM if score == "dot" else QUERY_DIM
        modules[mode, score] = LocalAttention(
            query_dim, KEY_DIM, window=WINDOW, mode=mode, score=score, rngs=nnx.Rngs(3)
        )
    return modules


@pytest.mark.parametrize("case", LOCAL_CASES)
def test_local_matches_paper_formula(data, local_modules, case):
    module = local_modules[case]
    query = query_for(module, data)
    memory = module.prepare_memory(data["keys"], mask=data["mask"])
    ref_context, ref_weights, ref_positions = local_reference(
        module, query, data["keys"], data["mask"]
    )
    context, weights = module(query, memory, return_weights=True)
    np.testing.assert_allclose(context, ref_context, atol=1e-5)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6)
    np.testing.assert_allclose(module.positions(query, memory), ref_positions, atol=1e-5)
    for t in range(Q_LENGTH):
        context, weights = module(query[:, t], memory, step=t, return_weights=True)
        np.testing.assert_allclose(context, ref_context[:, t], atol=1e-5)
        np.testing.assert_allclose(weights, ref_weights[:, t], atol=1e-6)
    # Only the real positions inside the window carry weight.
    offset = np.abs(np.arange(KV_LENGTH)[None, None] - ref_positions[..., None])
    outside = (offset > WINDOW) | ~data["mask"][:, None]
    np.testing.assert_array_equal(
        np.asarray(module(query, memory, return_weights=True)[1])[outside], 0.0
    )
    np.testing.assert_array_equal(context[2], 0.0)


def test_local_p_gaussian_is_not_renormalised(data, local_modules):
    module = local_modules["local-p", "general"]
    memory = module.prepare_memory(data["keys"], mask=data["mask"])
    sums = np.asarray(module(data["query"], memory, return_weights=True)[1]).sum(-1)
    assert np.all(sums <= 1.0 + 1e-6)
    assert np.any(sums[:2] < 0.99), "the Gaussian should take mass away"
    # local-m keeps the plain window softmax: rows with a real position in the window sum to 1.
    local_m = local_modules["local-m", "general"]
    weights = np.asarray(local_m(data["query"], memory, return_weights=True)[1])
    np.testing.assert_allclose(weights[:2].sum(-1), 1.0, atol=1e-6)


def test_local_p_positions_lie_in_zero_to_source_length(data):
    module = LocalAttention(QUERY_DIM, KEY_DIM, window=2, mode="local-p", rngs=nnx.Rngs(5))
    # Large v_p saturates the sigmoid, pushing p_t to both ends of [0, S].
    module.position_v[...] = module.position_v[...] * 50.0
    memory = module.prepare_memory(data["keys"], mask=data["mask"])
    positions = np.asarray(module.positions(data["query"], memory))
    assert positions.shape == (BATCH, Q_LENGTH)
    assert np.all(positions >= 0.0) and np.all(positions <= LENGTHS[:, None])
    assert positions[:2].min() < 0.5 and np.any(positions[:2] > LENGTHS[:2, None] - 0.5)
    np.testing.assert_array_equal(positions[2], 0.0)
    assert module.positions(data["query"][:, 0], memory).shape == (BATCH,)


def test_local_m_step_offsets_and_window_past_the_end(data, local_modules):
    module = local_modules["local-m", "general"]
    memory = module.prepare_memory(data["keys"], mask=data["mask"])
    step = np.array([2, 0, 1])
    ref_context, ref_weights, _ = local_reference(
        module, data["query"], data["keys"], data["mask"], step=step
    )
    context, weights = module(data["query"], memory, step=step, return_weights=True)
    np.testing.assert_allclose(context, ref_context, atol=1e-5)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6)
    # Past the end of the source the window holds no real position: zeros, no NaN.
    context, weights = module(
        data["query"][:, 0], memory, step=KV_LENGTH + WINDOW, return_weights=True
    )
    np.testing.assert_array_equal(context, 0.0)
    np.testing.assert_array_equal(weights, 0.0)


def test_gradients_are_finite(data, local_modules, global_modules):
    for module in (local_modules["local-p", "general"], global_modules["concat"]):
        graphdef, params = nnx.split(module, nnx.Param)

        def loss(params, query, keys, graphdef=graphdef):
            module = nnx.merge(graphdef, params)
            memory = module.prepare_memory(keys, mask=data["mask"])
            return jnp.sum(module(query, memory) ** 2)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, data["query"], data["keys"])
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))
        assert all(np.any(leaf != 0) for leaf in jax.tree.leaves(grads[0]))
        np.testing.assert_array_equal(grads[2][2], 0.0)


def test_jit_and_nnx_scan_over_decoder_steps(data, local_modules):
    """local-m inside a scanned decoder loop: the step t is a traced carry."""
    module = local_modules["local-m", "general"]

    @nnx.jit
    def decode(module, query, keys, mask):
        memory = module.prepare_memory(keys, mask=mask)

        @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def step(module, t, query_t):
            return t + 1, module(query_t, memory, step=t, return_weights=True)

        _, (contexts, weights) = step(module, 0, jnp.swapaxes(query, 0, 1))
        return jnp.swapaxes(contexts, 0, 1), jnp.swapaxes(weights, 0, 1)

    contexts, weights = decode(module, data["query"], data["keys"], data["mask"])
    ref_context, ref_weights, _ = local_reference(module, data["query"], data["keys"], data["mask"])
    np.testing.assert_allclose(contexts, ref_context, atol=1e-5)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6)


def test_jit_global_with_split_merge(data, global_modules):
    module = global_modules["concat"]
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, query, keys, mask):
        module = nnx.merge(graphdef, state)
        return module(query, module.prepare_memory(keys, mask=mask), return_weights=True)

    context, weights = run(state, data["query"], data["keys"], data["mask"])
    ref_context, ref_weights = global_reference(module, data["query"], data["keys"], data["mask"])
    np.testing.assert_allclose(context, ref_context, atol=1e-5)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6)


def test_sow_weights(data):
    module = LocalAttention(
        QUERY_DIM, KEY_DIM, window=WINDOW, mode="local-p", sow_weights=True, rngs=nnx.Rngs(0)
    )
    memory = module.prepare_memory(data["keys"], mask=data["mask"])
    (_, weights), sown = nnx.capture(module, nnx.Intermediate)(
        data["query"], memory, return_weights=True
    )
    (captured,) = sown["attention_weights"].get_value()
    np.testing.assert_array_equal(captured, weights)


def test_bad_inputs_are_named(data, global_modules):
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="unknown score"):
        LuongAttention(QUERY_DIM, KEY_DIM, score="bilinear", rngs=rngs)
    with pytest.raises(ValueError, match="query_dim == key_dim"):
        LuongAttention(QUERY_DIM, KEY_DIM, score="dot", rngs=rngs)
    with pytest.raises(ValueError, match="attention_dim is used only"):
        LuongAttention(QUERY_DIM, KEY_DIM, score="general", attention_dim=3, rngs=rngs)
    with pytest.raises(ValueError, match="needs max_source_length"):
        LuongAttention(QUERY_DIM, KEY_DIM, score="location", rngs=rngs)
    with pytest.raises(ValueError, match="exceeds max_source_length"):
        LuongAttention(
            QUERY_DIM, KEY_DIM, score="location", max_source_length=2, rngs=rngs
        ).prepare_memory(data["keys"])
    with pytest.raises(ValueError, match="value_dim"):
        global_modules["general"].prepare_memory(data["keys"], data["keys"][..., :2])
    with pytest.raises(ValueError, match="prepare_memory"):
        global_modules["concat"](
            data["query"], global_modules["general"].prepare_memory(data["keys"])
        )
    with pytest.raises(ValueError, match="unknown mode"):
        LocalAttention(QUERY_DIM, KEY_DIM, window=2, mode="local-x", rngs=rngs)
    with pytest.raises(ValueError, match="window D >= 1"):
        LocalAttention(QUERY_DIM, KEY_DIM, window=0, mode="local-p", rngs=rngs)
    with pytest.raises(ValueError, match="'location' is a global"):
        LocalAttention(QUERY_DIM, KEY_DIM, window=2, score="location", rngs=rngs)
    local_m = LocalAttention(QUERY_DIM, KEY_DIM, window=2, mode="local-m", rngs=rngs)
    memory = local_m.prepare_memory(data["keys"])
    with pytest.raises(ValueError, match="needs the decoder step"):
        local_m(data["query"][:, 0], memory)
    with pytest.raises(ValueError, match="step must be"):
        local_m(data["query"], memory, step=np.zeros(BATCH + 1, int))
