"""Losses and evaluation metrics.

Every additive metric is kept as a `(sum, count)` pair so that batches,
devices and processes can be summed before one division at the end:

  loss        (label-smoothed cross-entropy sum, token weight)
  accuracy    (correct tokens, token weight)
  perplexity  (un-smoothed NLL sum, token weight), reported as exp(sum / count)
  exact_match (matching sequences, sequences)

`add_metric_sums` adds such dicts, `sum_across_processes` adds them over
`jax.distributed` processes, and `compute_metrics` divides.

BLEU is not a mean of per-sentence values; its additive statistics are the
n-gram matches and totals and the hypothesis and reference lengths
(`bleu_statistics`, an int vector that can be summed the same way). The score
comes from sacrebleu on detokenised strings: `corpus_bleu` equals
`sacrebleu.corpus_bleu(hypotheses, [references]).score` (13a tokenizer and
exponential smoothing by default), and `caption_bleu` gives the cumulative
BLEU-1..4 of the captioning papers (uniform weights up to n, brevity penalty
against the closest reference length, several references per image, no
smoothing). Both are on sacrebleu's 0-100 scale.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from sacrebleu.metrics.bleu import BLEU

from attnx.data.tokenizers import EOS_ID, PAD_ID
from attnx.training.log_probs import token_log_probs

MetricSums = dict[str, tuple[Any, Any]]

BLEU_TOKENIZERS = ("13a", "intl", "zh", "char", "none")


# --------------------------------------------------------------------------- token losses


def _check_token_shapes(logits: jax.Array, targets: jax.Array, weights: jax.Array | None) -> None:
    if logits.ndim < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits shape {logits.shape} must be targets shape {targets.shape} + [vocab]."
        )
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(f"weights shape {weights.shape} != targets shape {targets.shape}.")


def _token_losses(
    logits: jax.Array, targets: jax.Array, label_smoothing: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (label-smoothed cross-entropy, plain NLL, target is the argmax).

    The first two are float32 [...], the last bool [...].

    Smoothed targets put 1 - ls on the true token and ls / (V - 1) on every
    other (Szegedy et al. 2016, as in Vaswani et al. sec. 5.4). The entropy of
    that target distribution is subtracted, so a prediction equal to it has
    loss 0 (the Flax WMT example's normalising constant). Written without a
    one-hot [..., V] array:
      -sum_v q_v log p_v = -(conf - low) log p_t - low * sum_v log p_v.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1).")
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"logits have vocabulary size {vocab}; need at least 2.")
    # Both terms, the argmax and the gradient in one pass over the logits (log_probs.py).
    target_log_prob, total_log_prob, correct = token_log_probs(logits, targets)
    nll = -target_log_prob
    if label_smoothing == 0.0:
        return nll, nll, correct
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    smoothed = -(confidence - low) * target_log_prob - low * total_log_prob
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low))
    return smoothed - entropy, nll, correct


def cross_entropy_loss(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Weighted, optionally label-smoothed cross-entropy.

    Args:
      logits: [..., V] (any float dtype; computed in float32).
      targets: [...] int ids.
      weights: [...] (1 for real tokens, 0 for padding); None = all ones.
      label_smoothing: ls in [0, 1).

    Returns:
      (loss_sum, weight_sum): float32 scalars; the mean loss is their ratio.
    """
    _check_token_shapes(logits, targets, weights)
    loss, _, _ = _token_losses(logits, targets, label_smoothing)
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
    weights = weights.astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(weights)


