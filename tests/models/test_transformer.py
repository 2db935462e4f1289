"""Tests of the Transformer (Vaswani et al. 2017): parameter counts of the paper's
models, a NumPy re-implementation of the paper's equations, incremental decoding,
packing, tied embeddings, weight capture and overfitting one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnx.layers.attention_config import AttentionConfig
from attnx.models.transformer import (
    Transformer,
    TransformerEncoding,
    parameter_count,
    tiny,
    transformer_base,
    transformer_big,
)

VOCAB, BATCH, SRC_LEN, TGT_LEN = 11, 3, 6, 5


def _batch(seed: int = 0):
    """src with trailing padding (different lengths per row), tgt_in with bos first, labels."""
    rng = np.random.default_rng(seed)
    src = rng.integers(3, VOCAB, (BATCH, SRC_LEN))
    for row, length in enumerate([SRC_LEN, 4, 2][:BATCH]):
        src[row, length:] = 0
    tgt = rng.integers(3, VOCAB, (BATCH, TGT_LEN))
    tgt_in = np.concatenate([np.ones((BATCH, 1), np.int64), tgt[:, :-1]], axis=1)
    return jnp.asarray(src, jnp.int32), jnp.asarray(tgt_in, jnp.int32), jnp.asarray(tgt, jnp.int32)


def _model(seed: int = 0, **overrides) -> Transformer:
    # RBG keys: XLA compiles their random bits much faster on CPU than threefry's,
    # which keeps these tests fast (the values drawn do not matter here).
    rngs = nnx.Rngs(
        params=jax.random.key(seed, impl="rbg"), dropout=jax.random.key(seed + 1, impl="rbg")
    )
    return Transformer(tiny(VOCAB, **overrides), rngs=rngs)


# --------------------------------------------------------------- parameter counts


def _count_by_hand(cfg, *, embeddings: bool = True) -> int:
    """The parameter count written out from sec. 3: per encoder layer one attention
    (4 projections d x d with biases), the FFN of eq. (2) and 2 LayerNorms; per
    decoder layer a second attention and a third LayerNorm."""
    d, d_ff, n_enc, n_dec = cfg.d_model, cfg.d_ff, cfg.num_encoder_layers, cfg.num_decoder_layers
    attention = 4 * (d * d + d)
    ffn = 2 * d * d_ff + d_ff + d
    count = n_enc * (attention + ffn + 2 * 2 * d) + n_dec * (2 * attention + ffn + 3 * 2 * d)
    count += 2 * 2 * d if cfg.pre_ln else 0  # the final LayerNorms
    if embeddings:
        src, tgt = cfg.src_vocab_size, cfg.target_vocab_size
        count += src * d + (0 if cfg.share_embeddings else tgt * d)
        count += 0 if cfg.tie_output else tgt * d + tgt
        count += 2 * cfg.max_length * d if cfg.mechanism.positions == "learned" else 0
    return count


def test_paper_parameter_counts():
    """Table 3: the paper's configuration (post-LN, biases on every projection);
    counted with nnx.eval_shape, so nothing is allocated."""
    for name, cfg, paper_total in (
        ("base", transformer_base(37000), 65e6),
        ("big", transformer_big(37000), 213e6),
    ):
        non_embedding, total = parameter_count(cfg, embeddings=False), parameter_count(cfg)
        print(f"Transformer {name}: {non_embedding:,} non-embedding, {total:,} total parameters")
        assert non_embedding == _count_by_hand(cfg, embeddings=False)
        assert non_embedding == {"base": 44_138_496, "big": 176_357_376}[name]
        # One shared, tied 37000-token table on top, within 3% of the paper's totals.
        assert total == non_embedding + 37000 * cfg.d_model
        assert abs(total / paper_total - 1) < 0.03


@pytest.mark.parametrize(
    "overrides",
    [
        dict(share_embeddings=False, tie_output=False, tgt_vocab_size=13),
        dict(share_embeddings=False, tie_output=True),
        dict(pre_ln=True, attention=AttentionConfig(positions="learned")),
    ],
    ids=["untied", "tied_output_only", "pre_ln_learned"],
)
def test_parameter_count_variants(overrides):
    cfg = tiny(VOCAB, **overrides)
    assert parameter_count(cfg) == _count_by_hand(cfg)
    assert parameter_count(cfg, embeddings=False) == _count_by_hand(cfg, embeddings=False)


def test_presets_follow_table_3():
    base, big = transformer_base(), transformer_big()
    assert (base.num_encoder_layers, base.d_model, base.d_ff, base.num_heads) == (6, 512, 2048, 8)
    assert (base.dropout_rate, base.label_smoothing) == (0.1, 0.1)
    assert (big.num_decoder_layers, big.d_model, big.d_ff, big.num_heads) == (6, 1024, 4096, 16)
    assert (big.dropout_rate, big.label_smoothing) == (0.3, 0.1)
    assert transformer_base(1000, pre_ln=True).pre_ln and not base.pre_ln


def test_every_parameter_has_logical_axes():
    cfg = tiny(
        VOCAB,
        pre_ln=True,
        tie_output=False,
        share_embeddings=False,
        attention=AttentionConfig(positions="learned"),
    )
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.get_value().ndim, path
    assert model.source_embedding.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
    ffn = model.encoder_layers[0].feed_forward
    assert ffn.inner.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert ffn.outer.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
    assert model.encoder_norm.scale.get_metadata()["out_sharding"] == ("embed",)
    assert model.output_projection.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tgt_vocab_size=7, share_embeddings=True), "share_embeddings"),
        (dict(d_model=15), "divisible"),
        (dict(attention=AttentionConfig(num_kv_heads=3)), "num_kv_heads"),
        (dict(attention=AttentionConfig(positions="rope")), "attention.positions"),
        (dict(attention=AttentionConfig(score="location")), "attention.score='location'"),
        (dict(d_model=18, num_heads=2, attention=AttentionConfig(positions="rotary")), "rotary"),
        (
            dict(attention=AttentionConfig(normalizer="entmax15", implementation="xla")),
            "attention.implementation",
        ),
        (dict(attention=AttentionConfig(local="local_m")), "attention.window"),
        (dict(dropout_rate=1.0), "dropout_rate"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(VOCAB, **overrides)


def test_input_errors():
    model = _model(attention=AttentionConfig(positions="learned"))
    src, tgt_in, _ = _batch()
    encoded = TransformerEncoding(jnp.zeros((BATCH, SRC_LEN, 16)), jnp.ones((BATCH, SRC_LEN), int))
    with pytest.raises(ValueError, match="init_cache"):
        model.decode_step(tgt_in[:, :1])
    with pytest.raises(
        ValueError, match=r"Transformer.encode: tokens must be integers \[batch, length\]"
    ):
        model.encode(src.astype(jnp.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        model.encode(src, segment_ids=src[:, :2])
    with pytest.raises(ValueError, match=r"tokens must be integers \[batch=3, length\], got int"):
        model.decode(tgt_in[:2], encoded)
    with pytest.raises(ValueError, match="max_length"):
        model.init_cache(encoded, 17)


# ------------------------------------------------- the paper's equations in NumPy


def _np_attention(xq, xkv, attn, mask):
    """Eq. (1) per head and sec. 3.2.2 in NumPy; mask `[b, tq, tk]`, empty rows -> 0."""
    g = lambda v: np.asarray(v[...], np.float64)
    q = np.einsum("bte,enh->btnh", xq, g(attn.query_kernel)) + g(attn.query_bias)
    kv = np.einsum("bse,ezkh->zbskh", xkv, g(attn.key_value_kernel))
    kv = kv + g(attn.key_value_bias)[:, None, None]
    k, v = kv[0], kv[1]
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    e = np.where(mask[:, None], np.exp(scores - np.where(np.isfinite(top), top, 0)), 0)
    w = e / np.maximum(e.sum(-1, keepdims=True), 1e-30)
    context = np.einsum("bnts,bsnh->btnh", w, v)
    return np.einsum("btnh,nho->bto", context, g(attn.out_kernel)) + g(attn.out_bias), w


def _np_norm(x, ln, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(ln.scale[...]) + np.asarray(ln.bias[...])


def _np_ffn(x, ffn):
    """Eq. (2): max(0, x W1 + b1) W2 + b2."""
    g = lambda v: np.asarray(v[...], np.float64)
    h = np.maximum(0, x @ g(ffn.inner.kernel) + g(ffn.inner.bias))
    return h @ g(ffn.outer.kernel) + g(ffn.outer.bias)


def _np_pe(length, d):
    """Sec. 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pe = np.zeros((length, d))
    for pos in range(length):
        for i in range(0, d, 2):
            pe[pos, i] = np.sin(pos / 10000 ** (i / d))
            pe[pos, i + 1] = np.cos(pos / 10000 ** (i / d))
    return pe


