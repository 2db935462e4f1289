"""The train step: gradient accumulation, and the wiring of a model's loss terms (hard attention).

Gradient accumulation over micro-batches must give the gradient of the large
batch (against a plain `jax.grad`), whatever the number of real tokens in each.

For hard attention the reference is `caption_losses.hard_attention_loss` and
`update_baseline` applied by hand to a model reseeded with the step's keys: the
step must give the same gradient, the same baseline update (over real captions
only, and over every micro-batch under gradient accumulation) and fresh,
reproducible samples.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from attnx.layers.attention_config import AttentionConfig
from attnx.models.caption_loss_terms import CaptionLossTerms, HardAttention
from attnx.models.caption_losses import hard_attention_loss, sequence_log_likelihood
from attnx.models.captioner import Captioner
from attnx.models.captioner_config import tiny
from attnx.training import optimizers, steps

B, T, IMAGE = 4, 6, 16
BASELINE = -1.5


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    targets = np.zeros((B, T), np.int32)
    for n in range(B - 1):  # the last row is padding (an empty pipeline row)
        size = rng.integers(2, T - 1)
        targets[n, :size] = rng.integers(3, tiny().vocab_size, size)
        targets[n, size] = 2
    images = rng.standard_normal((B, IMAGE, IMAGE, 1)).astype(np.float32)
    return {"image": jnp.asarray(images), "targets": jnp.asarray(targets)}


def split_model(**overrides):
    model = Captioner(
        tiny(attention=AttentionConfig(kind="hard"), **overrides),
        rngs=nnx.Rngs(params=0, dropout=1),
    )
    return nnx.split(model, nnx.Param, ...)


def hard(**settings):
    return CaptionLossTerms(hard_attention=HardAttention(**settings))


def state_of(params, optimizer, baseline=BASELINE):
    return steps.TrainState.create(params, optimizer, jax.random.key(7), hard()).replace(
        step=jnp.asarray(3, jnp.int32), extra={"baseline": jnp.asarray(baseline, jnp.float32)}
    )


def direct(graphdef, params, rest, batch, rng, baseline):
    """hard_attention_loss and log p(y | s, a) of a model reseeded with the step's keys."""
    model = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(model, **steps.step_keys(rng))
    logits, weights = model(
        batch["image"], steps.shift_right(batch["targets"]), train=True, return_weights=True
    )
    loss, parts = hard_attention_loss(logits, batch["targets"], weights, baseline)
    token_weights = (batch["targets"] > 0).astype(jnp.float32)
    return loss, sequence_log_likelihood(logits, batch["targets"], token_weights), weights, parts