def token_accuracy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(weighted count of argmax == target, weight_sum), float32 scalars."""
    _check_token_shapes(logits, targets, weights)
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(correct * weights), jnp.sum(weights)


def token_metrics(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> MetricSums:
    """{'loss', 'accuracy', 'perplexity'} as (sum, count) pairs from one log-softmax.

    'loss' is label-smoothed (what training minimises); 'perplexity' holds the
    plain NLL sum, so it stays comparable across smoothing settings.
    """
    _check_token_shapes(logits, targets, weights)
    loss, nll, correct = _token_losses(logits, targets, label_smoothing)
    correct = correct.astype(jnp.float32)
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
    weights = weights.astype(jnp.float32)
    weight_sum = jnp.sum(weights)
    return {
        "loss": (jnp.sum(loss * weights), weight_sum),
        "accuracy": (jnp.sum(correct * weights), weight_sum),
        "perplexity": (jnp.sum(nll * weights), weight_sum),
    }


def perplexity(nll_sum: Any, count: Any) -> float:
    """exp(mean NLL) = exp(nll_sum / count)."""
    return float(np.exp(np.asarray(nll_sum, np.float64) / np.asarray(count, np.float64)))


# --------------------------------------------------------------------------- exact match


def _through_first_eos(tokens: jax.Array, eos_id: int, pad_id: int) -> jax.Array:
    """Tokens up to and including the first eos; everything after becomes pad."""
    is_eos = tokens == eos_id
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos  # eos strictly before each position
    return jnp.where(eos_before > 0, pad_id, tokens)


def exact_match_ids(
    predictions: jax.Array,
    targets: jax.Array,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
) -> tuple[jax.Array, jax.Array]:
    """Sequence-level exact match on token ids (no bos), compared through the first eos.

    Args:
      predictions: [batch, p_len] int ids (e.g. the best beam).
      targets: [batch, t_len] int ids, padded with pad_id.

    Returns:
      (matching sequences, sequences) as float32 scalars. Tokens after the
      first eos are ignored; the shorter array is padded with pad_id.
    """
    if predictions.ndim != 2 or targets.ndim != 2 or predictions.shape[0] != targets.shape[0]:
        raise ValueError(
            f"predictions {predictions.shape} and targets {targets.shape} must be "
            "[batch, length] with the same batch."
        )
    length = max(predictions.shape[1], targets.shape[1])

    def prepare(x):
        x = _through_first_eos(jnp.asarray(x), eos_id, pad_id)
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=pad_id)

    match = jnp.all(prepare(predictions) == prepare(targets), axis=-1)
    return jnp.sum(match.astype(jnp.float32)), jnp.asarray(match.shape[0], jnp.float32)


def exact_match_strings(
    hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> tuple[int, int]:
    """(number of hypotheses equal to their reference, number of hypotheses), on detokenised text.

    `references` holds one string per hypothesis, or a list of strings per
    hypothesis (several captions of an image): then any of them matches.
    """
    _check_pairs(hypotheses, references)
    matches = 0
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        matches += (
            hypothesis == reference if isinstance(reference, str) else hypothesis in reference
        )
    return matches, len(hypotheses)


# --------------------------------------------------------------------------- BLEU


def _check_pairs(hypotheses: Sequence[str], references: Sequence[Any]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; need one each."
        )


def bleu_statistics(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    tokenize: str = "13a",
    max_ngram_order: int = 4,
) -> np.ndarray:
    """Additive BLEU statistics of a corpus, computed by sacrebleu.

    Args:
      hypotheses: detokenised system outputs.
      references: one string per hypothesis, or a non-empty list of strings per
        hypothesis (their number may vary).
      tokenize: sacrebleu tokenizer, one of BLEU_TOKENIZERS.
      max_ngram_order: n of the longest n-grams counted.

    Returns:
      int64 [2 + 2 * max_ngram_order]: hypothesis length, reference length
      (closest per sentence), matches of 1..n-grams, totals of 1..n-grams.
      Statistics of disjoint parts of a corpus add up to those of the whole.
    """
    if tokenize not in BLEU_TOKENIZERS:
        raise ValueError(f"BLEU tokenize={tokenize!r} must be one of {BLEU_TOKENIZERS}.")
    _check_pairs(hypotheses, references)
    if not hypotheses:
        return np.zeros([2 + 2 * max_ngram_order], np.int64)
    per_sentence = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, refs in enumerate(per_sentence):
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a string or a non-empty list of strings.")
    num_streams = max(len(refs) for refs in per_sentence)
    # sacrebleu takes one stream per reference index; None marks a missing one.
    streams = [
        [refs[k] if k < len(refs) else None for refs in per_sentence] for k in range(num_streams)
    ]
    score = BLEU(tokenize=tokenize, max_ngram_order=max_ngram_order).corpus_score(
        list(hypotheses), streams
    )
    return np.asarray([score.sys_len, score.ref_len, *score.counts, *score.totals], np.int64)


def _split_statistics(stats: np.ndarray) -> tuple[int, int, list[int], list[int]]:
    stats = np.asarray(stats).astype(np.int64)
    if stats.ndim != 1 or stats.shape[0] < 4 or stats.shape[0] % 2:
        raise ValueError(f"BLEU statistics must be [2 + 2n], got shape {stats.shape}.")
    n = (stats.shape[0] - 2) // 2
    return int(stats[0]), int(stats[1]), stats[2 : 2 + n].tolist(), stats[2 + n :].tolist()


def bleu_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100) from summed `bleu_statistics`, smoothed as sacrebleu.corpus_bleu."""
    sys_len, ref_len, correct, total = _split_statistics(stats)
    if sys_len == 0:
        return 0.0
    return BLEU.compute_bleu(
        correct, total, sys_len, ref_len, smooth_method="exp", max_ngram_order=len(correct)
    ).score


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a"
) -> float:
    """Corpus BLEU (0-100) of detokenised strings; = sacrebleu.corpus_bleu(h, [r]).score."""
    return bleu_from_statistics(bleu_statistics(hypotheses, references, tokenize))


