"""Tests of ConvS2S (Gehring et al. 2017): the whole model against the paper's
equations written out in NumPy, weight normalisation, initialisation, the
encoder-gradient scaling, causality, incremental decoding through the rolling
convolution buffers, weight capture, parameter counts of the presets and
overfitting one batch."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnx import decoding
from attnx.models.convs2s import (
    ConvS2S,
    ConvS2SConfig,
    convs2s_wmt14_en_de,
    convs2s_wmt14_en_fr,
    convs2s_wmt16_en_ro,
    cpu_small,
    parameter_count,
    tiny,
)
from attnx.models.convs2s_blocks import WeightNormConv, WeightNormLinear

VOCAB, BATCH, SRC_LEN, TGT_LEN = 11, 3, 6, 6

# Channel changes in both stacks (residual projections), an even encoder
# kernel, decoder kernels 5 and 1, and attention in two of three decoder blocks.
MIXED = dict(
    embed_dim=12,
    encoder_layers=((16, 3), (20, 4), (20, 1)),
    decoder_layers=((16, 3), (24, 5), (24, 1)),
    decoder_out_embed_dim=10,
    attention_layers=(0, 2),
)


def _batch(seed: int = 0):
    """src with trailing padding (different lengths per row), tgt_in with bos first, labels."""
    rng = np.random.default_rng(seed)
    src = rng.integers(3, VOCAB, (BATCH, SRC_LEN))
    for row, length in enumerate([SRC_LEN, 4, 2]):
        src[row, length:] = 0
    tgt = rng.integers(3, VOCAB, (BATCH, TGT_LEN))
    tgt_in = np.concatenate([np.ones((BATCH, 1), np.int64), tgt[:, :-1]], axis=1)
    return jnp.asarray(src, jnp.int32), jnp.asarray(tgt_in, jnp.int32), jnp.asarray(tgt, jnp.int32)


def _model(seed: int = 0, **overrides) -> ConvS2S:
    return ConvS2S(tiny(VOCAB, **overrides), rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def _perturb(model: ConvS2S, seed: int = 5) -> ConvS2S:
    """Biases start at zero and gains at ||v|| (so w = v); move both away from
    their initial values so that the references check them."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        if path[-1] in ("bias", "query_bias", "out_bias"):
            var.set_value(jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32))
        elif path[-1] == "gain":
            var.set_value(var.get_value() * jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32))
    return model


_MODELS: dict[str, ConvS2S] = {}


def _mixed(scaling: str) -> ConvS2S:
    """One MIXED model per scaling convention, shared by the tests (same shapes
    everywhere, so eager initialisers compile once)."""
    if scaling not in _MODELS:
        _MODELS[scaling] = _perturb(_model(3, scaling=scaling, **MIXED))
    return _MODELS[scaling]


@pytest.fixture(scope="module", params=["paper", "fairseq"])
def mixed_model(request):
    return _mixed(request.param)


@pytest.fixture(scope="module")
def paper_model():
    return _mixed("paper")


# ------------------------------------------------------------ NumPy reference


def _np(x):
    return np.asarray(x, np.float64)


def np_kernel(layer) -> np.ndarray:
    """w = g v / ||v||, the norm over every axis but the output one (Salimans & Kingma, eq. 2)."""
    v = _np(layer.direction[...])
    norm = np.sqrt((v**2).reshape(-1, v.shape[-1]).sum(axis=0))
    return v * _np(layer.gain[...]) / norm


def np_linear(layer, x):
    return x @ np_kernel(layer) + _np(layer.bias[...])


def np_conv(layer, x, left, right):
    """y_t = sum_j x_{t + j - left} w_j + b, zeros outside the sequence."""
    w = np_kernel(layer)
    k = w.shape[0]
    padded = np.pad(x, ((0, 0), (left, right), (0, 0)))
    return sum(padded[:, j : j + x.shape[1]] @ w[j] for j in range(k)) + _np(layer.bias[...])


def np_glu(y):
    a, b = np.split(y, 2, axis=-1)
    return a / (1 + np.exp(-b))


