"""Every attention choice in every architecture: it trains, decodes with the cache, and
runs in beam search; or it is refused by name before anything is built.

The values come from each architecture's `AttentionSupport` (what it says it
accepts), so a value added there is tested here without a new line. Each legal
(architecture, key, value) trains a tiny model for two steps with the loop's
own train step, then checks that cached decoding (`init_cache` / `decode_step`)
reproduces the teacher-forced logits of the trained parameters, and that beam
search returns finite scores and alignments. Device-bound kernels that need an
accelerator ('cudnn', and 'splash' outside its TPU shapes) are left to those
machines; the rest run on this CPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnx import decoding
from attnx.layers import attention_config as ac
from attnx.layers.normalizers import NORMALIZERS
from attnx.layers.source_cache import SourceCache
from attnx.models import (
    build_model,
    captioner_config,
    convs2s_config,
    make_loss_terms,
    make_model_config,
    rnn_config,
    transformer_config,
)
from attnx.training import steps

VOCAB = 13
ON_ACCELERATORS_ONLY = ("cudnn", "splash")

# Per architecture: its support table, and the tiny fields every choice can run with
# (the RNN's decoder is the annotations' size so that 'dot' applies; 'location' needs
# a longest source). One layer a side, where the preset has two: the stack is not what
# these cases vary, and each compiles its own train step and beam search.
ARCHITECTURES = {
    "transformer": (
        transformer_config.ATTENTION,
        dict(preset="tiny", num_encoder_layers=1, num_decoder_layers=1),
    ),
    "rnn": (
        rnn_config.ATTENTION["bahdanau"],
        dict(preset="tiny", decoder_hidden_dim=32, max_source_length=8),
    ),
    "rnn-luong": (
        rnn_config.ATTENTION["luong"],
        dict(preset="tiny", variant="luong", decoder_hidden_dim=32, max_source_length=8),
    ),
    "convs2s": (
        convs2s_config.ATTENTION,
        dict(preset="tiny", encoder_layers=((16, 3),), decoder_layers=((16, 3),)),
    ),
    "captioner": (captioner_config.ATTENTION, dict(preset="tiny")),
}


def _allowed(support: ac.AttentionSupport, key: str) -> tuple:
    """What `support` accepts for `key` (every registered normalizer when it says None)."""
    value = getattr(support, key)
    return tuple(NORMALIZERS) if key == "normalizer" and value is None else value


def _choices(support: ac.AttentionSupport) -> list[dict]:
    """The architecture's own choices ({}), then one dict per other legal value of every key."""
    defaults = ac.AttentionConfig()
    own = {"score": support.score[0], "positions": support.positions[0]}
    choices = [{}]
    for key in ("normalizer", "score", "positions", "local", "implementation", "kind"):
        for value in _allowed(support, key):
            if value in ON_ACCELERATORS_ONLY or value is None:
                continue
            if value == own.get(key, getattr(defaults, key)):
                continue  # The first case ({}) runs it.
            choice = {key: value}
            if key == "local":
                choice["window"] = 2
            if key == "score" and value == "location":
                continue  # with its max_source_length, below
            choices.append(choice)
    if "location" in support.score:
        choices.append({"score": "location"})
    if support.num_kv_heads:
        choices.append({"num_kv_heads": 1})
    if support.dropout:
        choices.append({"dropout_rate": 0.2})
    if support.gate is not None:
        choices.append({"gate": not support.gate})
    return choices


LEGAL = [
    pytest.param(
        arch,
        choice,
        id=f"{arch}-" + ("-".join(f"{k}={v}" for k, v in choice.items()) or "own"),
    )
    for arch, (support, _) in ARCHITECTURES.items()
    for choice in _choices(support)
]


def _section(arch: str, attention: dict) -> dict:
    _, fields = ARCHITECTURES[arch]
    name = arch.split("-")[0]
    return {"name": name, **fields, "attention": attention}


def _batch(arch: str) -> dict:
    rng = np.random.default_rng(0)
    targets = rng.integers(4, VOCAB, (2, 5)).astype(np.int32)
    targets[:, -1] = 2
    targets[1, 3:] = 0
    targets[1, 2] = 2
    batch = {"targets": jnp.asarray(targets)}
    if arch == "captioner":
        batch["image"] = jnp.asarray(rng.uniform(size=(2, 16, 16, 1)).astype(np.float32))
    else:
        inputs = rng.integers(4, VOCAB, (2, 6)).astype(np.int32)
        inputs[:, -1] = 2
        inputs[1, 4:] = 0
        inputs[1, 3] = 2
        batch["inputs"] = jnp.asarray(inputs)
    return batch


