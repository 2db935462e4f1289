"""Attention rollout: oracles written here, independent of attnx.interpret.rollout.

The self-attention oracle is a NumPy transcription of Abnar & Zuidema's
`compute_joint_attention` (add the identity, renormalise the rows, multiply the
layers up); the encoder-decoder oracle builds the (t + s)-node stage matrices of
the documented definition with NumPy blocks and multiplies them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.interpret import rollout as ro
from attnx.models import build_model, make_model_config

VOCAB = 13


def _softmax_maps(rng, shape, mask=None, causal=False):
    """Random attention rows `[..., q, k]` (softmax of random logits); masked keys get 0."""
    logits = rng.normal(size=shape) * 2.0
    allowed = np.ones(shape, bool)
    if mask is not None:
        allowed &= mask
    if causal:
        allowed &= np.tril(np.ones(shape[-2:], bool))
    logits = np.where(allowed, logits, -1e9)  # finite: fully masked rows give no NaN
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights = np.where(allowed, weights, 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    return np.where(total > 0, weights / np.where(total > 0, total, 1), 0.0).astype(np.float32)


def _compute_joint_attention(att_mat, add_residual=True):
    """Abnar & Zuidema's reference `compute_joint_attention`, transcribed: att_mat [layers, n, n]."""
    if add_residual:
        residual_att = np.eye(att_mat.shape[1])[None, ...]
        aug_att_mat = att_mat + residual_att
        aug_att_mat = aug_att_mat / aug_att_mat.sum(axis=-1)[..., None]
    else:
        aug_att_mat = att_mat
    joint_attentions = np.zeros(aug_att_mat.shape)
    joint_attentions[0] = aug_att_mat[0]
    for i in np.arange(1, aug_att_mat.shape[0]):
        joint_attentions[i] = aug_att_mat[i].dot(joint_attentions[i - 1])
    return joint_attentions


# -- self-attention rollout -------------------------------------------------------------


@pytest.mark.parametrize("residual", [True, False])
def test_rollout_of_identity_attention_is_the_identity(residual):
    eye = np.broadcast_to(np.eye(5, dtype=np.float32), (2, 3, 5, 5))  # [batch, heads, n, n]
    joint = ro.rollout([eye] * 4, residual=residual)
    np.testing.assert_array_equal(np.asarray(joint), np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_rows_of_real_tokens_sum_to_one_and_padding_stays_zero():
    rng = np.random.default_rng(0)
    batch, heads, n = 3, 4, 6
    mask = np.ones((batch, n), bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    layers = [_softmax_maps(rng, (batch, heads, n, n), mask=pair) for _ in range(5)]
    for reduction in ("mean", "max", 2):
        joint = np.asarray(ro.rollout(layers, head_reduction=reduction, mask=mask))
        assert joint.shape == (batch, n, n)
        np.testing.assert_allclose(joint.sum(-1)[mask], 1.0, atol=1e-6)
        assert np.all(joint.sum(-1)[~mask] == 0)
        assert np.all(np.where(mask[:, None, :], 0.0, joint) == 0)  # padding columns
        assert np.all(joint >= 0)


def test_rollout_matches_the_reference_compute_joint_attention():
    rng = np.random.default_rng(1)
    batch, heads, n, depth = 2, 3, 7, 6
    layers = [_softmax_maps(rng, (batch, heads, n, n)) for _ in range(depth)]
    for residual in (True, False):
        joint = np.asarray(ro.rollout(layers, residual=residual))
        for b in range(batch):
            att_mat = np.stack([w[b].astype(np.float64).mean(axis=0) for w in layers])
            expected = _compute_joint_attention(att_mat, add_residual=residual)[-1]
            np.testing.assert_allclose(joint[b], expected, atol=1e-6, rtol=0)


def test_head_reductions_max_and_index():
    rng = np.random.default_rng(2)
    layers = [_softmax_maps(rng, (2, 3, 4, 4)) for _ in range(3)]
    # max: the reference with the max over heads (its renormalisation makes rows sum to 1).
    joint = np.asarray(ro.rollout(layers, head_reduction="max"))
    chosen = np.asarray(ro.rollout(layers, head_reduction=-1))
    for b in range(2):
        att_max = np.stack([w[b].astype(np.float64).max(axis=0) for w in layers])
        att_max /= att_max.sum(-1, keepdims=True)
        expected = _compute_joint_attention(att_max)[-1]
        np.testing.assert_allclose(joint[b], expected, atol=1e-6)
        att_last = np.stack([w[b, -1].astype(np.float64) for w in layers])
        np.testing.assert_allclose(chosen[b], _compute_joint_attention(att_last)[-1], atol=1e-6)


def test_a_rollout_computed_by_hand():
    # Both layers attend to the next token (cyclic): A' = 0.5 P + 0.5 I, so
    # A'A' = 0.25 I + 0.5 P + 0.25 P^2.
    p = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], np.float32)
    expected = [[0.25, 0.5, 0.25], [0.25, 0.25, 0.5], [0.5, 0.25, 0.25]]
    joint = ro.rollout([p, p], head_reduction=None)
    np.testing.assert_allclose(np.asarray(joint), expected, atol=1e-7)


