"""The benchmark peers compute what they claim (no timing).

Each PyTorch peer and the plain-Flax Transformer train at a tiny size and
lower the loss on one fixed batch; at cpu-small their parameter counts match
attnx's where the architectures match (within 0.1%: PyTorch's LSTMs carry two
bias vectors where attnx has one, and the captioner's deep output one more
bias; the Transformer and ConvS2S agree exactly); and the decode benchmark's
uncached baseline finds the cached beam search's hypotheses.

The PyTorch tests skip without torch, which only the 'bench' extra installs
(CI installs '.[test]' and skips them: the CPU wheel is several hundred MB).
"""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from attnx.models import build_model, make_model_config, spec_of  # noqa: E402
from benchmarks.peers import settings  # noqa: E402

TINY = {
    "transformer": dict(
        vocab=32, d_model=16, heads=2, d_ff=32, layers=1, dropout=0.0, src_len=8, tgt_len=8,
        batch=4,
    ),
    "rnn": dict(vocab=32, embed=16, hidden=16, attention=16, maxout=8, src_len=8, tgt_len=8,
                batch=4),
    "convs2s": dict(
        vocab=32, embed=16, channels=16, kernel=3, encoder_layers=2, decoder_layers=2,
        dropout=0.0, src_len=8, tgt_len=8, batch=4,
    ),
    "spatial": dict(
        vocab=16, image=16, conv=(4, 8), hidden=16, embed=8, attention=16, penalty=1.0,
        tgt_len=5, batch=4,
    ),
}  # fmt: skip


def attnx_params(name: str) -> int:
    """attnx's parameter count at the cpu-small setting of `benchmarks/train_step.py` (shapes only)."""
    from benchmarks.train_step import SETTINGS

    setting = SETTINGS[name]
    captions = spec_of(setting["model"]["name"]).source_kind == "image"
    config = make_model_config(
        setting["model"],
        source_vocab_size=None if captions else setting["vocab"],
        target_vocab_size=setting["vocab"],
    )
    model = nnx.eval_shape(lambda: build_model(setting["model"]["name"], config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", settings.MODELS)
def test_torch_peer_trains(name):
    pytest.importorskip("torch", reason="PyTorch peers need the 'bench' extra")
    from benchmarks.peers import torch_step

    batch = settings.make_batch(name, seed=0, setting=TINY[name])
    step, _ = torch_step.make_step(name, TINY[name], batch, "eager", seed=0)
    losses = [step() for _ in range(25)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize(
    "name, tolerance", [("transformer", 0), ("rnn", 0.001), ("convs2s", 0), ("spatial", 0.002)]
)
def test_torch_peer_params_match_attnx(name, tolerance):
    pytest.importorskip("torch", reason="PyTorch peers need the 'bench' extra")
    from benchmarks.peers import torch_models

    net = torch_models.ARCHITECTURES[name](**settings.SETTINGS[name])
    mine = attnx_params(name)
    assert abs(torch_models.count_params(net) - mine) <= tolerance * mine


def test_flax_transformer_trains_and_matches_attnx():
    from benchmarks.peers import flax_transformer

    tiny = TINY["transformer"]
    batch = settings.make_batch("transformer", seed=0, setting=tiny)
    step, _ = flax_transformer.make_step(tiny, batch)
    losses = [step() for _ in range(25)]
    assert losses[-1] < losses[0] - 0.1, losses

    full = settings.SETTINGS["transformer"]
    model = flax_transformer.define_transformer()(full)
    tokens = jax.ShapeDtypeStruct((2, 8), np.int32)
    shapes = jax.eval_shape(
        lambda src, tgt: model.init(jax.random.key(0), src, tgt, train=False), tokens, tokens
    )
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == attnx_params("transformer")


def test_uncached_baseline_finds_the_cached_beams():
    from attnx import decoding
    from benchmarks import decode

    config = make_model_config(
        {"name": "transformer", "preset": "tiny"}, source_vocab_size=11, target_vocab_size=11
    )
    model = build_model("transformer", config, rngs=nnx.Rngs(3))
    src = jax.numpy.asarray([[5, 6, 7, 2, 0], [8, 4, 2, 0, 0]], jax.numpy.int32)
    cached = decoding.beam_search(model, src, beam_size=2, max_length=6, min_length=6)
    search = decode.make_uncached_beam_search(model, batch=2, beam_size=2, length=6, bucket=4)
    tokens, log_probs, padding = search(src)
    # beam_search returns its best hypothesis (num_return=1); the baseline's come best first.
    np.testing.assert_array_equal(tokens[:, :1], np.asarray(cached.sequences))
    np.testing.assert_allclose(log_probs[:, :1], np.asarray(cached.log_probs), rtol=1e-4, atol=1e-4)
    assert padding == pytest.approx((4 * 4 + 6 * 2) / 21)  # widths 4,4,4,4,6,6 over 1..6