@pytest.mark.parametrize("arch, attention", LEGAL)
def test_every_legal_choice_trains_decodes_with_the_cache_and_beam_searches(arch, attention):
    name = arch.split("-")[0]
    config = make_model_config(
        _section(arch, attention), source_vocab_size=VOCAB, target_vocab_size=VOCAB
    )
    for key, value in attention.items():
        assert getattr(config.mechanism, key) == value
    model = build_model(name, config, rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(1e-2)
    # The loop's own loss terms (hard attention's REINFORCE and baseline).
    loss_terms = make_loss_terms(name, config, {})
    train_step = jax.jit(
        steps.make_train_step(graphdef, rest, optimizer, label_smoothing=0.0, loss_terms=loss_terms)
    )
    state = steps.TrainState.create(params, optimizer, jax.random.key(0), loss_terms)
    batch = _batch(arch)
    losses = []
    for _ in range(2):
        state, sums = train_step(state, batch)
        total, count = sums["loss"]
        losses.append(float(total / count))
    assert all(np.isfinite(losses)), losses
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, state.params)
    assert any(jax.tree.leaves(changed)), "two steps changed no parameter"

    trained = nnx.merge(graphdef, state.params, rest)
    source = batch["image"] if name == "captioner" else batch["inputs"]
    tgt_in = steps.shift_right(batch["targets"])
    teacher_forced = trained(source, tgt_in)
    trained.init_cache(trained.encode(source), tgt_in.shape[1])
    source_side = jax.tree.leaves(nnx.state(trained, SourceCache))
    cached = jnp.stack(
        [trained.decode_step(tgt_in[:, t : t + 1]) for t in range(tgt_in.shape[1])], axis=1
    )
    np.testing.assert_allclose(cached, teacher_forced, atol=2e-4, rtol=2e-4)
    # Beam search does not reorder SourceCache arrays: exact only if decoding never writes them.
    assert source_side, "the encoder's memory is not declared as SourceCache"
    for before, after in zip(
        source_side, jax.tree.leaves(nnx.state(trained, SourceCache)), strict=True
    ):
        np.testing.assert_array_equal(before, after)

    result = decoding.beam_search(
        nnx.merge(graphdef, state.params, rest),
        source,
        beam_size=2,
        max_length=6,
        return_weights=True,
    )
    assert result.sequences.shape[:2] == (2, 1)
    assert np.all(np.isfinite(np.asarray(result.scores)))
    assert np.all(np.isfinite(np.asarray(result.alignments)))


ILLEGAL = [
    pytest.param(arch, key, value, id=f"{arch}-{key}={value}")
    for arch, (support, _) in ARCHITECTURES.items()
    for key, universe in (
        ("normalizer", ac.NORMALIZERS),
        ("score", ac.SCORES),
        ("positions", ac.POSITIONS),
        ("local", ac.LOCALITY),
        ("implementation", ac.IMPLEMENTATIONS),
        ("kind", ac.KINDS),
    )
    for value in universe
    if value not in _allowed(support, key)
]


@pytest.mark.parametrize("arch, key, value", ILLEGAL)
def test_every_other_choice_is_refused_naming_the_key_and_the_choices(arch, key, value):
    attention = {key: value, **({"window": 2} if key == "local" else {})}
    support, _ = ARCHITECTURES[arch]
    with pytest.raises(ValueError) as error:
        make_model_config(
            _section(arch, attention), source_vocab_size=VOCAB, target_vocab_size=VOCAB
        )
    message = str(error.value)
    assert f"config.model.attention.{key}={value!r}" in message
    assert f"choose one of {list(_allowed(support, key))}" in message
    assert "\n" not in message


def test_keys_that_an_architecture_does_not_have_are_refused():
    for arch, attention, fragment in (
        ("rnn", {"num_kv_heads": 1}, "attention.num_kv_heads"),
        ("convs2s", {"dropout_rate": 0.1}, "attention.dropout_rate"),
        ("transformer", {"gate": False}, "attention.gate"),
        ("transformer", {"windwo": 3}, "attention.windwo is not an attention key"),
        ("transformer", {"window": 3}, "window=3 is used only with local attention"),
        ("transformer", {"normalizer": "sparsemax", "implementation": "chunked"}, "implementation"),
    ):
        with pytest.raises(ValueError, match=fragment):
            make_model_config(
                _section(arch, attention), source_vocab_size=VOCAB, target_vocab_size=VOCAB
            )


def test_the_defaults_are_the_papers():
    defaults = {
        "transformer": ("scaled_dot", "sinusoidal"),
        "rnn": ("additive", "none"),
        "rnn-luong": ("general", "none"),
        "convs2s": ("dot", "learned"),
        "captioner": ("additive", "none"),
    }
    for arch, (score, positions) in defaults.items():
        config = make_model_config(
            _section(arch, {}), source_vocab_size=VOCAB, target_vocab_size=VOCAB
        )
        mechanism = config.mechanism
        assert (mechanism.score, mechanism.positions, mechanism.normalizer) == (
            score,
            positions,
            "softmax",
        )
        assert dataclasses.replace(mechanism) == mechanism