def _np_transformer(model: Transformer, src, tgt_in):
    cfg = model.config
    src, tgt_in = np.asarray(src), np.asarray(tgt_in)
    d = cfg.d_model

    def sub(x, norm, fn):
        if cfg.pre_ln:
            return x + fn(_np_norm(x, norm))[0]
        return _np_norm(x + fn(x)[0], norm)

    def pe(module, length):
        if cfg.mechanism.positions == "learned":
            return np.asarray(module.embedding[...])[:length]
        return _np_pe(length, d)

    src_valid = src != 0
    x = np.asarray(model.source_embedding.embedding[...])[src] * np.sqrt(d)
    x = x + pe(model.encoder_positions, src.shape[1])
    enc_mask = src_valid[:, :, None] & src_valid[:, None, :]
    for layer in model.encoder_layers:
        x = sub(
            x,
            layer.self_attention_norm,
            lambda h, a=layer.self_attention: _np_attention(h, h, a, enc_mask),
        )
        x = sub(x, layer.feed_forward_norm, lambda h, f=layer.feed_forward: (_np_ffn(h, f),))
    if cfg.pre_ln:
        x = _np_norm(x, model.encoder_norm)
    t = tgt_in.shape[1]
    y = np.asarray(model.target_embedding.embedding[...])[tgt_in] * np.sqrt(d)
    y = y + pe(model.decoder_positions, t)
    cross_weights = []

    def cross_attend(h, attn):
        out, w = _np_attention(h, x, attn, cross_mask)
        cross_weights.append(w)
        return (out,)

    causal = np.broadcast_to(np.tril(np.ones((t, t), bool)), (src.shape[0], t, t))
    cross_mask = np.broadcast_to(src_valid[:, None, :], (src.shape[0], t, src.shape[1]))
    for layer in model.decoder_layers:
        y = sub(
            y,
            layer.self_attention_norm,
            lambda h, a=layer.self_attention: _np_attention(h, h, a, causal),
        )
        y = sub(
            y,
            layer.cross_attention_norm,
            lambda h, a=layer.cross_attention: cross_attend(h, a),
        )
        y = sub(y, layer.feed_forward_norm, lambda h, f=layer.feed_forward: (_np_ffn(h, f),))
    if cfg.pre_ln:
        y = _np_norm(y, model.decoder_norm)
    alignment = cross_weights[-1].mean(axis=1)
    if cfg.tie_output:
        return y @ np.asarray(model.target_embedding.embedding[...]).T, alignment
    proj = model.output_projection
    return y @ np.asarray(proj.kernel[...]) + np.asarray(proj.bias[...]), alignment


