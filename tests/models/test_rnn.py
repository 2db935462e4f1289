"""RNN encoder-decoders (Bahdanau et al. 2014, Luong et al. 2015) against their equations in NumPy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnx import decoding
from attnx.layers.attention_config import AttentionConfig as A
from attnx.models.rnn import RNNConfig, RNNEncoderDecoder, luong_4layer, rnnsearch50, tiny
from attnx.models.rnn_cells import GRUCell, LSTMCell, reversal_indices

T = 5
# Rows padded to 6 with 0; lengths 4, 2, 6.
SRC = np.array([[5, 6, 7, 2, 0, 0], [4, 2, 0, 0, 0, 0], [3, 9, 5, 8, 10, 2]], np.int32)


def _targets(rng, batch, length, vocab):
    """tgt_out: words in [3, vocab), eos, then padding; tgt_in: bos + tgt_out[:-1]."""
    out = np.zeros((batch, length), np.int32)
    for n in range(batch):
        size = rng.integers(2, length)
        out[n, :size] = rng.integers(3, vocab, size)
        out[n, size] = 2
    return np.concatenate([np.ones((batch, 1), np.int32), out[:, :-1]], axis=1), out


@pytest.fixture(scope="module")
def batch():
    tgt_in, tgt_out = _targets(np.random.default_rng(0), SRC.shape[0], T, 11)
    return SRC, tgt_in, tgt_out


# -- NumPy reference -----------------------------------------------------------


def p(variable):
    return np.asarray(variable[...], np.float64)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def numpy_cell(cell, state, x, step_input=None):
    """One LSTM (Zaremba et al. sec. 3.1) or GRU (Cho et al. eq. 5-8) step, gates unfused."""
    w, b, u = p(cell.input_kernel), p(cell.bias), p(cell.recurrent_kernel)
    extra = [] if step_input is None else [step_input]
    if isinstance(cell, LSTMCell):
        h, c = state
        pre = [x @ w[:, k] + b[k] + np.concatenate([*extra, h]) @ u[:, k] for k in range(4)]
        c = sigmoid(pre[1]) * c + sigmoid(pre[0]) * np.tanh(pre[3])
        return sigmoid(pre[2]) * np.tanh(c), c
    (h,) = state
    r = sigmoid(x @ w[:, 0] + b[0] + np.concatenate([*extra, h]) @ u[:, 0])
    z = sigmoid(x @ w[:, 1] + b[1] + np.concatenate([*extra, h]) @ u[:, 1])
    candidate = np.tanh(x @ w[:, 2] + b[2] + np.concatenate([*extra, r * h]) @ u[:, 2])
    return ((1 - z) * h + z * candidate,)


def numpy_encoder(encoder, tokens):
    """One unpadded sentence: annotations [n, 2H] and per-direction final states (1 layer)."""
    emb = p(encoder.embedding)[tokens]
    forward, backward = encoder.layers[0]
    zeros = lambda cell: tuple(np.zeros(cell.hidden_dim) for _ in range(cell.num_states))  # noqa: E731
    fwd_states, state = [], zeros(forward)
    for x in emb:
        state = numpy_cell(forward, state, x)
        fwd_states.append(state)
    bwd_states, state = [None] * len(tokens), zeros(backward)
    for j in reversed(range(len(tokens))):
        state = numpy_cell(backward, state, emb[j])
        bwd_states[j] = state
    annotations = np.array(
        [np.concatenate([f[0], b[0]]) for f, b in zip(fwd_states, bwd_states, strict=True)]
    )
    return annotations, fwd_states[-1], bwd_states[0]


def numpy_bahdanau(model, src, tgt_in):
    """RNNsearch, A.1.2 and A.2.2, one example and step at a time."""
    dec = model.decoder
    att = dec.attention
    wa, ua, v = p(att.query_kernel)[:, 0], p(att.key_kernel)[:, 0], p(att.v)[0]
    n_units = model.config.maxout_units
    logits = np.zeros((*tgt_in.shape, model.config.tgt_vocab_size))
    alignment = np.zeros((*tgt_in.shape, src.shape[1]))
    for b in range(src.shape[0]):
        tokens = src[b][src[b] != 0]
        h, _, backward_final = numpy_encoder(model.encoder, tokens)
        s = np.tanh(backward_final[0] @ p(dec.init_kernel)[:, 0] + p(dec.init_bias)[0])  # s_0
        for i, word in enumerate(tgt_in[b]):
            e = np.array([v @ np.tanh(s @ wa + h_j @ ua) for h_j in h])  # eq. 6, from s_{i-1}
            alpha = softmax(e)
            c = alpha @ h  # eq. 5
            ey = p(dec.embedding)[word]
            t_tilde = np.concatenate([s, ey, c]) @ p(dec.readout_kernel) + p(dec.readout_bias)
            t = np.array([max(t_tilde[2 * j], t_tilde[2 * j + 1]) for j in range(n_units)])
            logits[b, i] = t @ p(dec.output_kernel) + p(dec.output_bias)
            alignment[b, i, : len(tokens)] = alpha
            (s,) = numpy_cell(dec.cell, (s,), ey, c)  # s_i = f(s_{i-1}, y_{i-1}, c_i)
    return logits, alignment


def numpy_luong_general(model, src, tgt_in):
    """Luong eq. 5-8 ('general', global) with input feeding, one layer, bidirectional encoder."""
    dec = model.decoder
    w_a, w_c = p(dec.attention.kernel), p(dec.attention.output_kernel)
    logits = np.zeros((*tgt_in.shape, model.config.tgt_vocab_size))
    alignment = np.zeros((*tgt_in.shape, src.shape[1]))
    for b in range(src.shape[0]):
        tokens = src[b][src[b] != 0]
        hs, fwd, bwd = numpy_encoder(model.encoder, tokens)
        h, c = np.concatenate([fwd[0], bwd[0]]), np.concatenate([fwd[1], bwd[1]])
        feed = np.zeros_like(h)  # h~_0
        for t, word in enumerate(tgt_in[b]):
            h, c = numpy_cell(dec.cells[0], (h, c), p(dec.embedding)[word], feed)
            a = softmax(np.array([h @ w_a @ h_s for h_s in hs]))  # eq. 7, 8 (general), from h_t
            context = a @ hs
            feed = np.tanh(np.concatenate([context, h]) @ w_c)  # eq. 5
            logits[b, t] = feed @ p(dec.output_kernel) + p(dec.output_bias)  # eq. 6
            alignment[b, t, : len(tokens)] = a
    return logits, alignment


# -- cells and encoder -------------------------------------------------------------


@pytest.mark.parametrize("cell_type", [LSTMCell, GRUCell])
def test_cell_matches_numpy(cell_type):
    cell = cell_type(5, 4, step_input_dim=3, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    x, extra = rng.standard_normal((2, 5)), rng.standard_normal((2, 3))
    state = tuple(rng.standard_normal((2, 4)) for _ in range(cell.num_states))
    run = nnx.jit(lambda cell, state, x, extra: cell(state, cell.project_inputs(x), extra))
    got = run(cell, tuple(map(jnp.asarray, state)), jnp.asarray(x), jnp.asarray(extra))
    for b in range(2):
        want = numpy_cell(cell, tuple(s[b] for s in state), x[b], extra[b])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g[b], w, atol=1e-5)


def test_reversal_indices():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    want = [[2, 1, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]]
    np.testing.assert_array_equal(reversal_indices(jnp.asarray(mask)), want)


@pytest.fixture(scope="module")
def luong_model():
    """Bidirectional LSTM encoder, Luong decoder ('general', global, input feeding)."""
    return RNNEncoderDecoder(tiny(cell="lstm", variant="luong"), rngs=nnx.Rngs(2))


@pytest.fixture(scope="module")
def encoder_runner(luong_model):
    return luong_model, nnx.jit(lambda m, src: m.encoder(src))


def test_bidirectional_encoder_matches_numpy(encoder_runner):
    model, run = encoder_runner
    annotations, mask, finals = run(model, SRC)
    np.testing.assert_array_equal(mask, SRC != 0)
    for b in range(SRC.shape[0]):
        tokens = SRC[b][SRC[b] != 0]
        want, fwd, bwd = numpy_encoder(model.encoder, tokens)
        np.testing.assert_allclose(annotations[b, : len(tokens)], want, atol=1e-5)
        for got, expected in [(finals[0][0], fwd), (finals[0][1], bwd)]:
            for g, w in zip(got, expected, strict=True):
                np.testing.assert_allclose(g[b], w, atol=1e-5)


def test_backward_direction_ignores_padding(encoder_runner):
    """A padded row gives the same states as the row alone without padding."""
    model, run = encoder_runner
    padded, _, padded_finals = run(model, SRC)
    tokens = SRC[:1, :4]  # the first row without its two pads
    alone, _, finals = run(model, tokens)
    np.testing.assert_allclose(padded[:1, :4], alone, atol=1e-6)
    for direction in range(2):
        for g, w in zip(padded_finals[0][direction], finals[0][direction], strict=True):
            np.testing.assert_allclose(g[:1], w, atol=1e-6)


def test_reverse_source_reads_backwards_and_restores_order():
    cfg = tiny(cell="lstm", variant="luong", bidirectional=False)
    plain = RNNEncoderDecoder(cfg, rngs=nnx.Rngs(3))
    reversed_model = RNNEncoderDecoder(
        dataclasses.replace(cfg, reverse_source=True), rngs=nnx.Rngs(3)
    )
    flipped = np.zeros_like(SRC)
    for b, row in enumerate(SRC):
        tokens = row[row != 0]
        flipped[b, : len(tokens)] = tokens[::-1]
    run = nnx.jit(lambda a, b: (a.encoder(SRC)[0], b.encoder(flipped)[0]))
    got, want = run(reversed_model, plain)
    for b, row in enumerate(SRC):
        n = int((row != 0).sum())
        np.testing.assert_allclose(got[b, :n], want[b, :n][::-1], atol=1e-6)


# -- decoders against the papers' equations, and incremental decoding ------------------


@nnx.jit
def _teacher_forced_and_stepwise(model, src, tgt_in):
    """Teacher-forced logits and alignment, and the same from T cached decode steps."""
    logits, weights = model(src, tgt_in, return_weights=True)
    model.init_cache(model.encode(src), tgt_in.shape[1])
    steps = [model.decode_step(tgt_in[:, t : t + 1], return_weights=True) for t in range(T)]
    step_logits = jnp.stack([s[0] for s in steps], axis=1)
    step_alignment = jnp.concatenate([s[1]["alignment"] for s in steps], axis=1)
    assert weights["decoder/attention"] is weights["alignment"]
    return logits, weights["alignment"], step_logits, step_alignment


def test_bahdanau_matches_numpy_and_cached_steps(batch):
    src, tgt_in, _ = batch
    model = RNNEncoderDecoder(tiny(), rngs=nnx.Rngs(4))
    logits, alignment, step_logits, step_alignment = _teacher_forced_and_stepwise(
        model, src, tgt_in
    )
    want_logits, want_alignment = numpy_bahdanau(model, src, tgt_in)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(alignment, want_alignment, atol=1e-5)
    np.testing.assert_allclose(step_logits, logits, atol=1e-4)
    np.testing.assert_allclose(step_alignment, alignment, atol=1e-5)


def test_luong_matches_numpy_and_cached_steps(luong_model, batch):
    src, tgt_in, _ = batch
    logits, alignment, step_logits, step_alignment = _teacher_forced_and_stepwise(
        luong_model, src, tgt_in
    )
    want_logits, want_alignment = numpy_luong_general(luong_model, src, tgt_in)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(alignment, want_alignment, atol=1e-5)
    np.testing.assert_allclose(step_logits, logits, atol=1e-4)
    np.testing.assert_allclose(step_alignment, alignment, atol=1e-5)


# 'general' (global, input feeding) and Bahdanau are checked above.
STEP_CONFIGS = {
    "luong-dot": dict(variant="luong", attention=A(score="dot")),
    "luong-concat": dict(variant="luong", attention=A(score="concat"), cell="lstm"),
    "luong-location": dict(variant="luong", attention=A(score="location"), max_source_length=8),
    "local-m": dict(variant="luong", attention=A(local="local_m", window=1), cell="lstm"),
    # Without input feeding the teacher-forced pass takes the layer-by-layer path.
    "local-p": dict(
        variant="luong",
        attention=A(local="local_p", window=2),
        input_feeding=False,
        cell="lstm",
        encoder_layers=2,
        decoder_layers=2,
    ),
}


@pytest.mark.parametrize("name", list(STEP_CONFIGS))
def test_cached_steps_equal_teacher_forcing(name, batch):
    src, tgt_in, _ = batch
    model = RNNEncoderDecoder(tiny(**STEP_CONFIGS[name]), rngs=nnx.Rngs(6))
    logits, alignment, step_logits, step_alignment = _teacher_forced_and_stepwise(
        model, src, tgt_in
    )
    assert logits.shape == (3, T, 11) and alignment.shape == (3, T, 6)
    np.testing.assert_allclose(step_logits, logits, atol=1e-4)
    np.testing.assert_allclose(step_alignment, alignment, atol=1e-5)
    # Padding gets no weight; global weights sum to one (local-p's Gaussian makes them less).
    assert np.all(np.asarray(alignment)[SRC[:, None, :].repeat(T, 1) == 0] == 0)
    sums = np.asarray(alignment).sum(-1)
    if name == "local-p":
        assert np.all(sums <= 1 + 1e-5)
    elif name != "local-m":
        np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    if name == "local-m":  # D = 1: only positions t-1, t, t+1 can be attended
        distance = np.abs(np.arange(6)[None, :] - np.arange(T)[:, None])
        assert np.all(np.asarray(alignment)[:, distance > 1] == 0)


def test_greedy_search_follows_the_model(batch):
    """Greedy output re-scored by teacher forcing: each token is the argmax, alignments agree."""
    src = batch[0]
    model = RNNEncoderDecoder(
        tiny(variant="luong", attention=A(local="local_m", window=2)), rngs=nnx.Rngs(7)
    )
    result = decoding.greedy_search(model, src, max_length=4, return_weights=True)
    tgt_in = np.concatenate([np.ones((3, 1), np.int32), np.asarray(result.sequences)[:, :-1]], 1)
    logits, weights = nnx.jit(lambda m, s, t: m(s, t, return_weights=True))(model, src, tgt_in)
    logits = np.array(logits)
    logits[..., 0] = -np.inf  # decoding never generates pad
    for b in range(3):
        n = int(result.lengths[b])
        np.testing.assert_array_equal(logits[b, :n].argmax(-1), result.sequences[b, :n])
        np.testing.assert_allclose(result.alignments[b, :n], weights["alignment"][b, :n], atol=1e-5)


# -- training ---------------------------------------------------------------------------


def _overfit(config: RNNConfig, batch, steps: int = 200) -> tuple[float, float, bool]:
    """Adam on one fixed batch; returns the first and last loss and whether every gradient was finite."""
    src, tgt_in, tgt_out = batch
    model = RNNEncoderDecoder(config, rngs=nnx.Rngs(params=8, dropout=9))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    weights = (tgt_out != 0).astype(np.float32)
    graphdef, state = nnx.split((model, optimizer))

    def loss_fn(model):
        logits = model(src, tgt_in, train=True)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, tgt_out)
        return jnp.sum(losses * weights) / jnp.sum(weights)

    def train_step(state):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss, finite

    # XLA's backend optimisations would double the compile time of this tiny program.
    compiled = jax.jit(train_step).lower(state).compile({"xla_backend_optimization_level": 0})
    first, all_finite = None, True
    for _ in range(steps):
        state, loss, finite = compiled(state)
        first = float(loss) if first is None else first
        all_finite &= bool(finite)
    return first, float(loss), all_finite


def test_bahdanau_overfits_one_batch(batch):
    first, last, finite = _overfit(tiny(), batch)
    assert finite and np.isfinite(first)
    assert last < 0.1 * first, (first, last)


def test_luong_overfits_one_batch_with_dropout(batch):
    cfg = tiny(cell="lstm", variant="luong", encoder_layers=2, decoder_layers=2, dropout_rate=0.1)
    first, last, finite = _overfit(cfg, batch)
    assert finite and np.isfinite(first)
    assert last < 0.1 * first, (first, last)


# -- presets and parameter counts ------------------------------------------------------------


def _count(config: RNNConfig) -> int:
    abstract = nnx.eval_shape(lambda: RNNEncoderDecoder(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_rnnsearch50_parameter_count():
    """Bahdanau et al. A.2: K = 30000, m = 620, n = n' = 1000, l = 500; GRU with biases."""
    k, m, n, a, units = 30000, 620, 1000, 1000, 500
    gru = lambda inputs, extra: inputs * 3 * n + 3 * n + (extra + n) * 3 * n  # noqa: E731
    want = (
        k * m  # source embeddings
        + 2 * gru(m, 0)  # forward and backward encoder GRUs
        + k * m  # target embeddings
        + gru(m, 2 * n)  # decoder GRU, context c_i (2n) into the cell
        + n * n + n  # W_s (s_0 from h<-_1)
        + n * a + 2 * n * a + a  # W_a, U_a, v_a
        + (n + m + 2 * n) * 2 * units + 2 * units  # U_o, V_o, C_o -> 2l maxout inputs
        + units * k + k  # W_o
    )  # fmt: skip
    got = _count(rnnsearch50())
    print(f"\nRNNsearch-50 parameters: {got:,}")
    assert got == want == 80_442_000


