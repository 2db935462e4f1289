"""Tests of `attnx.interpret.faithfulness`.

Oracles: a synthetic model whose output depends only on source token 0 and
that gives the target probability exactly 0 once that token is erased
(comprehensiveness = p(y_t) and sufficiency = 0 in every bin, erasing the
most attended token costs p(y_t) and a random other one nothing,
leave-one-out is 0 except at token 0); a one-layer attention model whose
weights are already uniform (uniform or permuted attention changes
nothing); Kendall's tau-b against scipy and a brute-force pair count; the
captioner's most attended region erased by hand, pixel rectangle by pixel
rectangle.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from attnx.interpret import attribution, faithfulness
from attnx.layers.attention import attention
from attnx.models import build_model, make_model_config

VOCAB = 11
UNK = attribution.UNK_ID


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """Tiny models: XLA's optimisation passes cost more time than they save here."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def _rngs(seed=0):
    # 'rbg' keys: the same kind of random parameters, compiled in a fraction of threefry's time.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


class FirstTokenModel(nnx.Module):
    """logits[b, t] = table[src[b, 0]]: the output reads source token 0 and nothing else.

    Row `<unk>` puts all the mass on token 0 (never a target): once token 0
    is erased, every target has probability exactly 0 (exp(-1e9) underflows).
    """

    def __init__(self):
        table = np.random.default_rng(0).normal(size=(VOCAB, VOCAB)).astype(np.float32)
        table[UNK] = -1e9
        table[UNK, 0] = 0.0
        self.table = nnx.Param(jnp.asarray(table))

    def __call__(self, src, tgt_in):
        row = self.table[...][src[:, 0]]  # [b, V]
        return jnp.broadcast_to(row[:, None, :], (*tgt_in.shape, VOCAB))


def _text_batch():
    rng = np.random.default_rng(1)
    src = rng.integers(4, VOCAB, (2, 10)).astype(np.int32)
    src[1, 6:] = 0  # example 1 has 6 real tokens
    targets = rng.integers(4, VOCAB, (2, 4)).astype(np.int32)
    targets[1, 3] = 0
    # Token 0 first, then a random order; padding last.
    importance = rng.uniform(size=(2, 4, 10)).astype(np.float32)
    importance[:, :, 0] = 2.0
    return jnp.asarray(src), jnp.asarray(targets), jnp.asarray(importance)


def test_a_model_that_reads_one_token_has_comprehensiveness_p_and_sufficiency_zero():
    model = FirstTokenModel()
    src, targets, importance = _text_batch()
    scores = faithfulness.erasure_scores(model, src, targets, importance)
    p = np.asarray(jax.nn.softmax(model.table[...][np.asarray(src)[:, 0]], axis=-1))
    p_y = np.take_along_axis(p, np.asarray(targets), axis=-1)  # [b, t]
    p_y = np.where(np.asarray(targets) != 0, p_y, 0.0)
    assert scores.bins == (1, 5, 10, 20, 50)
    np.testing.assert_allclose(np.asarray(scores.probability)[p_y > 0], p_y[p_y > 0], rtol=1e-6)
    for k in range(len(scores.bins)):
        # Erasing the top k% (which holds token 0) leaves p(y) = 0 exactly.
        np.testing.assert_allclose(np.asarray(scores.comprehensiveness[..., k]), p_y, rtol=1e-6)
        # Keeping only the top k% keeps token 0: nothing changes.
        np.testing.assert_array_equal(np.asarray(scores.sufficiency[..., k]), 0.0)
    np.testing.assert_allclose(np.asarray(scores.aopc_comprehensiveness), p_y, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(scores.aopc_sufficiency), 0.0)

    gap = faithfulness.erase_most_attended(
        model, src, targets, importance, key=jax.random.key(0, impl="rbg")
    )
    np.testing.assert_array_equal(np.asarray(gap.most_index)[p_y > 0], 0)
    assert np.all(np.asarray(gap.random_index) != 0)
    assert np.all(np.asarray(gap.random_index)[1] < 6)  # a real token of example 1
    np.testing.assert_allclose(np.asarray(gap.most), p_y, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(gap.random), 0.0)
    np.testing.assert_allclose(np.asarray(gap.gap), p_y, rtol=1e-6)