def test_rollout_under_jit_equals_eager():
    rng = np.random.default_rng(3)
    layers = [_softmax_maps(rng, (2, 2, 5, 5)) for _ in range(3)]
    mask = np.array([[True] * 5, [True] * 3 + [False] * 2])
    eager = ro.rollout(layers, mask=mask)
    jitted = jax.jit(lambda ls, m: ro.rollout(ls, mask=m))(layers, mask)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-7)


def test_bad_head_reductions_are_refused():
    maps = np.ones((2, 3, 3), np.float32) / 3
    with pytest.raises(ValueError, match="out of range"):
        ro.rollout([maps], head_reduction=2)
    with pytest.raises(ValueError, match="head_reduction"):
        ro.rollout([maps], head_reduction="median")
    with pytest.raises(ValueError, match="no head axis"):
        ro.rollout([maps[0, 0]])


# -- encoder-decoder rollout ------------------------------------------------------------


def _stage_oracle(encoder, decoder, cross, source_mask, target_mask):
    """[R_tt | R_ts] from the definition, on single examples: head-reduced NumPy maps."""
    t, s = cross[0].shape
    valid_t, valid_s = target_mask.astype(float), source_mask.astype(float)

    def rows_normalised(m):
        total = m.sum(-1, keepdims=True)
        return np.divide(m, total, out=np.zeros_like(m), where=total > 0)

    def with_residual(a, valid):
        a = a * valid[:, None] * valid[None, :]
        return rows_normalised(0.5 * a + 0.5 * np.diag(valid))

    def block(tt, ts, st, ss):
        return np.block([[tt, ts], [st, ss]])

    stages = [
        block(np.diag(valid_t), np.zeros((t, s)), np.zeros((s, t)), with_residual(e, valid_s))
        for e in encoder
    ]
    for layer, c in enumerate(cross):
        if decoder:
            d = with_residual(decoder[layer], valid_t)
            stages.append(block(d, np.zeros((t, s)), np.zeros((s, t)), np.diag(valid_s)))
        c = rows_normalised(c * valid_t[:, None] * valid_s[None, :])
        top = rows_normalised(np.concatenate([0.5 * np.diag(valid_t), 0.5 * c], axis=1))
        bottom = np.concatenate([np.zeros((s, t)), np.diag(valid_s)], axis=1)
        stages.append(np.concatenate([top, bottom], axis=0))
    product = np.eye(t + s)
    for m in stages:
        product = m @ product
    return product[:t]