def numpy_convs2s(model: ConvS2S, src, tgt_in):
    """The paper's equations (sec. 3.1-3.4), written out; returns logits, per-layer weights."""
    cfg = model.config
    src, tgt_in = np.asarray(src), np.asarray(tgt_in)
    fairseq = cfg.scaling == "fairseq"
    valid = src != 0
    # Encoder (sec. 3.1-3.2).
    e = _np(model.source_embedding.embedding[...])[src]
    e = e + _np(model.source_positions.embedding[...])[: src.shape[1]]
    x = np_linear(model.encoder_input, e)
    for block in model.encoder_blocks:
        k = block.width
        res = x if block.residual_projection is None else np_linear(block.residual_projection, x)
        h = np_glu(np_conv(block.conv, x * valid[..., None], (k - 1) // 2, k // 2))
        x = (h + res) * math.sqrt(0.5)
    z = np_linear(model.encoder_output, x) * valid[..., None]
    values = (z + e) * (math.sqrt(0.5) if fairseq else 1.0)
    # Decoder (sec. 3.2-3.3).
    g = _np(model.target_embedding.embedding[...])[tgt_in]
    g = g + _np(model.target_positions.embedding[...])[: tgt_in.shape[1]]
    y = np_linear(model.decoder_input, g)
    weights = {}
    m = valid.sum(axis=1)[:, None, None]
    for i, block in enumerate(model.decoder_blocks):
        res = y if block.residual_projection is None else np_linear(block.residual_projection, y)
        h = np_glu(np_conv(block.conv, y, block.width - 1, 0))
        att = block.attention
        if att is not None:
            d = h @ _np(att.query_kernel[...]) + _np(att.query_bias[...]) + g
            d = d * (math.sqrt(0.5) if fairseq else 1.0)
            scores = np.einsum("bte,bse->bts", d, z)
            scores = np.where(valid[:, None, :], scores, -np.inf)
            a = np.exp(scores - scores.max(-1, keepdims=True))
            a = a / a.sum(-1, keepdims=True)
            c = np.einsum("bts,bse->bte", a, values) * np.sqrt(m)  # m sqrt(1/m), sec. 3.4
            h = (h + c @ _np(att.out_kernel[...]) + _np(att.out_bias[...])) * math.sqrt(0.5)
            weights[i] = a
        y = (h + res) * math.sqrt(0.5)
    logits = np_linear(model.output_projection, np_linear(model.decoder_output, y))
    return logits, weights


def test_matches_numpy_reference(mixed_model):
    src, tgt_in, _ = _batch()
    logits, weights = nnx.jit(lambda m, s, t: m(s, t, return_weights=True))(
        mixed_model, src, tgt_in
    )
    want_logits, want_weights = numpy_convs2s(mixed_model, src, tgt_in)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert sorted(weights) == [
        "alignment",
        "decoder/layer_0/attention",
        "decoder/layer_2/attention",
    ]
    for i, w in want_weights.items():
        np.testing.assert_allclose(weights[f"decoder/layer_{i}/attention"], w, atol=1e-5)
    np.testing.assert_allclose(
        weights["alignment"], (want_weights[0] + want_weights[2]) / 2, atol=1e-5
    )
    assert logits.shape == (BATCH, TGT_LEN, VOCAB) and logits.dtype == jnp.float32


# ------------------------------------------------------ weight normalisation, init


def test_weight_norm_output_invariant_to_scaling_v(paper_model):
    """Scaling v by any positive factor per output unit leaves w = g v / ||v|| unchanged."""
    src, tgt_in, _ = _batch(1)
    forward = nnx.jit(lambda m: m(src, tgt_in))
    before = forward(paper_model)
    scaled = nnx.clone(paper_model)
    rng = np.random.default_rng(0)
    layers = [
        mod
        for _, mod in nnx.iter_graph(scaled)
        if isinstance(mod, WeightNormLinear | WeightNormConv)
    ]
    assert len(layers) == 6 + 2 + 4 + 1  # convs, residual projections, maps in and out, output
    for layer in layers:
        v = layer.direction[...]
        layer.direction[...] = v * jnp.asarray(rng.uniform(0.1, 10.0, v.shape[-1]), v.dtype)
    np.testing.assert_allclose(forward(scaled), before, rtol=1e-5, atol=1e-5)
    # The gain does matter: doubling one conv's g changes the output.
    layers[0].gain[...] = layers[0].gain[...] * 2
    assert np.abs(np.asarray(forward(scaled)) - np.asarray(before)).max() > 1e-3


@pytest.fixture(scope="module")
def dropout_models():
    """Twins with dropout 0.3 and the same parameters and dropout streams, with and
    without the encoder-gradient scaling."""
    on = _model(7, dropout_rate=0.3, **MIXED)
    off = _model(7, dropout_rate=0.3, scale_encoder_gradients=False, **MIXED)
    return on, off


def test_initialisation_follows_section_3_5(dropout_models):
    """v ~ N(0, sqrt(4 p / (k d))) before a GLU and N(0, sqrt(p / d)) elsewhere, with p the
    retain probability where the input is dropped out; g = ||v|| (so w = v); zero biases;
    embeddings N(0, 0.1)."""
    model, p = dropout_models[0], 0.7
    retained = {"encoder_input", "decoder_input", "output_projection"}
    z_scores = []
    for path, layer in nnx.iter_graph(model):
        if isinstance(layer, WeightNormConv):
            std = math.sqrt(4 * p / (layer.width * layer.in_features))
        elif isinstance(layer, WeightNormLinear):
            std = math.sqrt((p if path[0] in retained else 1.0) / layer.in_features)
        else:
            continue
        v = np.asarray(layer.direction[...])
        z_scores.append(v.ravel() / std)
        np.testing.assert_allclose(layer.kernel(), v, rtol=1e-5, atol=1e-6)
        assert not np.any(layer.bias[...])
    z_scores = np.concatenate(z_scores)
    assert z_scores.size > 10_000
    np.testing.assert_allclose(np.std(z_scores), 1.0, rtol=0.03)
    embeddings = np.concatenate(
        [
            np.ravel(t[...])
            for t in (
                model.source_embedding.embedding,
                model.target_embedding.embedding,
                model.source_positions.embedding,
                model.target_positions.embedding,
            )
        ]
    )
    np.testing.assert_allclose(np.std(embeddings), 0.1, rtol=0.12)
    without = nnx.eval_shape(lambda: ConvS2S(tiny(VOCAB, weight_norm=False), rngs=nnx.Rngs(0)))
    assert without.decoder_blocks[0].conv.gain is None


def test_conv_paddings_against_numpy(paper_model):
    """Encoder convolutions are centred (odd and even widths), decoder ones causal."""
    x = np.random.default_rng(1).normal(size=(2, 7, 16)).astype(np.float32)
    for conv, (left, right) in [
        (paper_model.decoder_blocks[1].conv, (4, 0)),  # k = 5, causal
        (paper_model.encoder_blocks[0].conv, (1, 1)),  # k = 3, centred
        (paper_model.encoder_blocks[1].conv, (1, 2)),  # k = 4, centred
    ]:
        np.testing.assert_allclose(conv(x), np_conv(conv, x, left, right), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------- encoder-gradient scaling


def test_forward_backward_finite_and_encoder_gradients_scaled(dropout_models):
    """Finite loss and gradients with dropout on; dropout only in training; and
    sec. 3.4 / fairseq's GradMultiply: encoder weights get exactly 1 / (2 x 2
    attention layers) of the gradient they get without the scaling."""
    on, off = dropout_models
    params_on, params_off = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (on, off))
    assert all(np.array_equal(a, b) for a, b in zip(params_on, params_off, strict=True))
    src, tgt_in, labels = _batch(2)

    def loss_fn(m):
        logits = m(src, tgt_in, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @nnx.jit
    def run(model):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        evals = [model(src, tgt_in) for _ in range(2)]
        return loss, grads, evals, model(src, tgt_in, train=True)

    loss, grads, (eval_1, eval_2), train_logits = run(on)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(grads))
    # Dropout is on in training (a fresh mask each call) and off in evaluation.
    np.testing.assert_array_equal(eval_1, eval_2)
    assert np.abs(np.asarray(train_logits) - np.asarray(eval_1)).max() > 1e-3

    # Same parameters and the same dropout masks: only the scaling differs.
    g_on = dict(nnx.to_flat_state(grads))
    g_off = dict(nnx.to_flat_state(nnx.jit(nnx.grad(loss_fn))(off)))
    factor = 1.0 / (2 * 2)
    encoder = ("encoder_input", "encoder_blocks", "encoder_output")
    checked = 0
    for path, leaf in g_on.items():
        a, b = np.asarray(leaf.get_value()), np.asarray(g_off[path].get_value())
        if path[0] in encoder:
            np.testing.assert_allclose(a, factor * b, rtol=1e-5, atol=1e-9, err_msg=str(path))
            assert np.abs(b).max() > 0
            checked += 1
        elif path[0] not in ("source_embedding", "source_positions"):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9, err_msg=str(path))
    assert checked >= 10
    # Source embeddings also reach the loss through the values z + e, unscaled (sec. 3.4
    # excludes them), so their gradient is neither the scaled nor the unscaled one.
    a = np.asarray(g_on[("source_embedding", "embedding")].get_value())
    b = np.asarray(g_off[("source_embedding", "embedding")].get_value())
    assert not np.allclose(a, b, rtol=1e-3) and not np.allclose(a, factor * b, rtol=1e-3)


# ----------------------------------------------------------- causality, decoding


def test_decoder_never_sees_future_tokens(paper_model):
    src, tgt_in, _ = _batch(3)
    forward = nnx.jit(lambda m, t: m(src, t))
    base = np.asarray(forward(paper_model, tgt_in))
    for j in (1, 3, TGT_LEN - 1):
        changed = tgt_in.at[:, j].set((tgt_in[:, j] + 4) % (VOCAB - 3) + 3)
        out = np.asarray(forward(paper_model, changed))
        np.testing.assert_array_equal(out[:, :j], base[:, :j])
        assert np.abs(out[:, j] - base[:, j]).max() > 1e-4


def test_cached_decoding_reproduces_teacher_forcing(mixed_model):
    src, tgt_in, _ = _batch(4)
    model = nnx.clone(mixed_model)
    encoded, logits, weights = nnx.jit(
        lambda m: (lambda enc: (enc, *m.decode(tgt_in, enc, return_weights=True)))(m.encode(src))
    )(model)
    model.init_cache(encoded, TGT_LEN + 2)
    # Every decoder block with k > 1 keeps exactly k - 1 inputs.
    buffers = [
        None if b.conv_buffer is None else b.conv_buffer[...].shape for b in model.decoder_blocks
    ]
    assert buffers == [(BATCH, 2, 16), (BATCH, 4, 16), None]
    step = nnx.jit(lambda m, t: m.decode_step(t, return_weights=True))
    for t in range(TGT_LEN):
        step_logits, step_weights = step(model, tgt_in[:, t : t + 1])
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-4)
        assert sorted(step_weights) == sorted(weights)
        for name, w in weights.items():
            assert step_weights[name].shape == (BATCH, 1, SRC_LEN)
            np.testing.assert_allclose(step_weights[name][:, 0], w[:, t], atol=1e-5)
    assert int(model.cache_step[...]) == TGT_LEN


