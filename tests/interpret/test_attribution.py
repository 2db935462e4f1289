"""Tests of `attnx.interpret.attribution` on the tiny preset of every architecture.

Oracles: integrated gradients' completeness (Sundararajan et al. 2017,
Prop. 1), against a baseline computed here without the library's extended
embedding table (a Transformer copy whose source embedding module returns
zeros at real tokens; a black image for the captioner); the RNN's relevance
against (grad ⊙ A)^+ of each step's attention, with the gradient taken
through a Python loop of decode steps written here; the propagation rules
of Chefer et al. (2021) against a NumPy transcription of their eq. 6-10 and a
hand-computed normalisation (eq. 8-9).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.interpret import attribution
from attnx.layers import interventions
from attnx.models import build_model, make_model_config

VOCAB = 13
ARCHITECTURES = ("transformer", "rnn", "convs2s", "captioner")
_MODELS = {}


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """Tiny models: XLA's optimisation passes cost more time than they save here."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def _model(name):
    if name not in _MODELS:
        config = make_model_config(
            {"name": name, "preset": "tiny"}, source_vocab_size=VOCAB, target_vocab_size=VOCAB
        )
        # 'rbg' keys: the same kind of random parameters, compiled in a fraction of threefry's time.
        rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
        _MODELS[name] = build_model(name, config, rngs=rngs)
    return _MODELS[name]


def _batch(name):
    """(src, targets): example 1 has a padded source and a padded target."""
    rng = np.random.default_rng(0)
    targets = rng.integers(4, VOCAB, (2, 5)).astype(np.int32)
    targets[:, -1] = 2
    targets[1, 3:] = 0
    targets[1, 2] = 2
    if name == "captioner":
        return jnp.asarray(rng.uniform(size=(2, 16, 16, 1)).astype(np.float32)), jnp.asarray(
            targets
        )
    src = rng.integers(4, VOCAB, (2, 6)).astype(np.int32)
    src[:, -1] = 2
    src[1, 4:] = 0
    src[1, 3] = 2
    return jnp.asarray(src), jnp.asarray(targets)


def _padding(src, targets):
    """[b, t, s] True where scores must be 0 (padded target, or padded token)."""
    pad = (np.asarray(targets) == 0)[:, :, None]
    if np.issubdtype(np.asarray(src).dtype, np.integer):
        pad = pad | (np.asarray(src) == 0)[:, None, :]
    return pad


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_shapes_and_padding_of_every_attribution(name):
    model = _model(name)
    src, targets = _batch(name)
    positions = 16 * 16 if name == "captioner" else src.shape[1]  # pixels
    gradient = np.asarray(attribution.gradient_x_input(model, src, targets))
    relevance = np.asarray(attribution.attention_relevance(model, src, targets))
    cells = 4 * 4 if name == "captioner" else src.shape[1]  # the attention grid
    assert gradient.shape == (2, 5, positions)
    assert relevance.shape == (2, 5, cells)
    for scores in (gradient, relevance):
        assert np.all(np.isfinite(scores))
        pad = np.broadcast_to(_padding(src, targets), scores.shape)
        assert np.all(scores[pad] == 0)
        assert np.any(scores[~pad] != 0)
    assert np.all(relevance >= 0)


def _completeness_error(model, src, targets, baseline_log_probs, pool_to_grid=False):
    scores = attribution.integrated_gradients(
        model, src, targets, steps=256, pool_to_grid=pool_to_grid
    )
    total = np.asarray(scores).sum(-1)
    change = np.asarray(attribution.target_log_probs(model, src, targets) - baseline_log_probs)
    real = np.asarray(targets) != 0
    assert np.abs(change[real]).min() > 1e-3  # the check is not vacuous
    return np.abs(total - change)[real].max()