def test_encoder_decoder_rollout_matches_the_stage_definition_and_rows_sum_to_one():
    rng = np.random.default_rng(4)
    batch, heads, s, t, depth = 2, 2, 5, 4, 3
    source_mask = np.array([[True] * 5, [True] * 3 + [False] * 2])
    target_mask = np.array([[True] * 4, [True] * 2 + [False] * 2])
    enc_pair = source_mask[:, None, :, None] & source_mask[:, None, None, :]
    encoder = [_softmax_maps(rng, (batch, heads, s, s), mask=enc_pair) for _ in range(depth)]
    decoder = [_softmax_maps(rng, (batch, heads, t, t), causal=True) for _ in range(depth)]
    cross_mask = np.broadcast_to(source_mask[:, None, None, :], (batch, heads, t, s))
    cross = [_softmax_maps(rng, (batch, heads, t, s), mask=cross_mask) for _ in range(depth)]
    result = ro.encoder_decoder_rollout(
        encoder, decoder, cross, source_mask=source_mask, target_mask=target_mask
    )
    assert result.source.shape == (batch, t, s) and result.target.shape == (batch, t, t)
    rows = np.asarray(result.source).sum(-1) + np.asarray(result.target).sum(-1)
    np.testing.assert_allclose(rows[target_mask], 1.0, atol=1e-6)
    assert np.all(rows[~target_mask] == 0)
    assert np.all(
        np.asarray(result.target)[np.triu(np.ones((t, t), bool), 1)[None].repeat(2, 0)] == 0
    )
    stages = ro.encoder_decoder_stages(
        encoder, decoder, cross, source_mask=source_mask, target_mask=target_mask
    )
    product = np.eye(t + s)
    for m in stages:
        product = np.asarray(m, np.float64) @ product
    for b in range(batch):
        expected = _stage_oracle(
            [e[b].astype(np.float64).mean(0) for e in encoder],
            [d[b].astype(np.float64).mean(0) for d in decoder],
            [c[b].astype(np.float64).mean(0) for c in cross],
            source_mask[b],
            target_mask[b],
        )
        got = np.concatenate([result.target[b], result.source[b]], axis=-1)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        np.testing.assert_allclose(product[b, :t], expected, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("encoder", ["none", "identity"])
def test_identity_encoder_and_uniform_cross_attention_by_hand(layers, encoder):
    # Each cross sublayer keeps half the row and spreads half over the s tokens:
    # after k layers R_tt = 2^-k I and every R_ts entry is (1 - 2^-k) / s.
    t, s = 3, 4
    cross = [np.full((2, t, s), 1 / s, np.float32)] * layers
    encoder_self = (
        [] if encoder == "none" else [np.broadcast_to(np.eye(s, dtype=np.float32), (2, s, s))] * 2
    )
    result = ro.encoder_decoder_rollout(encoder_self, [], cross, head_reduction=None)
    np.testing.assert_allclose(np.asarray(result.source), (1 - 0.5**layers) / s, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(result.target), np.broadcast_to(0.5**layers * np.eye(t), (2, t, t)), atol=1e-7
    )


def test_a_2x2_encoder_decoder_by_hand():
    # E' = 0.5 E + 0.5 I = [[1, 0], [.25, .75]]; D' = [[1, 0], [.25, .75]];
    # C R_enc = [[.625, .375], [1, 0]]; then R_tt = 0.5 D', R_ts = 0.5 C R_enc.
    e = np.array([[1.0, 0.0], [0.5, 0.5]], np.float32)
    d = np.array([[1.0, 0.0], [0.5, 0.5]], np.float32)
    c = np.array([[0.5, 0.5], [1.0, 0.0]], np.float32)
    result = ro.encoder_decoder_rollout([e], [d], [c], head_reduction=None)
    np.testing.assert_allclose(np.asarray(result.target), [[0.5, 0], [0.125, 0.375]], atol=1e-7)
    np.testing.assert_allclose(np.asarray(result.source), [[0.3125, 0.1875], [0.5, 0]], atol=1e-7)


def test_cross_only_stacks_as_in_convs2s():
    rng = np.random.default_rng(5)
    b, t, s = 2, 4, 3
    cross = [_softmax_maps(rng, (b, t, s)) for _ in range(3)]
    result = ro.encoder_decoder_rollout([], [], cross, head_reduction=None)
    rows = np.asarray(result.source).sum(-1) + np.asarray(result.target).sum(-1)
    np.testing.assert_allclose(rows, 1.0, atol=1e-6)
    # Only the residual links target positions: R_tt = 2^-3 I.
    np.testing.assert_allclose(
        np.asarray(result.target), np.broadcast_to(np.eye(t) / 8, (b, t, t)), atol=1e-7
    )
    for i in range(b):
        expected = _stage_oracle(
            [], [], [c[i].astype(np.float64) for c in cross], np.ones(s, bool), np.ones(t, bool)
        )
        np.testing.assert_allclose(np.asarray(result.source[i]), expected[:, t:], atol=1e-6)


def test_mismatched_stacks_are_refused():
    cross = [np.full((2, 3), 0.5, np.float32)] * 2
    with pytest.raises(ValueError, match="1 decoder self-attention layers for 2"):
        ro.encoder_decoder_rollout([], [np.eye(2, dtype=np.float32)], cross, head_reduction=None)
    with pytest.raises(ValueError, match="at least one cross-attention"):
        ro.encoder_decoder_rollout([], [], [], head_reduction=None)


# -- weights dicts ----------------------------------------------------------------------


def test_weights_dict_errors_name_the_missing_key_and_the_keys_present():
    w = np.ones((1, 2, 3, 3), np.float32) / 3
    weights = {
        "encoder/layer_0/self_attention": w,
        "decoder/layer_0/self_attention": w,
        "decoder/layer_0/cross_attention": w,
        "decoder/layer_1/cross_attention": w,
    }
    with pytest.raises(ValueError) as error:
        ro.source_relevance(weights)
    message = str(error.value)
    assert "'decoder/layer_1/self_attention'" in message
    assert "decoder/layer_0/cross_attention" in message
    with pytest.raises(ValueError, match="missing key 'encoder/layer_0/self_attention'"):
        ro.source_relevance({k: v for k, v in weights.items() if k.startswith("decoder/layer_0")})
    with pytest.raises(ValueError, match=r"keys present: \['alignment'\]"):
        ro.source_relevance({"alignment": w[:, 0]})


def _batch():
    src = np.array([[5, 6, 7, 2, 0, 0], [5, 6, 7, 8, 9, 2]], np.int32)
    tgt_in = np.array([[1, 5, 6, 2, 0], [1, 5, 6, 7, 8]], np.int32)
    return jnp.asarray(src), jnp.asarray(tgt_in)


@pytest.fixture(scope="module", params=["transformer", "rnn", "convs2s", "captioner"])
def model_weights(request):
    """(name, source, weights of model(src, tgt_in, return_weights=True)) for a tiny model.

    The model is the architecture's `tiny` preset, built abstractly (`nnx.eval_shape`)
    and given random parameters: its initialisers, run eagerly op by op, would cost
    seconds per model, and any parameters give valid attention maps. The forward pass
    is the model's own, under `nnx.jit`.
    """
    name = request.param
    config = make_model_config(
        {"name": name, "preset": "tiny"}, source_vocab_size=VOCAB, target_vocab_size=VOCAB
    )
    abstract = nnx.eval_shape(lambda: build_model(name, config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.normal(size=p.shape), p.dtype), params)
    model = nnx.merge(graphdef, params, rest)
    src, tgt_in = _batch()
    if name == "captioner":
        src = jnp.asarray(rng.uniform(size=(2, 16, 16, 1)), jnp.float32)
    weights = nnx.jit(lambda m, x, y: m(x, y, return_weights=True)[1])(model, src, tgt_in)
    return name, src, weights


def test_source_relevance_of_real_tiny_models(model_weights):
    name, src, weights = model_weights
    relevance = np.asarray(ro.source_relevance(weights))
    s = weights["alignment"].shape[-1]
    assert relevance.shape == (2, 5, s)
    assert np.all(relevance >= 0)
    np.testing.assert_allclose(relevance.sum(-1), 1.0, atol=1e-5)
    if name != "captioner":
        padding = np.asarray(src) == 0
        assert np.all(relevance.transpose(0, 2, 1)[padding] == 0)  # padding columns
    if name in ("rnn", "captioner"):  # one attention, nothing else to roll out through
        np.testing.assert_allclose(relevance, np.asarray(weights["alignment"]), atol=1e-6)
    stacks = ro.attention_stacks(weights)
    parts = ro.encoder_decoder_rollout(
        stacks.encoder_self,
        stacks.decoder_self,
        stacks.cross,
        head_reduction="mean" if stacks.has_heads else None,
    )
    raw = np.asarray(ro.source_relevance(weights, normalize=False))
    np.testing.assert_allclose(raw, np.asarray(parts.source), atol=1e-7)
    np.testing.assert_allclose(raw.sum(-1) + np.asarray(parts.target).sum(-1), 1.0, atol=1e-5)