# Three configurations share one compiled teacher-forced pass each: checked against
# the NumPy reference, then decoded step by step through the cache.
DECODING_CONFIGS = {
    "mha_sinusoidal_tied": dict(),
    "gqa_learned_pre_ln": dict(
        num_heads=4, attention=AttentionConfig(num_kv_heads=2, positions="learned"), pre_ln=True
    ),
    "mqa_untied": dict(
        num_heads=4,
        attention=AttentionConfig(num_kv_heads=1),
        share_embeddings=False,
        tie_output=False,
        tgt_vocab_size=13,
    ),
}


@pytest.fixture(scope="module", params=list(DECODING_CONFIGS), ids=list(DECODING_CONFIGS))
def teacher_forced(request):
    """(model, src, tgt_in, encoded, logits, weights) of one configuration."""
    model = _model(seed=5, **DECODING_CONFIGS[request.param])
    src, tgt_in, _ = _batch(3)

    @nnx.jit
    def run(m):
        encoded = m.encode(src)
        return encoded, *m.decode(tgt_in, encoded, return_weights=True)

    return model, src, tgt_in, *run(model)


def test_matches_numpy_reference(teacher_forced):
    """Sec. 3.1-3.5 in NumPy: embeddings x sqrt(d_model) + PE, post-/pre-LN residual
    sub-layers, eq. (1), multi-head attention, eq. (2), masks, tied/untied output."""
    model, src, tgt_in, _, logits, weights = teacher_forced
    expected_logits, expected_alignment = _np_transformer(model, src, tgt_in)
    np.testing.assert_allclose(logits, expected_logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(weights["alignment"], expected_alignment, atol=1e-5)


def test_cached_decoding_matches_teacher_forcing(teacher_forced):
    model, src, tgt_in, encoded, logits, weights = teacher_forced
    max_length = TGT_LEN + 2
    model.init_cache(encoded, max_length)
    step = nnx.jit(lambda m, tokens: m.decode_step(tokens, return_weights=True))
    last = len(model.decoder_layers) - 1
    for t in range(TGT_LEN):
        step_logits, step_weights = step(model, tgt_in[:, t : t + 1])
        assert step_logits.shape == (BATCH, model.config.target_vocab_size)
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-4)
        np.testing.assert_allclose(
            step_weights["alignment"][:, 0], weights["alignment"][:, t], atol=1e-5
        )
        for i in range(last + 1):
            cross = f"decoder/layer_{i}/cross_attention"
            np.testing.assert_allclose(
                step_weights[cross][:, :, 0], weights[cross][:, :, t], atol=1e-5
            )
            own = step_weights[f"decoder/layer_{i}/self_attention"][:, :, 0]
            assert own.shape[-1] == max_length
            np.testing.assert_allclose(
                own[..., :TGT_LEN], weights[f"decoder/layer_{i}/self_attention"][:, :, t], atol=1e-5
            )
            np.testing.assert_array_equal(own[..., t + 1 :], 0)  # the future is masked
    assert int(model.cache_step[...]) == TGT_LEN
    # The alignment is the last layer's cross-attention averaged over heads.
    np.testing.assert_allclose(
        weights["alignment"], weights[f"decoder/layer_{last}/cross_attention"].mean(1), atol=1e-6
    )
    # Every cache array has a leading batch axis except the 0-d counters (beam search
    # reorders them); the cross-attention keys were projected once, in init_cache.
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Cache)):
        assert leaf.ndim == 0 or leaf.shape[0] == BATCH, path
    key, _ = model.decoder_layers[0].cross_attention.project_key_value(encoded.memory)
    np.testing.assert_allclose(model.decoder_layers[0].cross_key[...], key, atol=1e-6)