class _ZeroAtTokens(nnx.Module):
    """An embedding that returns 0 at real tokens: the baseline input, built without the library."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, tokens):
        return jnp.where((tokens != 0)[..., None], 0.0, self.inner(tokens))


def test_integrated_gradients_are_complete_on_the_transformer():
    model = _model("transformer")
    src, targets = _batch("transformer")
    baseline = nnx.merge(*nnx.split(model))
    baseline.source_embedding = _ZeroAtTokens(baseline.source_embedding)  # target table untouched
    baseline_log_probs = attribution.target_log_probs(baseline, src, targets)
    np.testing.assert_allclose(
        np.asarray(attribution.source_scaled_log_probs(model, src, targets, scale=0.0)),
        np.asarray(baseline_log_probs),
        atol=1e-5,
    )
    assert _completeness_error(model, src, targets, baseline_log_probs) < 1e-3


def test_integrated_gradients_are_complete_on_the_captioner():
    model = _model("captioner")
    image, targets = _batch("captioner")
    black = jnp.zeros_like(image)
    baseline_log_probs = attribution.target_log_probs(model, black, targets)
    # Pooled to the 4 x 4 grid: sums over cells are sums over pixels.
    assert _completeness_error(model, image, targets, baseline_log_probs, pool_to_grid=True) < 1e-3


def test_rnn_relevance_is_the_positive_gradient_times_attention_of_each_step():
    model = _model("rnn")
    src, targets = _batch("rnn")
    tgt_in = attribution.teacher_inputs(targets)
    steps = targets.shape[1]
    graphdef, state = nnx.split(model)

    @jax.jit
    def oracle(state):
        _, weights = nnx.merge(graphdef, state)(src, tgt_in, return_weights=True)
        alignment = weights["alignment"]  # [b, t, s], teacher forced

        def log_probs(deltas):  # one decode step per Python iteration, one delta each
            stepper = nnx.merge(graphdef, state, copy=True)
            stepper.init_cache(stepper.encode(src), steps)
            logits = []
            for t in range(steps):
                edit = interventions.add_deltas([deltas[t][:, None, None, :]])
                with interventions.attention_edit(edit):
                    logits.append(stepper.decode_step(tgt_in[:, t : t + 1]))
            return attribution.token_log_probs(jnp.stack(logits, axis=1), targets)

        zeros = [jnp.zeros(alignment[:, 0].shape) for _ in range(steps)]
        rows = []
        for t in range(steps):
            grads = jax.grad(lambda d, t=t: jnp.sum(log_probs(d)[:, t]))(zeros)
            rows.append(jnp.maximum(grads[t] * alignment[:, t], 0.0))
        return jnp.stack(rows, axis=1)

    expected = np.where(_padding(src, targets), 0.0, np.asarray(oracle(state)))
    relevance = np.asarray(attribution.attention_relevance(model, src, targets))
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-7)


def test_normalisation_of_self_relevance_by_hand():
    # R - I = [[1, 1], [0, 0]]: row 0 sums to 2, row 1 holds nothing and stays I's.
    relevance = jnp.array([[2.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(
        np.asarray(attribution.normalize_self_relevance(relevance)), [[1.5, 0.5], [0.0, 1.0]]
    )


def _numpy_rules(encoder, decoder):
    """Chefer et al. (2021) eq. 6-10 for one explained token, in NumPy."""
    s = encoder[0].shape[-1]
    t = decoder[0][0].shape[0]
    r_ss = np.eye(s)
    for a in encoder:
        r_ss = r_ss + a @ r_ss

    def bar(r):
        hat = r - np.eye(len(r))
        sums = hat.sum(-1, keepdims=True)
        return np.divide(hat, sums, out=np.zeros_like(hat), where=sums != 0) + np.eye(len(r))

    r_tt, r_ts = np.eye(t), np.zeros((t, s))
    for a, is_self in decoder:
        if is_self:
            r_tt, r_ts = r_tt + a @ r_tt, r_ts + a @ r_ts
        else:
            r_ts = r_ts + bar(r_tt).T @ a @ bar(r_ss)
    return r_ts


def test_propagation_follows_the_papers_rules():
    rng = np.random.default_rng(1)
    t, s = 3, 4
    encoder = [rng.uniform(size=(s, s)) * 0.3 for _ in range(2)]
    causal = np.tril(np.ones((t, t)))
    decoder = [
        (rng.uniform(size=(t, t)) * causal * 0.3, True),
        (rng.uniform(size=(t, s)) * 0.3, False),
        (rng.uniform(size=(t, t)) * causal * 0.3, True),
        (rng.uniform(size=(t, s)) * 0.3, False),
    ]
    result = attribution.propagate_relevance(
        [jnp.asarray(a) for a in encoder], [(jnp.asarray(a), k) for a, k in decoder]
    )
    np.testing.assert_allclose(np.asarray(result), _numpy_rules(encoder, decoder), rtol=1e-5)
    # Without self-attention the rules reduce to the sum of the cross-attention maps (ConvS2S).
    cross = [(jnp.asarray(a), False) for a, k in decoder if not k]
    np.testing.assert_allclose(
        np.asarray(attribution.propagate_relevance([], cross)),
        sum(np.asarray(a) for a, _ in cross),
        rtol=1e-6,
    )