def test_greedy_search_runs_on_the_cache_interface(paper_model):
    """attnx.decoding drives encode/init_cache/decode_step; its tokens are the argmax of
    the teacher-forced logits of its own output, and its alignment matches decode's."""
    src, _, _ = _batch(5)
    result = decoding.greedy_search(paper_model, src, max_length=5, return_weights=True)
    seq = np.asarray(result.sequences)
    tgt_in = jnp.asarray(np.concatenate([np.ones((BATCH, 1), np.int64), seq[:, :-1]], 1), jnp.int32)
    logits, weights = paper_model(src, tgt_in, return_weights=True)
    for b in range(BATCH):
        n = int(result.lengths[b])
        np.testing.assert_array_equal(seq[b, :n], np.argmax(logits[b, :n], -1))
        np.testing.assert_allclose(result.alignments[b, :n], weights["alignment"][b, :n], atol=1e-5)


def test_sown_weights_match_returned_weights():
    model = _model(6, sow_weights=True, **MIXED)
    src, tgt_in, _ = _batch(6)
    run = nnx.capture(lambda m: m(src, tgt_in, return_weights=True), nnx.Intermediate)
    (_, weights), sown = run(model)
    for i in (0, 2):
        (captured,) = sown["decoder_blocks"][i]["attention"]["attention_weights"].get_value()
        np.testing.assert_allclose(captured, weights[f"decoder/layer_{i}/attention"])
    assert 1 not in sown["decoder_blocks"]


