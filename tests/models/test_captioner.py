"""Show, Attend and Tell (Xu et al. 2015) against its equations written out in NumPy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnx.layers.attention_config import AttentionConfig
from attnx.models.caption_losses import (
    captioner_loss,
    doubly_stochastic_penalty,
    hard_attention_loss,
    update_baseline,
)
from attnx.models.captioner import Captioner, CaptionerConfig, coco_vgg, digits_small, tiny
from attnx.models.image_encoders import VGG19_BLOCKS, ConvEncoder, vgg19_encoder

B, T, IMAGE = 4, 6, 16


def _captions(rng, batch, length, vocab):
    """tgt_out: tokens in [3, vocab), eos, then padding; tgt_in: bos + tgt_out[:-1]."""
    out = np.zeros((batch, length), np.int32)
    for n in range(batch):
        size = rng.integers(2, length)  # real words before eos
        out[n, :size] = rng.integers(3, vocab, size)
        out[n, size] = 2
    tgt_in = np.concatenate([np.ones((batch, 1), np.int32), out[:, :-1]], axis=1)
    return tgt_in, out


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((B, IMAGE, IMAGE, 1)).astype(np.float32)
    tgt_in, tgt_out = _captions(rng, B, T, tiny().vocab_size)
    return images, tgt_in, tgt_out


@pytest.fixture(scope="module")
def soft_model():
    return Captioner(tiny(), rngs=nnx.Rngs(0))


# -- NumPy reference -----------------------------------------------------------


def numpy_conv_encoder(encoder: ConvEncoder, images):
    """3x3 'SAME' convolutions as sums of shifted slices, ReLU, 2x2 max-pools."""
    x = np.asarray(images, np.float64)
    layer = 0
    for block in encoder.blocks:
        for _ in block:
            kernel = np.asarray(encoder.layers[layer].kernel[...], np.float64)
            bias = np.asarray(encoder.layers[layer].bias[...], np.float64)
            padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            height, width = x.shape[1:3]
            y = np.zeros((*x.shape[:3], kernel.shape[-1]))
            for dy in range(3):
                for dx in range(3):
                    y += padded[:, dy : dy + height, dx : dx + width] @ kernel[dy, dx]
            x = np.maximum(y + bias, 0.0)
            layer += 1
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    return x


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_captioner(model: Captioner, features, tgt_in):
    """eq. 1-7, the f_init of sec. 3.1.2 and the gate of sec. 4.2.1, one example and step at a time."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    att = model.attention
    wa, wh, ba, v = p(att.feature_kernel), p(att.hidden_kernel), p(att.bias), p(att.v)
    emb, w_in, u_rec, b_lstm = (
        p(model.embedding),
        p(model.input_kernel),
        p(model.recurrent_kernel),
        p(model.lstm_bias),
    )
    n = model.config.hidden_dim
    batch = features.shape[0]
    flat = np.asarray(features, np.float64).reshape(batch, -1, features.shape[-1])
    logits = np.zeros((batch, tgt_in.shape[1], model.config.vocab_size))
    alignment = np.zeros((batch, tgt_in.shape[1], flat.shape[1]))
    gates = np.zeros((batch, tgt_in.shape[1]))
    for b in range(batch):
        a = flat[b]
        mean = a.mean(axis=0)
        h = np.tanh(mean @ p(model.init_kernel)[:, 0] + p(model.init_bias)[0])
        c = np.tanh(mean @ p(model.init_kernel)[:, 1] + p(model.init_bias)[1])
        for t, word in enumerate(tgt_in[b]):
            e = np.array([v @ np.tanh(a_i @ wa + h @ wh + ba) for a_i in a])  # eq. 4
            alpha = np.exp(e - e.max()) / np.exp(e - e.max()).sum()  # eq. 5
            beta = sigmoid(h @ p(model.gate_kernel) + float(p(model.gate_bias)))
            z = beta * (alpha @ a)  # eq. 6 with the gate
            ey = emb[word]
            pre = np.concatenate([ey, z, h]) @ np.concatenate(
                [w_in.reshape(-1, 4 * n), u_rec.reshape(-1, 4 * n)]
            ) + b_lstm.reshape(-1)
            i, f, o, g = (pre[k * n : (k + 1) * n] for k in range(4))
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)  # eq. 2
            h = sigmoid(o) * np.tanh(c)  # eq. 3
            out = (
                ey
                + h @ p(model.readout_kernel)[:n]
                + z @ p(model.readout_kernel)[n:]
                + p(model.readout_bias)
            )
            logits[b, t] = out @ p(model.logits_kernel) + p(model.logits_bias)  # eq. 7
            alignment[b, t], gates[b, t] = alpha, beta
    return logits, alignment, gates