def test_luong_4layer_parameter_count():
    """Luong et al. sec. 4.1: 4 x 1000 LSTM, 1000-d embeddings, 50k vocabularies, local-p general."""
    k, d, layers = 50000, 1000, 4
    lstm = lambda inputs: inputs * 4 * d + 4 * d + d * 4 * d  # noqa: E731
    want = (
        2 * k * d  # embeddings
        + layers * lstm(d)  # encoder
        + layers * lstm(d) + d * 4 * d  # decoder, h~_{t-1} fed into layer 1
        + d * d  # W_a ('general')
        + d * d + d  # W_p, v_p (local-p, eq. 9)
        + 2 * d * d  # W_c (eq. 5)
        + d * k + k  # W_s (eq. 6)
    )  # fmt: skip
    got = _count(luong_4layer())
    print(f"\nLuong et al. 4-layer parameters: {got:,}")
    assert got == want == 222_083_000


def test_presets_follow_the_papers():
    bahdanau, luong = rnnsearch50(), luong_4layer()
    assert (bahdanau.cell, bahdanau.bidirectional, bahdanau.maxout_units) == ("gru", True, 500)
    assert luong.decoder_layers == 4
    assert (luong.mechanism.local, luong.mechanism.score, luong.mechanism.window) == (
        "local_p",
        "general",
        10,
    )
    assert luong.input_feeding and luong.reverse_source and luong.dropout_rate == 0.2


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(cell="rnn"), "cell"),
        (dict(variant="luong", attention=A(score="cosine")), "attention.score"),
        (dict(variant="luong", attention=A(score="location")), "max_source_length"),
        (dict(variant="luong", attention=A(score="additive")), "choose one of"),
        (dict(variant="luong", decoder_layers=2), "decoder_layers"),
        (dict(variant="bahdanau", decoder_layers=2), "one layer"),
        (dict(variant="bahdanau", attention=A(local="local_p", window=2)), "attention.local"),
        (dict(variant="bahdanau", attention=A(score="dot")), "decoder_hidden_dim"),
        (dict(variant="luong", decoder_hidden_dim=8), "decoder_hidden_dim"),
        (dict(variant="luong", attention=A(local="local-x")), "attention.local"),
        (dict(variant="transformer"), "variant"),
        (dict(dropout_rate=1.0), "dropout_rate"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_bad_tokens_are_rejected(batch):
    model = RNNEncoderDecoder(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"RNNEncoder: src must be integers \[batch, length\]"):
        model.encode(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="call init_cache"):
        model.decode_step(np.ones((3, 1), np.int32))
    encoded = model.encode(batch[0])
    with pytest.raises(ValueError, match=r"tokens must be integers \[batch=3, length\], got int"):
        model.decode(np.ones((2, 3), np.int32), encoded)
