"""Tests for attnx.decoding against independent references.

The reference for every search is the model's own teacher-forced `decode`:
exhaustive enumeration of every hypothesis for beam search, a step-by-step
argmax loop for greedy search, and re-running `decode(return_weights=True)`
on returned hypotheses for the alignments. The models are tiny NNX decoders
defined here that follow the attnx seq2seq interface exactly.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx import decoding
from attnx.layers.multi_head import MultiHeadAttention

PAD, BOS, EOS = 0, 1, 2


class TinySeq2Seq(nnx.Module):
    """Embedding + causal self-attention (decode cache) + cross-attention + output projection.

    encode: src [b, s] -> {'memory': [b, s, d], 'mask': [b, s]}.
    alignment: the cross-attention weights averaged over heads, [b, t, s].
    """

    def __init__(self, vocab: int = 5, dim: int = 16, max_positions: int = 16, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.positions = nnx.Embed(max_positions, dim, rngs=rngs)
        self.self_attention = MultiHeadAttention(2, dim, rngs=rngs)
        self.cross_attention = MultiHeadAttention(2, dim, rngs=rngs)
        self.out = nnx.Linear(dim, vocab, rngs=rngs)
        # Peaked, history-dependent, and not ending at once: so that the choice of beams matters.
        self.out.kernel[...] = 3.0 * self.out.kernel[...]
        self.out.bias[...] = self.out.bias[...].at[EOS].add(-1.5)
        self.self_attention.out_kernel[...] = 3.0 * self.self_attention.out_kernel[...]
        self.step = self.cross_key = self.cross_value = self.memory_mask = nnx.data(None)

    def encode(self, src, *, train=False):
        return {"memory": jnp.tanh(self.embed(src)), "mask": src != PAD}

    def _finish(self, x, projected_kv, mask, return_weights):
        context, weights = self.cross_attention(
            x, projected_kv=projected_kv, mask=mask[:, None, None, :], return_weights=True
        )
        logits = self.out(jnp.tanh(x + context))
        if return_weights:
            return logits, {"cross_attention": weights, "alignment": weights.mean(axis=1)}
        return logits

    def decode(self, tgt_in, encoded, *, train=False, return_weights=False):
        x = self.embed(tgt_in) + self.positions(jnp.arange(tgt_in.shape[1]))
        x = x + self.self_attention(x, is_causal=True)
        kv = self.cross_attention.project_key_value(encoded["memory"])
        return self._finish(x, kv, encoded["mask"], return_weights)

    def __call__(self, src, tgt_in, *, train=False):
        return self.decode(tgt_in, self.encode(src))

    def init_cache(self, encoded, max_length):
        self.self_attention.init_cache(encoded["memory"].shape[0], max_length)
        key, value = self.cross_attention.project_key_value(encoded["memory"])
        self.cross_key, self.cross_value = nnx.Cache(key), nnx.Cache(value)
        self.memory_mask = nnx.Cache(encoded["mask"])
        self.step = nnx.Cache(jnp.array(0, jnp.int32))  # a 0-d counter: never reordered

    def decode_step(self, tokens, *, return_weights=False):
        x = self.embed(tokens) + self.positions(self.step[...])
        x = x + self.self_attention(x, decode=True)
        self.step[...] = self.step[...] + 1
        kv = (self.cross_key[...], self.cross_value[...])
        out = self._finish(x, kv, self.memory_mask[...], return_weights)
        if return_weights:
            return out[0][:, 0], out[1]
        return out[:, 0]


class FixedDistribution(nnx.Module):
    """Every step draws from the same known distribution; the alignment is uniform over the source."""

    def __init__(self, probs):
        self.logits = nnx.Param(jnp.log(jnp.asarray(probs, jnp.float32)))
        self.mask = nnx.data(None)

    def encode(self, src, *, train=False):
        return {"mask": src != PAD}

    def decode(self, tgt_in, encoded, *, train=False, return_weights=False):
        return jnp.broadcast_to(self.logits[...], tgt_in.shape + self.logits.shape)

    def init_cache(self, encoded, max_length):
        self.mask = nnx.Cache(encoded["mask"])

    def decode_step(self, tokens, *, return_weights=False):
        logits = jnp.broadcast_to(self.logits[...], (tokens.shape[0], self.logits.shape[0]))
        if return_weights:
            mask = self.mask[...].astype(jnp.float32)
            return logits, {"alignment": (mask / mask.sum(-1, keepdims=True))[:, None]}
        return logits


SRC = jnp.array([[3, 4, 3, 0], [4, 4, 3, 1]], jnp.int32)


@pytest.fixture(scope="module")
def model():
    return TinySeq2Seq(rngs=nnx.Rngs(0))


def _with_eos_bias(model, bias):
    """A copy of `model` whose eos logit is shifted by `bias`."""
    other = nnx.clone(model)
    other.out.bias[...] = other.out.bias[...].at[EOS].add(bias)
    return other


# -- independent references ---------------------------------------------------


@nnx.jit
def _teacher_forced(model, src, tgt_in):
    """model.decode over `tgt_in` -> (log-probs [b, t, V] float32, the weights dict)."""
    logits, weights = model.decode(tgt_in, model.encode(src), return_weights=True)
    return jax.nn.log_softmax(logits.astype(jnp.float32)), weights


def _teacher_forced_log_probs(model, src_row, seqs):
    """Per-token log-probs [n, L] of each candidate (padded with 0) for one source row."""
    seqs = np.asarray(seqs)
    src = jnp.repeat(jnp.asarray(src_row)[None], len(seqs), axis=0)
    tgt_in = np.concatenate([np.full((len(seqs), 1), BOS), seqs[:, :-1]], axis=1)
    log_probs, _ = _teacher_forced(model, src, jnp.asarray(tgt_in, jnp.int32))
    log_probs = np.asarray(log_probs, np.float64)
    return np.take_along_axis(log_probs, seqs[:, :, None], axis=-1)[..., 0]


def _score_returned(model, src, sequences, lengths):
    """Teacher-forced log-prob sums [n] and alignments [n, L, s] (zero after each length) of
    whole output buffers `sequences` [n, L]: one fixed-shape decode call."""
    sequences = np.asarray(sequences)
    tgt_in = np.concatenate([np.full((len(sequences), 1), BOS), sequences[:, :-1]], axis=1)
    log_probs, weights = _teacher_forced(model, src, jnp.asarray(tgt_in, jnp.int32))
    token_lp = np.take_along_axis(np.asarray(log_probs, np.float64), sequences[..., None], -1)
    valid = np.arange(sequences.shape[1]) < np.asarray(lengths)[:, None]
    alignment = np.where(valid[..., None], np.asarray(weights["alignment"]), 0.0)
    return np.where(valid, token_lp[..., 0], 0.0).sum(-1), alignment


def _all_hypotheses(vocab, max_length, min_length=0):
    """Every sequence ending in eos within max_length (not before min_length tokens), or
    unfinished at max_length, over the tokens search may emit (all but pad)."""
    words = [v for v in range(vocab) if v not in (PAD, EOS)]
    hypotheses = []
    for n in range(max_length + 1):
        for body in itertools.product(words, repeat=n):
            if n < max_length and n >= min_length:
                hypotheses.append(list(body) + [EOS])
            if n == max_length:
                hypotheses.append(list(body))
    lengths = np.array([len(h) for h in hypotheses])
    seqs = np.array([h + [PAD] * (max_length - len(h)) for h in hypotheses])
    return seqs, lengths


def _penalty(lengths, kind, alpha):
    lengths = np.asarray(lengths, np.float64)
    return ((5.0 + lengths) / 6.0) ** alpha if kind == "gnmt" else lengths**alpha


def _exhaustive_best(model, src, max_length, kind, alpha, min_length=0):
    seqs, lengths = _all_hypotheses(5, max_length, min_length)
    best = []
    for row in np.asarray(src):
        token_lp = _teacher_forced_log_probs(model, row, seqs)
        total = np.where(np.arange(max_length) < lengths[:, None], token_lp, 0.0).sum(-1)
        scores = total / _penalty(lengths, kind, alpha)
        i = int(np.argmax(scores))
        best.append((seqs[i], scores[i], total[i], lengths[i], len(seqs)))
    return best


# -- beam search --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gnmt", "power"])
def test_beam_search_matches_exhaustive_enumeration(model, kind):
    num_hypotheses = len(_all_hypotheses(5, 4)[0])
    for alpha in (0.0, 0.6, 1.0):
        result = decoding.beam_search(
            model, SRC, beam_size=num_hypotheses, length_penalty=kind, alpha=alpha, max_length=4
        )
        for i, (seq, score, total, length, _) in enumerate(
            _exhaustive_best(model, SRC, 4, kind, alpha)
        ):
            np.testing.assert_array_equal(result.sequences[i, 0], seq)
            np.testing.assert_allclose(result.scores[i, 0], score, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(result.log_probs[i, 0], total, rtol=1e-5, atol=1e-5)
            assert result.lengths[i, 0] == length
            assert bool(result.finished[i, 0]) == (seq[length - 1] == EOS)


def test_beam_search_with_min_length_matches_exhaustive(model):
    eager = _with_eos_bias(model, 4.0)  # eos is the favourite: min_length has to hold it back
    num_hypotheses = len(_all_hypotheses(5, 4)[0])  # more than with min_length; one compile
    result = decoding.beam_search(
        eager, SRC, beam_size=num_hypotheses, alpha=0.6, max_length=4, min_length=2
    )
    for i, (seq, score, *_) in enumerate(_exhaustive_best(eager, SRC, 4, "gnmt", 0.6, 2)):
        np.testing.assert_array_equal(result.sequences[i, 0], seq)
        np.testing.assert_allclose(result.scores[i, 0], score, rtol=1e-5, atol=1e-5)
    assert np.all(result.lengths >= 3)
    unconstrained = decoding.beam_search(eager, SRC, beam_size=4, alpha=0.6, max_length=4)
    assert np.any(unconstrained.lengths < 3)  # the constraint did change something


def test_beam_search_returns_best_unfinished_when_nothing_ends(model):
    never = _with_eos_bias(model, -1e4)  # eos is never worth it: nothing ends in 4 tokens
    num_hypotheses = len(_all_hypotheses(5, 4)[0])
    result = decoding.beam_search(never, SRC, beam_size=num_hypotheses, alpha=0.6, max_length=4)
    assert not np.any(result.finished) and np.all(result.lengths == 4)
    for i, (seq, score, *_) in enumerate(_exhaustive_best(never, SRC, 4, "gnmt", 0.6)):
        np.testing.assert_array_equal(result.sequences[i, 0], seq)
        np.testing.assert_allclose(result.scores[i, 0], score, rtol=1e-5, atol=1e-5)


def test_max_length_from_source_length_per_example(model):
    never = _with_eos_bias(model, -1e4)
    src = jnp.array([[3, 4, 0, 0, 0], [3, 4, 3, 4, 3]], jnp.int32)  # lengths 2 and 5
    expected = np.array([int(1.5 * 2 + 1), int(1.5 * 5 + 1)])  # [4, 8]
    for result in (
        decoding.beam_search(never, src, beam_size=3, max_length_a=1.5, max_length_b=1),
        decoding.greedy_search(never, src, max_length_a=1.5, max_length_b=1),
    ):
        lengths = np.asarray(result.lengths).reshape(2, -1)[:, 0]
        seqs = np.asarray(result.sequences).reshape(2, -1, result.sequences.shape[-1])[:, 0]
        np.testing.assert_array_equal(lengths, expected)
        assert seqs.shape[-1] == 8  # the buffer: floor(1.5 * 5 + 1)
        for row, n in zip(seqs, expected, strict=True):
            assert np.all(row[:n] != PAD) and np.all(row[n:] == PAD)


def test_beam_alignments_follow_their_hypotheses(model):
    result = decoding.beam_search(
        model, SRC, beam_size=4, alpha=0.6, max_length=6, return_weights=True, num_return=3
    )
    assert result.alignments.shape == (2, 3, 6, SRC.shape[1])
    lengths = np.asarray(result.lengths).reshape(-1)
    total, alignment = _score_returned(
        model, jnp.repeat(SRC, 3, axis=0), result.sequences.reshape(6, 6), lengths
    )
    np.testing.assert_allclose(result.alignments.reshape(alignment.shape), alignment, atol=1e-5)
    # The returned scores are the teacher-forced ones too.
    np.testing.assert_allclose(result.log_probs.reshape(-1), total, atol=1e-5)
    scores = total / _penalty(lengths, "gnmt", 0.6)
    np.testing.assert_allclose(result.scores.reshape(-1), scores, atol=1e-5)
    assert np.all(np.diff(np.asarray(result.scores), axis=1) <= 0)  # best first


def test_search_does_not_recompile_for_new_parameters(model):
    other = TinySeq2Seq(rngs=nnx.Rngs(1))
    decoding.greedy_search(model, SRC, max_length=5)
    before = decoding._sequential_search._cache_size()
    decoding.greedy_search(other, SRC, max_length=5)
    assert decoding._sequential_search._cache_size() == before


# -- greedy search ------------------------------------------------------------


def _argmax_loop(model, src, max_length, min_length=0):
    """Greedy search written with teacher-forced decode over the growing prefix."""
    batch = src.shape[0]
    seqs = np.zeros((batch, max_length), np.int64)
    total = np.zeros(batch)
    done = np.zeros(batch, bool)
    for t in range(max_length):
        # The decoder is causal: the zeros after the prefix do not change position t.
        tgt_in = np.concatenate([np.full((batch, 1), BOS), seqs[:, :-1]], axis=1)
        log_probs, _ = _teacher_forced(model, src, jnp.asarray(tgt_in, jnp.int32))
        log_probs = np.array(log_probs[:, t], np.float64)
        log_probs[:, PAD] = -np.inf
        if t < min_length:
            log_probs[:, EOS] = -np.inf
        token = log_probs.argmax(-1)
        seqs[:, t] = np.where(done, PAD, token)
        total += np.where(done, 0.0, log_probs[np.arange(batch), token])
        done |= token == EOS
    return seqs, total


def test_greedy_equals_argmax_loop_and_beam_of_one(model):
    greedy = decoding.greedy_search(model, SRC, max_length=6)
    seqs, total = _argmax_loop(model, SRC, 6)
    np.testing.assert_array_equal(greedy.sequences, seqs)
    np.testing.assert_allclose(greedy.log_probs, total, atol=1e-5)
    beam = decoding.beam_search(model, SRC, beam_size=1, alpha=0.0, max_length=6)
    np.testing.assert_array_equal(beam.sequences[:, 0], greedy.sequences)
    np.testing.assert_allclose(beam.scores[:, 0], greedy.scores, atol=1e-5)
    np.testing.assert_array_equal(beam.lengths[:, 0], greedy.lengths)


def test_greedy_min_length_and_alignments(model):
    eager = _with_eos_bias(model, 4.0)
    plain = decoding.greedy_search(eager, SRC, max_length=6)
    assert np.all(plain.lengths == 1)
    result = decoding.greedy_search(eager, SRC, max_length=6, min_length=3, return_weights=True)
    seqs, total = _argmax_loop(eager, SRC, 6, min_length=3)
    np.testing.assert_array_equal(result.sequences, seqs)
    np.testing.assert_allclose(result.log_probs, total, atol=1e-5)
    assert np.all(result.lengths == 4) and np.all(result.finished)
    _, alignment = _score_returned(eager, SRC, result.sequences, result.lengths)
    np.testing.assert_allclose(result.alignments, alignment, atol=1e-5)


# -- sampling -----------------------------------------------------------------


def test_sampling_limits_equal_greedy(model):
    greedy = decoding.greedy_search(model, SRC, max_length=6)
    rng = jax.random.key(3)
    for kwargs in ({"temperature": 1e-5}, {"temperature": 0.0}, {"top_k": 1}):
        result = decoding.sample(model, SRC, rng, max_length=6, **kwargs)
        np.testing.assert_array_equal(result.sequences, greedy.sequences, err_msg=str(kwargs))
        np.testing.assert_allclose(result.log_probs, greedy.log_probs, atol=1e-5)


def test_sampling_is_reproducible_and_scored(model):
    # Same shapes as in test_sampling_limits_equal_greedy: no new compilation.
    first = decoding.sample(model, SRC, jax.random.key(7), max_length=6)
    again = decoding.sample(model, SRC, jax.random.key(7), max_length=6)
    other = decoding.sample(model, SRC, jax.random.key(8), max_length=6)
    np.testing.assert_array_equal(first.sequences, again.sequences)
    assert not np.array_equal(first.sequences, other.sequences)
    total, _ = _score_returned(model, SRC, first.sequences, first.lengths)
    np.testing.assert_allclose(first.log_probs, total, atol=1e-5)


# Known distribution over 8 tokens; pad (0) is never generated, so the rest renormalise.
PROBS = np.array([0.001, 0.02, 0.1, 0.4, 0.2, 0.15, 0.08, 0.049])


@pytest.mark.parametrize(
    "kwargs, allowed",
    [({"top_k": 2}, [3, 4]), ({"top_p": 0.65}, [3, 4, 5]), ({"top_k": 3, "top_p": 0.6}, [3, 4])],
)
def test_top_k_top_p_emit_only_the_allowed_tokens(kwargs, allowed):
    fixed = FixedDistribution(PROBS)
    src = jnp.ones((256, 3), jnp.int32)
    result = decoding.sample(fixed, src, jax.random.key(0), max_length=4, **kwargs)
    tokens = np.asarray(result.sequences).ravel()
    assert set(np.unique(tokens)) == set(allowed)  # all allowed ones appear, nothing else
    expected = PROBS[allowed] / PROBS[allowed].sum()
    frequencies = np.array([(tokens == a).mean() for a in allowed])
    np.testing.assert_allclose(frequencies, expected, atol=0.05)


def test_sampling_min_length_and_uniform_alignment():
    fixed = FixedDistribution(PROBS)
    src = jnp.array([[3, 3, 0]] * 64, jnp.int32)
    result = decoding.sample(
        fixed, src, jax.random.key(1), max_length=6, min_length=2, return_weights=True
    )
    lengths = np.asarray(result.lengths)
    eos_at = [list(row).index(EOS) if EOS in row else 6 for row in np.asarray(result.sequences)]
    assert min(eos_at) >= 2 and np.any(np.asarray(eos_at) < 6)
    np.testing.assert_array_equal(lengths, np.minimum(np.asarray(eos_at) + 1, 6))
    first = np.asarray(result.alignments[:, 0])
    np.testing.assert_allclose(first, np.tile([0.5, 0.5, 0.0], (64, 1)), atol=1e-6)


# -- bad input ----------------------------------------------------------------


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="max_length"):
        decoding.greedy_search(model, SRC)
    with pytest.raises(ValueError, match="length_penalty"):
        decoding.beam_search(model, SRC, beam_size=2, length_penalty="wu", max_length=3)
    with pytest.raises(ValueError, match="num_return"):
        decoding.beam_search(model, SRC, beam_size=2, num_return=3, max_length=3)
    with pytest.raises(ValueError, match="alpha"):
        decoding.beam_search(model, SRC, beam_size=2, alpha=-1.0, max_length=3)
    with pytest.raises(ValueError, match="top_p"):
        decoding.sample(model, SRC, jax.random.key(0), top_p=0.0, max_length=3)
    with pytest.raises(ValueError, match="token sources"):
        decoding.greedy_search(model, jnp.zeros((2, 4, 4, 1)), max_length_a=1.0, max_length_b=2)
    with pytest.raises(TypeError, match="encode"):
        decoding.greedy_search(object(), SRC, max_length=3)


# -- a real model --------------------------------------------------------------


def test_beam_search_over_a_tiny_transformer():
    from attnx.models.transformer import Transformer, tiny

    transformer = Transformer(tiny(vocab_size=5), rngs=nnx.Rngs(2))
    beam = len(_all_hypotheses(5, 4)[0])
    result = decoding.beam_search(
        transformer, SRC, beam_size=beam, alpha=0.6, max_length=4, return_weights=True
    )
    for i, (seq, score, *_) in enumerate(_exhaustive_best(transformer, SRC, 4, "gnmt", 0.6)):
        np.testing.assert_array_equal(result.sequences[i, 0], seq)
        np.testing.assert_allclose(result.scores[i, 0], score, rtol=1e-5, atol=1e-5)
    _, alignment = _score_returned(transformer, SRC, result.sequences[:, 0], result.lengths[:, 0])
    np.testing.assert_allclose(result.alignments[:, 0], alignment, atol=1e-5)