def test_conv_encoder_matches_numpy(soft_model, batch):
    images = batch[0]
    got = jax.jit(lambda x: soft_model.encoder(x))(images)
    assert got.shape == (B, 4, 4, 8)
    np.testing.assert_allclose(got, numpy_conv_encoder(soft_model.encoder, images), atol=1e-4)


def test_teacher_forcing_matches_numpy(soft_model, batch):
    images, tgt_in, _ = batch

    @jax.jit
    def run(images, tgt_in):
        encoded = soft_model.encode(images)
        return encoded.memory.features, soft_model.decode(tgt_in, encoded, return_weights=True)

    features, (logits, weights) = run(images, tgt_in)
    want_logits, want_alignment, want_gates = numpy_captioner(
        soft_model, np.asarray(features), tgt_in
    )
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(weights["alignment"], want_alignment, atol=1e-5)
    np.testing.assert_allclose(weights["gate"], want_gates, atol=1e-5)
    assert weights["decoder/spatial_attention"].shape == (B, T, 16)


def test_initial_state_is_f_init_of_mean_annotation():
    model = Captioner(tiny(encoder="features", feature_dim=8), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(1)
    features = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    encode = jax.jit(lambda f, m: model.encode(f, mask=m))
    encoded = encode(features, None)
    mean = features.reshape(2, 15, 8).mean(axis=1)
    kernel, bias = np.asarray(model.init_kernel[...]), np.asarray(model.init_bias[...])
    np.testing.assert_allclose(encoded.mean, mean, atol=1e-6)
    np.testing.assert_allclose(encoded.hidden, np.tanh(mean @ kernel[:, 0] + bias[0]), atol=1e-5)
    np.testing.assert_allclose(encoded.cell, np.tanh(mean @ kernel[:, 1] + bias[1]), atol=1e-5)
    # Only the mean matters: shuffling the locations leaves h_0 and c_0 unchanged,
    # changing one annotation vector changes them.
    shuffled = features.reshape(2, 15, 8)[:, rng.permutation(15)].reshape(2, 3, 5, 8)
    np.testing.assert_allclose(encode(shuffled, None).hidden, encoded.hidden, atol=1e-5)
    changed = features.copy()
    changed[:, 0, 0] += 3.0
    assert np.abs(np.asarray(encode(changed, None).hidden - encoded.hidden)).max() > 1e-3
    # A location mask restricts the mean to real locations.
    mask = np.ones((2, 3, 5), bool)
    mask[:, 2] = False
    masked = encode(features, mask)
    real_mean = features[:, :2].reshape(2, 10, 8).mean(axis=1)
    np.testing.assert_allclose(masked.mean, real_mean, atol=1e-6)
    np.testing.assert_allclose(
        masked.hidden, np.tanh(real_mean @ kernel[:, 0] + bias[0]), atol=1e-5
    )


def test_init_mlp_hidden_layer():
    """f_init with a shared ReLU layer (init_hidden_layers=1, the coco_vgg preset)."""
    model = Captioner(
        tiny(encoder="features", feature_dim=8, init_hidden_layers=1), rngs=nnx.Rngs(5)
    )
    features = np.random.default_rng(6).standard_normal((2, 15, 8)).astype(np.float32)
    encoded = nnx.jit(lambda m, f: m.encode(f))(model, features)
    layer = model.init_layers[0]
    hidden = np.maximum(features.mean(1) @ np.asarray(layer["kernel"][...]) + layer["bias"][...], 0)
    kernel, bias = np.asarray(model.init_kernel[...]), np.asarray(model.init_bias[...])
    np.testing.assert_allclose(encoded.hidden, np.tanh(hidden @ kernel[:, 0] + bias[0]), atol=1e-5)
    np.testing.assert_allclose(encoded.cell, np.tanh(hidden @ kernel[:, 1] + bias[1]), atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_cell(batch):
    images, tgt_in, _ = batch
    model = Captioner(tiny(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    logits = nnx.jit(lambda m, x, y: m(x, y))(model, images, tgt_in)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    model.init_cache(nnx.jit(lambda m, x: m.encode(x))(model, images), T)
    assert model.cache_cell[...].dtype == jnp.float32


@pytest.mark.parametrize("variant", ["soft", "hard_argmax", "hard_expectation"])
def test_cached_decoding_equals_teacher_forcing(soft_model, batch, variant):
    images, tgt_in, _ = batch
    if variant == "soft":
        model = soft_model
    else:
        cfg = tiny(attention=AttentionConfig(kind="hard"), hard_eval=variant.split("_")[1])
        model = Captioner(cfg, rngs=nnx.Rngs(0))
    encoded = nnx.jit(lambda m, x: m.encode(x))(model, images)
    logits, weights = nnx.jit(lambda m, y, e: m.decode(y, e, return_weights=True))(
        model, tgt_in, encoded
    )
    model.init_cache(encoded, max_length=T)
    step = nnx.jit(lambda m, tokens: m.decode_step(tokens, return_weights=True))
    for t in range(T):
        step_logits, step_weights = step(model, tgt_in[:, t : t + 1])
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-4)
        assert set(step_weights) == set(weights)
        for name, value in weights.items():
            np.testing.assert_allclose(step_weights[name][:, 0], value[:, t], atol=1e-4)
    if variant == "hard_argmax":  # z_t used exactly one location per step
        np.testing.assert_array_equal(np.asarray(weights["location"]).sum(-1), 1.0)
        np.testing.assert_array_equal(
            np.argmax(weights["location"], -1), np.argmax(weights["alignment"], -1)
        )
    if variant == "hard_expectation":  # equals soft attention with the same parameters
        np.testing.assert_allclose(weights["location"], weights["alignment"], atol=1e-6)


def test_loss_includes_doubly_stochastic_penalty(soft_model, batch):
    images, tgt_in, tgt_out = batch

    @jax.jit
    def run(images, tgt_in, tgt_out):
        logits, weights = soft_model(images, tgt_in, return_weights=True)
        by_tokens = captioner_loss(logits, tgt_out, weights, lam=0.7)
        by_captions = captioner_loss(logits, tgt_out, weights, lam=0.7, normalize="captions")
        return logits, weights, by_tokens, by_captions[1]

    logits, weights, (loss, metrics), per_caption = run(images, tgt_in, tgt_out)
    real = tgt_out != 0
    np.testing.assert_allclose(
        metrics["penalty"], doubly_stochastic_penalty(weights["alignment"], real, 0.7), rtol=1e-6
    )
    # eq. 14 by hand: lambda sum_i (1 - sum_t alpha_ti)^2, mean over captions.
    alpha = np.asarray(weights["alignment"], np.float64) * real[..., None]
    penalty = 0.7 * np.mean(np.sum((1.0 - alpha.sum(1)) ** 2, axis=-1))
    log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
    token_nll = -np.take_along_axis(log_probs, tgt_out[..., None], -1)[..., 0]
    nll = np.sum(token_nll * real) / real.sum()
    np.testing.assert_allclose(metrics["penalty"], penalty, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(loss, nll + penalty, rtol=1e-5)
    np.testing.assert_allclose(per_caption["nll"], np.sum(token_nll * real) / B, rtol=1e-5)


def test_hard_attention_loss_gradient_is_eq_12():
    """d loss / d alpha is -lambda_r (R - b) w_t / alpha_{t,s_t} at s_t plus the entropy term."""
    rng = np.random.default_rng(2)
    vocab, length, locations = 5, 3, 4
    logits = jnp.asarray(rng.standard_normal((2, length, vocab)), jnp.float32)
    targets = jnp.asarray([[3, 4, 2], [4, 2, 0]], jnp.int32)
    alpha = jax.nn.softmax(jnp.asarray(rng.standard_normal((2, length, locations)), jnp.float32))
    index = rng.integers(0, locations, (2, length))
    location = jax.nn.one_hot(index, locations)
    sampled = jnp.asarray([True, False])
    baseline, lam_r, lam_e = -3.0, 0.5, 0.1

    def loss_fn(logits, alpha):
        weights = {"alignment": alpha, "location": location, "sampled": sampled}
        return hard_attention_loss(
            logits, targets, weights, baseline, reward_weight=lam_r, entropy_weight=lam_e
        )

    @jax.jit
    def grads(logits, alpha):
        value_and_grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(logits, alpha)
        nll = lambda lg: captioner_loss(lg, targets, {"alignment": alpha}, lam=0.0)[0]  # noqa: E731
        return value_and_grads, jax.grad(nll)(logits)

    ((loss, metrics), (grad_logits, grad_alpha)), grad_nll = grads(logits, alpha)
    w = np.asarray(targets != 0, np.float64)
    tokens = w.sum()
    log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
    token_ll = np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    reward = (token_ll * w).sum(-1)
    a = np.asarray(alpha, np.float64)
    np.testing.assert_allclose(metrics["log_likelihood"], reward, rtol=1e-5)
    want_grad = np.zeros_like(a)
    log_p_s = 0.0
    for t in range(length):
        n, s = 0, index[0, t]  # only example 0 was sampled
        want_grad[n, t, s] += -lam_r * (reward[0] - baseline) * w[n, t] / a[n, t, s] / tokens
        log_p_s += w[n, t] * np.log(a[n, t, s])
    want_grad += lam_e * w[..., None] * (np.log(a) + 1.0) / tokens  # -lambda_e dH/dalpha
    np.testing.assert_allclose(grad_alpha, want_grad, rtol=1e-4, atol=1e-6)
    entropy = -(a * np.log(a)).sum(-1)
    want_loss = (
        -reward.sum() - lam_r * (reward[0] - baseline) * log_p_s - lam_e * (entropy * w).sum()
    ) / tokens
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    # The reward carries no gradient: d loss / d logits is that of the NLL alone.
    np.testing.assert_allclose(grad_logits, grad_nll, atol=1e-6)
    np.testing.assert_allclose(
        update_baseline(baseline, metrics["log_likelihood"]), 0.9 * baseline + 0.1 * reward.mean()
    )


def test_hard_training_samples_locations(batch):
    images, tgt_in, _ = batch
    model = Captioner(tiny(attention=AttentionConfig(kind="hard")), rngs=nnx.Rngs(0))
    run = nnx.jit(lambda m, x, y: m(x, y, train=True, return_weights=True))
    samples = [run(model, images, tgt_in)[1] for _ in range(3)]
    for weights in samples:
        location, alignment = np.asarray(weights["location"]), np.asarray(weights["alignment"])
        for n, was_sampled in enumerate(np.asarray(weights["sampled"])):
            if was_sampled:  # one-hot s_t drawn where alpha_t > 0
                np.testing.assert_array_equal(location[n].sum(-1), 1.0)
                assert np.all(alignment[n][location[n] == 1] > 0)
            else:  # sec. 4.1: the expectation alpha_t instead
                np.testing.assert_allclose(location[n], alignment[n], atol=1e-6)
    # Fresh keys every call: the samples differ.
    assert not np.array_equal(samples[0]["location"], samples[1]["location"])


def _train(model, images, tgt_in, tgt_out, steps, hard):
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, baseline):
        def loss_fn(model):
            logits, weights = model(images, tgt_in, train=True, return_weights=True)
            if hard:
                return hard_attention_loss(logits, tgt_out, weights, baseline)
            return captioner_loss(logits, tgt_out, weights)

        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        if hard:
            baseline = update_baseline(baseline, metrics["log_likelihood"])
        return loss, metrics, baseline, grads

    baseline = jnp.zeros((), jnp.float32)
    history = []
    for step in range(steps):
        loss, metrics, baseline, grads = train_step(model, optimizer, baseline)
        if step == 0:
            leaves = jax.tree.leaves(grads)
            assert all(np.all(np.isfinite(g)) for g in leaves)
            assert np.isfinite(loss)
        history.append({name: float(metrics[name]) for name in ("nll", "penalty")})
    return history


def test_soft_attention_overfits_one_batch(batch):
    images, tgt_in, tgt_out = batch
    model = Captioner(tiny(dropout_rate=0.1), rngs=nnx.Rngs(0))
    history = _train(model, images, tgt_in, tgt_out, 200, hard=False)
    start, end = history[0], history[-1]
    print(f"soft attention: {start} -> {end}")
    assert end["nll"] < 0.1 * start["nll"], (start, end)
    # The penalty cannot reach 0 when a caption has fewer words T than the grid has
    # locations L: sum_i (1 - x_i)^2 with sum_i x_i = T is least, (L - T)^2 / L, at x_i = T / L.
    words, locations = (tgt_out != 0).sum(-1), 16
    floor = np.mean((locations - words) ** 2 / locations)
    assert floor - 1e-4 <= end["penalty"] < 1.01 * floor, (start, end, floor)


def test_hard_attention_learns_one_batch(batch):
    images, tgt_in, tgt_out = batch
    model = Captioner(tiny(attention=AttentionConfig(kind="hard")), rngs=nnx.Rngs(0))
    history = _train(model, images, tgt_in, tgt_out, 200, hard=True)
    start, end = history[0]["nll"], np.mean([h["nll"] for h in history[-10:]])
    print(f"hard attention: nll {start:.3f} -> {end:.3f} (mean of the last 10 steps)")
    assert end < 0.2 * start, (start, end)
    # Evaluation (expectation) decodes the captions too.
    logits = nnx.jit(lambda m, x, y: m(x, y))(model, images, tgt_in)
    _, metrics = captioner_loss(logits, tgt_out, {"alignment": jnp.zeros((B, T, 16))}, lam=0.0)
    assert metrics["nll"] < 0.3 * start


def test_precomputed_features_grid_or_flat():
    model = Captioner(tiny(encoder="features", feature_dim=8), rngs=nnx.Rngs(4))
    rng = np.random.default_rng(3)
    features = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    tgt_in, _ = _captions(rng, 2, 4, 11)
    mask = np.ones((2, 3, 5), bool)
    mask[0, :, 3:] = False

    @nnx.jit
    def run(model, features, tgt_in, mask):
        encoded = model.encode(features)
        logits, weights = model.decode(tgt_in, encoded, return_weights=True)
        flat_logits = model(features.reshape(2, 15, 8), tgt_in)
        masked = model.decode(tgt_in, model.encode(features, mask=mask), return_weights=True)
        return logits, weights, flat_logits, masked[1], encoded.memory.as_grid(weights["alignment"])

    logits, weights, flat_logits, masked, grid = run(model, features, tgt_in, mask)
    np.testing.assert_allclose(flat_logits, logits, atol=1e-6)
    assert grid.shape == (2, 4, 3, 5)
    want_logits, want_alignment, _ = numpy_captioner(model, features, tgt_in)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(weights["alignment"], want_alignment, atol=1e-5)
    # Padded locations get no attention.
    assert np.all(np.asarray(masked["alignment"]).reshape(2, 4, 3, 5)[0, :, :, 3:] == 0)


def _param_count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_vgg19_encoder_gives_14x14x512_grid():
    encoder = nnx.eval_shape(lambda: vgg19_encoder(rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(
        lambda e, x: e(x), encoder, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    )
    assert out.shape == (2, 14, 14, 512)
    # VGG-19's sixteen 3x3 convolutions: sum of 9 * in * out + out.
    channels = [3] + [c for block in VGG19_BLOCKS for c in block]
    want = sum(9 * i * o + o for i, o in zip(channels[:-1], channels[1:], strict=True))
    assert _param_count(encoder) == want == 20_024_384


def test_parameter_counts():
    """digits_small by hand; coco_vgg printed (measured)."""
    small = nnx.eval_shape(lambda: Captioner(digits_small(), rngs=nnx.Rngs(0)))
    c, n, m, v, a = 128, 256, 128, 16, 256
    encoder = (1 * 32 + 32 * 64 + 64 * 128) * 9 + 32 + 64 + 128
    want = (
        encoder
        + v * m  # E
        + c * 2 * n
        + 2 * n  # f_init,h and f_init,c
        + c * a
        + n * a
        + 2 * a  # f_att: W_a, W_h, b, v
        + n
        + 1  # gate
        + (m + c + n) * 4 * n
        + 4 * n  # LSTM
        + (n + c) * m
        + m  # L_h, L_z
        + m * v
        + v  # L_o
    )
    assert _param_count(small) == want == 836_497
    coco = nnx.eval_shape(lambda: Captioner(coco_vgg(), rngs=nnx.Rngs(0)))
    encoded = nnx.eval_shape(
        lambda model, x: model.encode(x), coco, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    )
    assert encoded.memory.features.shape == (1, 196, 512)
    assert encoded.hidden.shape == (1, 1800)
    print(
        f"digits_small: {_param_count(small):,}; coco_vgg: {_param_count(coco):,} "
        f"(VGG-19 conv {_param_count(coco.encoder):,})"
    )


def test_bad_inputs_are_named(soft_model, batch):
    images, tgt_in, _ = batch
    with pytest.raises(ValueError, match="images must be"):
        soft_model.encode(np.zeros((2, 16, 16, 3), np.float32))
    encoded = soft_model.encode(images)
    with pytest.raises(ValueError, match=r"tokens must be integers \[batch=4, length\], got float"):
        soft_model.decode(tgt_in.astype(np.float32), encoded)
    with pytest.raises(ValueError, match=r"tokens must be integers \[batch=4, length\], got int"):
        soft_model.decode(tgt_in[:2], encoded)
    fresh = Captioner(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        fresh.decode_step(tgt_in[:, :1])
    with pytest.raises(ValueError, match="attention.kind"):
        tiny(attention=AttentionConfig(kind="sparse"))
    with pytest.raises(ValueError, match="feature_dim"):
        CaptionerConfig(encoder="features")
    with pytest.raises(ValueError, match="coord_channels"):
        CaptionerConfig(encoder="features", feature_dim=8, coord_channels=True)
    with pytest.raises(ValueError, match="'location' and 'sampled'"):
        logits, weights = soft_model.decode(tgt_in, encoded, return_weights=True)
        hard_attention_loss(logits, tgt_in, weights, 0.0)
    assert dataclasses.replace(tiny(), hidden_dim=8).hidden_dim == 8