def step_rng(state):
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def test_loss_gradient_is_hard_attention_loss(batch):
    graphdef, params, rest = split_model()
    loss_fn = steps.make_loss_fn(
        graphdef,
        rest,
        label_smoothing=0.0,
        loss_terms=hard(),
        extra={"baseline": jnp.asarray(BASELINE, jnp.float32)},
    )
    rng = jax.random.key(11)

    def stepped(p):
        loss_sum, (count, _) = loss_fn(p, batch, rng)
        return loss_sum / count

    def reference(p):
        return direct(graphdef, p, rest, batch, rng, BASELINE)[0]

    np.testing.assert_allclose(stepped(params), reference(params), rtol=1e-6)
    got, want = jax.grad(stepped)(params), jax.grad(reference)(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    # The REINFORCE term is live: some caption was sampled and moves the loss.
    _, _, weights, parts = direct(graphdef, params, rest, batch, rng, BASELINE)
    assert np.any(np.asarray(weights["sampled"])) and abs(float(parts["reinforce"])) > 0


def test_baseline_is_the_moving_average_over_real_captions(batch):
    graphdef, params, rest = split_model()
    optimizer = optax.sgd(0.1)
    state = state_of(params, optimizer)
    train_step = jax.jit(
        steps.make_train_step(graphdef, rest, optimizer, label_smoothing=0.0, loss_terms=hard())
    )
    new_state, sums = train_step(state, batch)
    _, log_likelihood, _, _ = direct(graphdef, params, rest, batch, step_rng(state), BASELINE)
    # The padding row (log-likelihood 0) does not pull the mean towards 0.
    want = 0.9 * BASELINE + 0.1 * np.mean(np.asarray(log_likelihood)[: B - 1])
    np.testing.assert_allclose(new_state.extra["baseline"], want, rtol=1e-5)
    assert int(new_state.step) == 4
    for name in ("reinforce", "entropy", "loss"):
        total, count = sums[name]
        assert np.isfinite(float(total)) and float(count) > 0, name
    assert "log_likelihood" not in sums


def test_baseline_under_gradient_accumulation_averages_every_micro_batch(batch):
    graphdef, params, rest = split_model()
    optimizer = optax.sgd(0.1)
    state = state_of(params, optimizer)
    train_step = jax.jit(
        steps.make_train_step(
            graphdef,
            rest,
            optimizer,
            label_smoothing=0.0,
            grad_accum_steps=2,
            loss_terms=hard(),
        )
    )
    new_state, _ = train_step(state, batch)
    micro_batches = steps.split_micro_batches(batch, 2)
    real = []
    for i in range(2):
        micro = jax.tree.map(lambda x, i=i: x[i], micro_batches)
        rng = jax.random.fold_in(step_rng(state), i)
        _, log_likelihood, _, _ = direct(graphdef, params, rest, micro, rng, BASELINE)
        has_tokens = np.asarray(jnp.any(micro["targets"] > 0, axis=-1))
        real.extend(np.asarray(log_likelihood)[has_tokens])
    assert len(real) == B - 1
    np.testing.assert_allclose(
        new_state.extra["baseline"], 0.9 * BASELINE + 0.1 * np.mean(real), rtol=1e-5
    )


def test_accumulation_equals_one_pass_when_nothing_is_sampled(batch):
    # With the expectation everywhere (no samples) and no dropout the step is
    # deterministic, so two micro-batches must give the one-pass update.
    graphdef, params, rest = split_model(hard_expectation_prob=1.0)
    optimizer = optax.sgd(0.5)
    results = []
    for accum in (1, 2):
        train_step = jax.jit(
            steps.make_train_step(
                graphdef,
                rest,
                optimizer,
                label_smoothing=0.1,
                grad_accum_steps=accum,
                loss_terms=hard(entropy_weight=0.05),
            )
        )
        results.append(train_step(state_of(params, optimizer), batch))
    (one, sums_one), (two, sums_two) = results
    np.testing.assert_allclose(one.extra["baseline"], two.extra["baseline"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name in ("loss", "entropy"):
        np.testing.assert_allclose(
            float(sums_one[name][0]) / float(sums_one[name][1]),
            float(sums_two[name][0]) / float(sums_two[name][1]),
            rtol=1e-5,
        )


def test_samples_are_fresh_every_step_reproducible_and_apart_from_dropout(batch):
    graphdef, params, rest = split_model(dropout_rate=0.5)

    def locations(rng):
        return np.asarray(direct(graphdef, params, rest, batch, rng, 0.0)[2]["location"])

    key = jax.random.key(5)
    np.testing.assert_array_equal(locations(key), locations(key))
    assert not np.array_equal(locations(key), locations(jax.random.fold_in(key, 1)))
    # The location stream is its own: reseeding dropout alone leaves the samples.
    model = nnx.merge(graphdef, params, rest, copy=True)
    tags = {
        stream.key.tag for _, stream in nnx.iter_graph(model) if isinstance(stream, nnx.RngStream)
    }
    assert "location" in tags
    keys = steps.step_keys(key)
    assert not np.array_equal(
        jax.random.key_data(keys["dropout"]), jax.random.key_data(keys["location"])
    )


def test_hard_attention_lowers_the_nll_through_the_step(batch):
    graphdef, params, rest = split_model()
    optimizer = optax.adam(1e-2)
    state = state_of(params, optimizer, baseline=0.0)
    train_step = jax.jit(
        steps.make_train_step(graphdef, rest, optimizer, label_smoothing=0.0, loss_terms=hard())
    )
    nll = []
    for _ in range(60):
        state, sums = train_step(state, batch)
        nll.append(float(sums["perplexity"][0]) / float(sums["perplexity"][1]))
    assert np.mean(nll[-5:]) < 0.5 * nll[0], nll
    # The baseline tracks log p(y | s, a): it has moved from 0 towards a negative value.
    assert float(state.extra["baseline"]) < 0


# --------------------------------------------------------------------------- accumulation


def token_loss(params, batch, rng):
    """Summed softmax-regression NLL over weighted tokens; aux counts correct tokens."""
    del rng
    logits = jnp.einsum("btd,dv->btv", batch["x"], params["w"]) + params["b"]
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, batch["y"][..., None], axis=-1)[..., 0]
    weights = batch["weights"]
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["y"]) * weights)
    return jnp.sum(nll * weights), (jnp.sum(weights), {"correct": correct})


@pytest.fixture(scope="module")
def accumulation_problem():
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(8, 5, 3)).astype(np.float32),
        "y": rng.integers(0, 4, size=(8, 5)).astype(np.int32),
        # very different numbers of real tokens per row: a mean of micro-batch
        # means would differ from the batch mean.
        "weights": (np.arange(5)[None, :] < np.array([5, 1, 3, 0, 5, 2, 4, 1])[:, None]).astype(
            np.float32
        ),
    }
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    }
    return params, batch


def test_split_micro_batches_is_strided_and_checks_sizes():
    batch = {"x": np.arange(12).reshape(6, 2)}
    split = steps.split_micro_batches(batch, 3)
    np.testing.assert_array_equal(split["x"][1], batch["x"][1::3])
    with pytest.raises(ValueError, match="grad_accum_steps=4"):
        steps.split_micro_batches(batch, 4)
    with pytest.raises(ValueError, match="leading"):
        steps.split_micro_batches({"a": np.zeros(2), "b": np.zeros(3)}, 1)


def test_accumulated_gradients_equal_the_large_batch(accumulation_problem):
    params, batch = accumulation_problem
    train_config = {"optimizer": "adam", "schedule": "constant", "learning_rate": 0.01}
    tx, _ = optimizers.make_optimizer(
        ml_collections.ConfigDict({**train_config, "steps": 100, "clip_grad_norm": 0.5})
    )

    @jax.jit
    def step(params, batch):
        results = {}
        for k in (1, 4):
            (loss, weight, aux), grads = steps.accumulate_gradients(token_loss, params, batch, k)
            updates, _ = tx.update(grads, tx.init(params), params)
            results[k] = (loss / weight, aux["correct"], grads, updates)
        return results

    results = step(params, batch)
    # an independent reference: the plain gradient of the token-mean loss.
    weights = batch["weights"].sum()
    reference = jax.grad(lambda p: token_loss(p, batch, None)[0] / weights)(params)
    for k in (1, 4):
        loss, correct, grads, updates = results[k]
        np.testing.assert_allclose(loss, results[1][0], atol=1e-6)
        assert correct == results[1][1]
        for name in params:
            np.testing.assert_allclose(grads[name], reference[name], atol=1e-6)
            np.testing.assert_allclose(updates[name], results[1][3][name], atol=1e-6)