# ------------------------------------------------------------ training behaviour


def test_dropout_only_in_training():
    model = _model(
        dropout_rate=0.2,
        attention=AttentionConfig(dropout_rate=0.1),
        relu_dropout_rate=0.1,
        num_encoder_layers=1,
        num_decoder_layers=1,
    )
    src, tgt_in, _ = _batch()
    run = nnx.jit(lambda m: (m(src, tgt_in, train=True), m(src, tgt_in)))
    train_logits, eval_logits = run(model)
    assert np.all(np.isfinite(train_logits))
    assert not np.allclose(train_logits, eval_logits)
    # Fresh masks on every call; evaluation is deterministic.
    train_again, eval_again = run(model)
    assert not np.allclose(train_again, train_logits)
    np.testing.assert_array_equal(eval_again, eval_logits)


@pytest.mark.parametrize("pre_ln", [False, True], ids=["post_ln", "pre_ln"])
def test_overfits_one_batch(pre_ln):
    # Residual dropout on, so that training through dropout is exercised too; the
    # batch counts as memorised when the loss without dropout is below 10% of the start.
    model = _model(pre_ln=pre_ln, dropout_rate=0.1, num_encoder_layers=1, num_decoder_layers=1)
    src, tgt_in, labels = _batch(2)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def loss_fn(m, train):
        logits = m(src, tgt_in, train=train)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train(state):
        # All 200 steps in one compiled scan: one compilation, no per-step dispatch.
        def step(state, _):
            model, optimizer = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(loss_fn)(model, True)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        start = loss_fn(nnx.merge(graphdef, state)[0], False)
        state, losses = jax.lax.scan(step, state, None, length=200)
        return start, losses, loss_fn(nnx.merge(graphdef, state)[0], False)

    start, losses, end = train(state)
    print(f"{'pre' if pre_ln else 'post'}-LN loss {start:.3f} -> {end:.4f}")
    assert np.all(np.isfinite(losses))
    assert end < 0.1 * start, (start, end)


# ------------------------------------------------------------------------- packing


def test_packed_rows_match_separate_sequences():
    model = _model(seed=7, attention=AttentionConfig(positions="learned"))
    src_a, src_b = [5, 6, 7], [8, 9]
    tgt_a, tgt_b = [1, 4, 5], [1, 6, 7, 8]
    forward = nnx.jit(lambda m, *args, **packing: m(*args, return_weights=True, **packing))
    # Each sequence alone, padded, in a batch of two (no segment ids: plain padding masks).
    alone, _ = forward(
        model, jnp.array([src_a + [0, 0], src_b + [0, 0, 0]]), jnp.array([tgt_a + [0], tgt_b])
    )
    packed, weights = forward(
        model,
        jnp.array([src_a + src_b + [0]]),
        jnp.array([tgt_a + tgt_b + [0]]),
        src_segment_ids=jnp.array([[1, 1, 1, 2, 2, 0]]),
        src_positions=jnp.array([[0, 1, 2, 0, 1, 0]]),
        tgt_segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]]),
        tgt_positions=jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]]),
    )
    np.testing.assert_allclose(packed[0, :3], alone[0, :3], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:7], alone[1], atol=1e-5)
    # No attention crosses a segment boundary.
    alignment = np.asarray(weights["alignment"][0])
    assert np.all(alignment[:3, 3:] == 0) and np.all(alignment[3:7, :3] == 0)
    assert np.all(alignment[3:7, 5:] == 0)
    self_w = np.asarray(weights["encoder/layer_0/self_attention"][0])
    assert np.all(self_w[:, :3, 3:] == 0) and np.all(self_w[:, 3:, :3] == 0)


