"""Losses and metrics against NumPy formulas, sacrebleu and a hand-written BLEU."""

import collections
import math

import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu

from attnx.training import metrics


@pytest.fixture(scope="module")
def token_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 6)).astype(np.float32) * 3
    targets = rng.integers(0, 6, size=(2, 4)).astype(np.int32)
    weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    return logits, targets, weights


def numpy_smoothed_ce(logits, targets, weights, ls):
    """Cross-entropy against the smoothed one-hot, minus the smoothed target's entropy."""
    vocab = logits.shape[-1]
    logits = logits.astype(np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    soft = np.full(logits.shape, ls / (vocab - 1))
    np.put_along_axis(soft, targets[..., None], 1 - ls, axis=-1)
    entropy = -np.sum(np.where(soft > 0, soft * np.log(np.where(soft > 0, soft, 1)), 0), -1)
    loss = -np.sum(soft * log_probs, -1) - entropy
    return np.sum(loss * weights), np.sum(weights)


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_label_smoothed_cross_entropy_matches_numpy(token_batch, ls):
    logits, targets, weights = token_batch
    got = metrics.cross_entropy_loss(jnp.asarray(logits), targets, weights, ls)
    want = numpy_smoothed_ce(logits, targets, weights, ls)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # bfloat16 logits are computed in float32
    loss_bf16, _ = metrics.cross_entropy_loss(jnp.asarray(logits, jnp.bfloat16), targets, None, ls)
    assert loss_bf16.dtype == jnp.float32


def test_perfect_smoothed_prediction_has_zero_loss():
    vocab, ls = 7, 0.2
    targets = np.array([[0, 3, 6]], np.int32)
    soft = np.full((1, 3, vocab), ls / (vocab - 1))
    np.put_along_axis(soft, targets[..., None], 1 - ls, axis=-1)
    loss, count = metrics.cross_entropy_loss(
        jnp.asarray(np.log(soft), jnp.float32), targets, None, ls
    )
    assert count == 3
    np.testing.assert_allclose(loss, 0.0, atol=1e-5)
    # the one-hot prediction is no longer optimal under smoothing
    one_hot_logits = jnp.asarray(20.0 * (soft > 0.5), jnp.float32)
    sharp, _ = metrics.cross_entropy_loss(one_hot_logits, targets, None, ls)
    assert sharp > 0.1


def test_token_metrics_accuracy_and_perplexity(token_batch):
    logits, targets, weights = token_batch
    sums = metrics.token_metrics(jnp.asarray(logits), targets, weights, label_smoothing=0.1)
    correct = (logits.argmax(-1) == targets) * weights
    np.testing.assert_allclose(sums["accuracy"], (correct.sum(), weights.sum()))
    np.testing.assert_allclose(
        metrics.token_accuracy(jnp.asarray(logits), targets, weights), sums["accuracy"]
    )
    np.testing.assert_allclose(
        sums["loss"], numpy_smoothed_ce(logits, targets, weights, 0.1), rtol=1e-5
    )
    nll_sum, count = numpy_smoothed_ce(logits, targets, weights, 0.0)
    np.testing.assert_allclose(sums["perplexity"], (nll_sum, count), rtol=1e-5)
    result = metrics.compute_metrics(sums)
    np.testing.assert_allclose(result["perplexity"], math.exp(nll_sum / count), rtol=1e-5)
    np.testing.assert_allclose(metrics.perplexity(nll_sum, count), math.exp(nll_sum / count))
    assert result["accuracy"] == pytest.approx(correct.sum() / weights.sum())


def test_shape_and_value_errors(token_batch):
    logits, targets, weights = token_batch
    with pytest.raises(ValueError, match="logits shape"):
        metrics.cross_entropy_loss(jnp.asarray(logits), targets[:, :3])
    with pytest.raises(ValueError, match="weights shape"):
        metrics.cross_entropy_loss(jnp.asarray(logits), targets, weights[:1])
    with pytest.raises(ValueError, match="label_smoothing"):
        metrics.cross_entropy_loss(jnp.asarray(logits), targets, weights, 1.0)


def test_metric_sums_add_and_divide():
    a = {"eval/loss": (4.0, 2.0), "eval/perplexity": (2.0, 2.0)}
    b = {"eval/loss": (2.0, 4.0), "eval/exact_match": (1.0, 3.0)}
    total = metrics.add_metric_sums(a, b)
    total = metrics.sum_across_processes(total)  # one process: unchanged
    result = metrics.compute_metrics(total)
    assert result["eval/loss"] == pytest.approx(1.0)
    assert result["eval/perplexity"] == pytest.approx(math.e)
    assert result["eval/exact_match"] == pytest.approx(1 / 3)
    assert math.isnan(metrics.compute_metrics({"x": (0.0, 0.0)})["x"])


def test_exact_match_on_ids_stops_at_eos():
    eos, pad = 2, 0
    targets = np.array([[5, 6, eos, pad], [5, 6, eos, pad], [7, eos, pad, pad], [4, 4, 4, eos]])
    predictions = np.array(
        [
            [5, 6, eos, 9, 9],  # junk after eos is ignored: match
            [5, 6, 7, eos, pad],  # extra token: no match
            [7, eos, pad, pad, pad],  # match
            [4, 4, 4, 4, 4],  # never ends: no match
        ]
    )
    matches, count = metrics.exact_match_ids(jnp.asarray(predictions), targets, eos, pad)
    assert (float(matches), float(count)) == (2.0, 4.0)
    with pytest.raises(ValueError, match="same batch"):
        metrics.exact_match_ids(predictions[:2], targets)


def test_exact_match_on_strings():
    assert metrics.exact_match_strings(["2024-01-02", "a b"], ["2024-01-02", "a  b"]) == (1, 2)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.exact_match_strings(["a", "b"], ["a"])
    # Several references per hypothesis (captions): any of them matches.
    several = [["a dog", "the dog"], ["a cat"], ["x", "y", "z"]]
    assert metrics.exact_match_strings(["the dog", "a dog", "z"], several) == (2, 3)


HYPOTHESES = [
    "The cat sat on the mat.",
    "Der schnelle braune Fuchs springt über den faulen Hund!",
    "It is 3.5 km away, isn't it?",
    "a b c d",
    "",
]
REFERENCES = [
    "The cat is sitting on the mat.",
    "Der flinke braune Fuchs sprang über den faulen Hund!",
    "It's 3.5 km away, isn't it?",
    "a b c e",
    "nothing",
]


@pytest.mark.parametrize("tokenize", ["13a", "intl", "zh", "char"])
def test_corpus_bleu_equals_sacrebleu(tokenize):
    got = metrics.corpus_bleu(HYPOTHESES, REFERENCES, tokenize=tokenize)
    want = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], tokenize=tokenize).score
    assert got == want
    assert 0 < got < 100