def test_top_fractions_round_up_and_keep_at_least_one():
    valid = jnp.array([[True] * 10, [True] * 3 + [False] * 7])
    importance = jnp.tile(jnp.arange(10.0, 0.0, -1.0), (2, 1, 1))  # [2, 1, 10], decreasing
    masks = np.asarray(faithfulness.top_fraction_masks(importance, valid, (1, 5, 10, 20, 50)))
    # ceil(k n / 100), at least 1: n = 10 -> 1, 1, 1, 2, 5; n = 3 -> 1, 1, 1, 1, 2.
    np.testing.assert_array_equal(masks[:, 0, 0].sum(-1), [1, 1, 1, 2, 5])
    np.testing.assert_array_equal(masks[:, 1, 0].sum(-1), [1, 1, 1, 1, 2])
    np.testing.assert_array_equal(masks[4, 0, 0, :5], True)  # the five largest
    ties = jnp.zeros((1, 1, 4))
    first = faithfulness.top_fraction_masks(ties, jnp.ones((1, 4), bool), (50,))
    np.testing.assert_array_equal(np.asarray(first)[0, 0, 0], [True, True, False, False])


def _pairs_tau_b(x, y):
    """Kendall's tau-b by counting pairs one by one."""
    concordant = discordant = tied_x_only = tied_y_only = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if sx == 0 and sy == 0:
            continue
        if sx == 0:
            tied_x_only += 1
        elif sy == 0:
            tied_y_only += 1
        elif sx == sy:
            concordant += 1
        else:
            discordant += 1
    n_x = concordant + discordant + tied_y_only  # pairs not tied in x
    n_y = concordant + discordant + tied_x_only
    return (concordant - discordant) / np.sqrt(n_x * n_y)


def test_kendall_tau_b_against_scipy_and_a_pair_count():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, (3, 5, 9)).astype(np.float32)  # many ties
    y = rng.integers(0, 4, (3, 5, 9)).astype(np.float32)
    mask = np.ones((3, 5, 9), bool)
    mask[1, :, 6:] = False
    tau = np.asarray(faithfulness.kendall_tau_b(x, y, mask))
    for index in np.ndindex(3, 5):
        keep = mask[index]
        xs, ys = x[index][keep], y[index][keep]
        expected = scipy.stats.kendalltau(xs, ys).statistic
        if np.isnan(expected):
            assert np.isnan(tau[index])
            continue
        np.testing.assert_allclose(tau[index], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tau[index], _pairs_tau_b(xs, ys), rtol=1e-5, atol=1e-6)
    constant = faithfulness.kendall_tau_b(np.ones(4), np.arange(4.0))
    assert np.isnan(float(constant))


def test_leave_one_out_and_rank_agreement_on_the_one_token_model():
    model = FirstTokenModel()
    src, targets, importance = _text_batch()
    loo = np.asarray(faithfulness.leave_one_out(model, src, targets))
    real_targets = np.asarray(targets) != 0
    assert np.all(loo[..., 0][real_targets] > 1e8)  # log p(y) - log(~e^-1e9)
    np.testing.assert_array_equal(loo[..., 1:], 0.0)
    np.testing.assert_array_equal(loo[~real_targets], 0.0)

    agreement = faithfulness.rank_agreement(
        model, src, targets, importance, gradient=importance, loo=jnp.asarray(loo)
    )
    tau_gradient = np.asarray(agreement.attention_vs_gradient)
    tau_loo = np.asarray(agreement.attention_vs_leave_one_out)
    np.testing.assert_allclose(tau_gradient[real_targets], 1.0)
    assert np.all(np.isnan(tau_loo[~real_targets]))
    for b, t in zip(*np.nonzero(real_targets), strict=True):
        real = np.asarray(src)[b] != 0
        expected = scipy.stats.kendalltau(np.asarray(importance)[b, t][real], loo[b, t][real])
        np.testing.assert_allclose(tau_loo[b, t], expected.statistic, rtol=1e-5)


class OneLayerAttention(nnx.Module):
    """Target embeddings attend the source embeddings; `sharp=False` zeroes the queries.

    With zero queries every score is 0 and the weights are already uniform
    over the real source tokens.
    """

    def __init__(self, sharp: bool):
        rngs = _rngs()
        self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)
        self.out = nnx.Linear(8, VOCAB, rngs=rngs)
        self.sharp = sharp

    def __call__(self, src, tgt_in):
        keys = self.embed(src)[:, :, None, :]
        query = self.embed(tgt_in)[:, :, None, :] * (4.0 if self.sharp else 0.0)
        context = attention(query, keys, keys, mask=(src != 0)[:, None, None, :])
        return self.out(context[:, :, 0])