# ------------------------------------------------------------- embeddings, weights


def test_forward_backward_and_tied_embeddings_share_one_array():
    shared = _model(seed=11)
    assert shared.source_embedding is shared.target_embedding
    assert shared.output_projection is None
    params = nnx.to_flat_state(nnx.state(shared, nnx.Param))
    assert [p for p, _ in params if p[-1] == "embedding"] == [("source_embedding", "embedding")]
    # Sharing survives split/merge (what jit and checkpoints do).
    merged = nnx.merge(*nnx.split(shared))
    assert merged.source_embedding is merged.target_embedding
    # The shared table's gradient is the sum of its uses: compare with a model with
    # the same parameters whose source and target tables are separate copies.
    separate = _model(share_embeddings=False)
    nnx.update(separate, nnx.state(shared, nnx.Param))
    separate.target_embedding.embedding[...] = shared.source_embedding.embedding[...]
    src, tgt_in, labels = _batch(5)

    def loss_fn(m):
        logits = m(src, tgt_in)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = nnx.jit(lambda a, b: (nnx.grad(loss_fn)(a), nnx.grad(loss_fn)(b)))
    g_shared, g_separate = grads(shared, separate)
    flat = nnx.to_flat_state(g_shared)
    assert all(np.all(np.isfinite(g[...])) for _, g in flat)
    assert all(np.any(g[...] != 0) for _, g in flat), "some parameter gets no gradient"
    total = g_separate["source_embedding"]["embedding"][...]
    total = total + g_separate["target_embedding"]["embedding"][...]
    np.testing.assert_allclose(g_shared["source_embedding"]["embedding"][...], total, atol=1e-6)
    untied = _model(share_embeddings=False, tie_output=False)
    assert untied.source_embedding is not untied.target_embedding
    assert untied.output_projection.bias[...].shape == (VOCAB,)


def test_sow_and_return_weights_capture_every_layer():
    model = _model(seed=9, sow_weights=True)
    src, tgt_in, _ = _batch(4)
    capture = nnx.jit(
        lambda m: nnx.capture(lambda m: m(src, tgt_in, return_weights=True), nnx.Intermediate)(m)
    )
    (logits, weights), captured = capture(model)
    n_enc, n_dec = model.config.num_encoder_layers, model.config.num_decoder_layers
    expected = {f"encoder/layer_{i}/self_attention" for i in range(n_enc)}
    expected |= {
        f"decoder/layer_{i}/{kind}"
        for i in range(n_dec)
        for kind in ("self_attention", "cross_attention")
    }
    assert set(weights) == expected | {"alignment"}
    for i in range(n_enc):
        sown = captured["encoder_layers"][i]["self_attention"]["attention_weights"].get_value()
        assert len(sown) == 1
        np.testing.assert_array_equal(sown[0], weights[f"encoder/layer_{i}/self_attention"])
    for i in range(n_dec):
        for kind in ("self_attention", "cross_attention"):
            sown = captured["decoder_layers"][i][kind]["attention_weights"].get_value()
            np.testing.assert_array_equal(sown[0], weights[f"decoder/layer_{i}/{kind}"])
    # Shapes and masks: rows are distributions over the real source tokens only.
    valid = np.asarray(src != 0)
    cross = np.asarray(weights["decoder/layer_0/cross_attention"])
    assert cross.shape == (BATCH, model.config.num_heads, TGT_LEN, SRC_LEN)
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)
    assert np.all(cross[~np.broadcast_to(valid[:, None, None, :], cross.shape)] == 0)
    self_w = np.asarray(weights["decoder/layer_1/self_attention"])
    assert np.all(np.triu(self_w[0, 0], 1) == 0)  # causal
    assert weights["alignment"].shape == (BATCH, TGT_LEN, SRC_LEN)