def test_bleu_statistics_add_over_shards():
    whole = metrics.bleu_statistics(HYPOTHESES, REFERENCES)
    parts = metrics.bleu_statistics(HYPOTHESES[:2], REFERENCES[:2]) + metrics.bleu_statistics(
        HYPOTHESES[2:], REFERENCES[2:]
    )
    np.testing.assert_array_equal(whole, parts)
    assert (
        metrics.bleu_from_statistics(parts) == sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    )
    with pytest.raises(ValueError, match="tokenize='moses'"):
        metrics.corpus_bleu(HYPOTHESES, REFERENCES, tokenize="moses")


def hand_caption_bleu(hypotheses, references_list, max_n):
    """Cumulative corpus BLEU-n (Papineni et al.; NLTK corpus_bleu without smoothing)."""
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references_list, strict=True):
        hyp_tokens = hyp.split()
        ref_tokens = [r.split() for r in refs]
        hyp_len += len(hyp_tokens)
        # closest reference length, the shorter one on ties
        ref_len += min((abs(len(r) - len(hyp_tokens)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = collections.Counter(
                tuple(hyp_tokens[i : i + n]) for i in range(len(hyp_tokens) - n + 1)
            )
            max_ref = collections.Counter()
            for r in ref_tokens:
                for gram, c in collections.Counter(
                    tuple(r[i : i + n]) for i in range(len(r) - n + 1)
                ).items():
                    max_ref[gram] = max(max_ref[gram], c)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    scores = {}
    for n in range(1, max_n + 1):
        logs = [math.log(matches[i] / totals[i]) for i in range(n)]
        scores[f"bleu{n}"] = 100 * brevity * math.exp(sum(logs) / n)
    return scores


def test_caption_bleu_matches_hand_computation_with_several_references():
    hypotheses = ["a man rides a horse on the beach", "two dogs play in the snow"]
    references_list = [
        ["a man is riding a horse on the beach", "a person rides a brown horse"],
        ["two dogs are playing in the snow", "dogs playing in snow", "two dogs in the white snow"],
    ]
    got = metrics.caption_bleu(hypotheses, references_list, max_n=4)
    want = hand_caption_bleu(hypotheses, references_list, 4)
    assert set(got) == {"bleu1", "bleu2", "bleu3", "bleu4"}
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-9)
    assert got["bleu1"] > got["bleu2"] > got["bleu3"] > got["bleu4"] > 0
    # short hypotheses pay the brevity penalty
    short = metrics.caption_bleu(["a man"], [["a man rides a horse"]], max_n=2)
    assert short["bleu1"] == pytest.approx(100 * math.exp(1 - 5 / 2))
    # digit strings without spaces score per character
    digits = metrics.caption_bleu(["3512"], [["3512"]], max_n=4, tokenize="char")
    assert digits["bleu4"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match=r"references\[0\]"):
        metrics.caption_bleu(["a"], [[]])