# -------------------------------------------------------------- training


def test_overfits_one_batch():
    model = _model(8, **MIXED)
    src, tgt_in, labels = _batch(8)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(m):
            logits = m(src, tgt_in, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(200)]
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


# ------------------------------------------------------- presets, counts, errors


def _count_by_hand(cfg: ConvS2SConfig) -> int:
    """Weight-normalised layers: in x out + out (g) + out (b); convs k x in x 2C + 2 x 2C;
    attention (plain): C x E + E + E x C + C; embeddings and positions V x E, L x E."""
    e, out_e = cfg.embed_dim, cfg.output_embed_dim

    def linear(i, o):
        return i * o + 2 * o

    def stack(layers, attention):
        total, c_in = 0, layers[0][0]
        for (c, k), att in zip(layers, attention, strict=True):
            total += k * c_in * 2 * c + 2 * 2 * c + (linear(c_in, c) if c_in != c else 0)
            total += (c * e + e + e * c + c) if att else 0
            c_in = c
        return total

    encoder = cfg.src_vocab_size * e + cfg.max_length * e + linear(e, cfg.encoder_layers[0][0])
    encoder += stack(cfg.encoder_layers, [False] * len(cfg.encoder_layers))
    encoder += linear(cfg.encoder_layers[-1][0], e)
    decoder = cfg.target_vocab_size * e + cfg.max_length * e + linear(e, cfg.decoder_layers[0][0])
    decoder += stack(cfg.decoder_layers, cfg.attention_flags)
    decoder += linear(cfg.decoder_layers[-1][0], out_e) + linear(out_e, cfg.target_vocab_size)
    return encoder + decoder