def caption_bleu_from_statistics(stats: np.ndarray, max_n: int = 4) -> dict[str, float]:
    """{'bleu1'..'bleu<max_n>'} (0-100) from summed `bleu_statistics`.

    BLEU-n = BP * exp(sum_{i<=n} log p_i / n), unsmoothed (0 when some p_i = 0).
    """
    sys_len, ref_len, correct, total = _split_statistics(stats)
    if not 1 <= max_n <= len(correct):
        raise ValueError(f"max_n={max_n} must be in [1, {len(correct)}].")
    scores = {}
    for n in range(1, max_n + 1):
        if sys_len == 0:
            scores[f"bleu{n}"] = 0.0
            continue
        scores[f"bleu{n}"] = BLEU.compute_bleu(
            correct[:n], total[:n], sys_len, ref_len, smooth_method="none", max_ngram_order=n
        ).score
    return scores


def caption_bleu(
    hypotheses: Sequence[str],
    references_list: Sequence[Sequence[str]],
    max_n: int = 4,
    tokenize: str = "13a",
) -> dict[str, float]:
    """Cumulative corpus BLEU-1..max_n (0-100) with several references per caption.

    Args:
      hypotheses: one generated caption per image.
      references_list: the reference captions of each image (at least one).
      max_n: largest n reported.
      tokenize: sacrebleu tokenizer; 'char' scores caption strings without spaces
        (such as digit strings) per character.
    """
    stats = bleu_statistics(hypotheses, references_list, tokenize, max_ngram_order=max_n)
    return caption_bleu_from_statistics(stats, max_n)


# --------------------------------------------------------------------------- aggregation


def add_metric_sums(
    a: Mapping[str, tuple[Any, Any]], b: Mapping[str, tuple[Any, Any]]
) -> MetricSums:
    """Adds two {name: (sum, count)} dicts; a name in only one of them is kept as is."""
    out = dict(a)
    for name, (total, count) in b.items():
        if name in out:
            out[name] = (out[name][0] + total, out[name][1] + count)
        else:
            out[name] = (total, count)
    return out


def sum_across_processes(tree: Any) -> Any:
    """Sums a pytree of host values (e.g. metric sums, BLEU statistics) over processes.

    Every process must call it with the same structure. With one process it
    returns the tree as NumPy arrays.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    gathered = multihost_utils.process_allgather(jax.tree.map(np.asarray, tree))
    return jax.tree.map(lambda x: np.sum(np.asarray(x), axis=0), gathered)


def compute_metrics(sums: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
    """{name: sum / count}; a name ending in 'perplexity' gives exp(sum / count).

    A metric with count 0 is NaN (nothing was measured).
    """
    out = {}
    for name, (total, count) in jax.device_get(dict(sums)).items():
        total, count = float(total), float(count)
        mean = total / count if count else float("nan")
        out[name] = float(np.exp(mean)) if name.rsplit("/", 1)[-1] == "perplexity" else mean
    return out