def test_replacing_attention_that_is_already_uniform_changes_nothing():
    src, targets, _ = _text_batch()
    key = jax.random.key(0, impl="rbg")
    flat = OneLayerAttention(sharp=False)
    for edit in ("uniform", "permute"):
        effects = faithfulness.attention_intervention(
            flat, src, targets, edit=edit, key=key, samples=3
        )
        for values in (effects.probability_change, effects.total_variation):
            np.testing.assert_allclose(np.asarray(values), 0.0, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(effects.argmax_changed), 0.0)

    sharp = OneLayerAttention(sharp=True)
    for edit in ("uniform", "permute"):
        effects = faithfulness.attention_intervention(
            sharp, src, targets, edit=edit, key=key, samples=3
        )
        change = np.asarray(effects.probability_change)
        distance = np.asarray(effects.total_variation)
        assert np.any(distance > 1e-3)
        assert np.all((distance >= 0) & (distance <= 1))
        assert np.all(np.abs(change) <= distance + 1e-6)  # |p(y) - q(y)| <= TV(p, q)
        assert np.all(np.asarray(effects.argmax_changed) >= 0)
        real = np.asarray(targets) != 0
        mean = float(faithfulness.token_mean(effects.total_variation, targets))
        np.testing.assert_allclose(mean, distance[real].mean(), rtol=1e-6)


def test_an_erased_image_cell_is_its_pixel_rectangle():
    image = jnp.asarray(np.random.default_rng(3).uniform(0.1, 1.0, (1, 16, 16, 2)), jnp.float32)
    eraser = faithfulness.Eraser(grid=(4, 4))
    drop = jnp.zeros((1, 16), bool).at[0, 6].set(True)  # row 1, column 2
    erased = np.asarray(eraser(image, drop))
    expected = np.asarray(image).copy()
    expected[0, 4:8, 8:12] = 0.0
    np.testing.assert_array_equal(erased, expected)


def test_captioner_most_attended_region_erased_by_hand():
    config = make_model_config(
        {"name": "captioner", "preset": "tiny"}, source_vocab_size=None, target_vocab_size=VOCAB
    )
    model = build_model("captioner", config, rngs=_rngs())
    rng = np.random.default_rng(4)
    image = jnp.asarray(rng.uniform(size=(2, 16, 16, 1)).astype(np.float32))
    targets = jnp.asarray(rng.integers(4, VOCAB, (2, 3)).astype(np.int32))
    graphdef, state = nnx.split(model)

    @jax.jit
    def alignment_of(state):
        tgt_in = attribution.teacher_inputs(targets)
        return nnx.merge(graphdef, state)(image, tgt_in, return_weights=True)[1]["alignment"]

    alignment = alignment_of(state)  # [b, t, 16 cells of the 4 x 4 grid]
    gap = faithfulness.erase_most_attended(
        model, image, targets, alignment, key=jax.random.key(1, impl="rbg")
    )
    most = np.asarray(alignment).argmax(-1)
    np.testing.assert_array_equal(np.asarray(gap.most_index), most)
    assert np.all(np.asarray(gap.random_index) != most)
    p = np.exp(np.asarray(attribution.target_log_probs(model, image, targets)))
    for t in range(targets.shape[1]):
        erased = np.asarray(image).copy()
        for b in range(2):
            row, col = divmod(int(most[b, t]), 4)
            erased[b, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = 0.0
        q = np.exp(np.asarray(attribution.target_log_probs(model, jnp.asarray(erased), targets)))
        np.testing.assert_allclose(np.asarray(gap.most)[:, t], p[:, t] - q[:, t], atol=1e-6)
    np.testing.assert_allclose(np.asarray(gap.gap), np.asarray(gap.most - gap.random), atol=1e-7)

    # Uniform attention inside the decoder's scan: every step's weights are replaced.
    effects = faithfulness.attention_intervention(model, image, targets)
    assert np.all(np.asarray(effects.total_variation) > 0)
    assert np.all(np.abs(np.asarray(effects.probability_change)) <= effects.total_variation + 1e-6)