def test_preset_parameter_counts():
    presets = {
        "WMT'16 En-Ro (paper = fairseq layout)": convs2s_wmt16_en_ro(),
        "WMT'14 En-De (paper)": convs2s_wmt14_en_de(),
        "WMT'14 En-De (fairseq fconv_wmt_en_de)": convs2s_wmt14_en_de(fairseq=True),
        "WMT'14 En-Fr (paper)": convs2s_wmt14_en_fr(),
        "WMT'14 En-Fr (fairseq fconv_wmt_en_fr)": convs2s_wmt14_en_fr(fairseq=True),
        "cpu-small": cpu_small(),
        "tiny": tiny(),
    }
    for name, cfg in presets.items():
        count = parameter_count(cfg)
        print(f"ConvS2S {name}, vocab {cfg.src_vocab_size}: {count:,} parameters")
        assert count == _count_by_hand(cfg), name
    # The layouts of sec. 5.1.
    assert (
        convs2s_wmt14_en_de().encoder_layers
        == ((512, 3),) * 10 + ((768, 3),) * 3 + ((2048, 1),) * 2
    )
    assert len(convs2s_wmt14_en_fr(fairseq=True).decoder_layers) == 15
    assert convs2s_wmt16_en_ro().decoder_layers == ((512, 3),) * 20
    # The PyTorch peer of cpu-small has no weight norm; without it the counts agree.
    assert parameter_count(cpu_small(weight_norm=False)) == 9_598_784


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="attention_layers has 3 booleans"):
        tiny(attention_layers=(True, False, True))
    with pytest.raises(ValueError, match="selects no decoder block"):
        tiny(attention_layers=False)
    with pytest.raises(ValueError, match=r"attention_layers \(0, 5\)"):
        tiny(attention_layers=(0, 5))
    with pytest.raises(ValueError, match="decoder_layers"):
        tiny(decoder_layers=((16, 0),))
    with pytest.raises(ValueError, match="scaling"):
        tiny(scaling="other")
    assert tiny(attention_layers=[1]).attention_flags == (False, True)
    assert dataclasses.replace(tiny(), encoder_layers=[[8, 3]]).encoder_layers == ((8, 3),)
    model = _model(9, **MIXED)
    src, tgt_in, _ = _batch(9)
    with pytest.raises(ValueError, match="tokens must be integers"):
        model.encode(src.astype(jnp.float32))
    with pytest.raises(ValueError, match="call init_cache"):
        model.decode_step(tgt_in[:, :1])
    with pytest.raises(ValueError, match="max_length"):
        model.init_cache(model.encode(src), 17)
    model.init_cache(model.encode(src), 4)
    with pytest.raises(ValueError, match=r"tokens must be integers \[batch=3, 1\]"):
        model.decode_step(tgt_in[:2, :1])
    with pytest.raises(ValueError, match=r"tokens must be integers \[batch=3, length\], got int"):
        model.decode(tgt_in[:2], model.encode(src))
