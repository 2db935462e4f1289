"""Evaluation: teacher-forced metrics, then beam search and the metrics of its output.

The scores of beam-search output (never of teacher forcing) are computed on
detokenised strings by `text_scores`: exact match, chrF and BLEU with
sacrebleu (BLEU-1..4 for captions), and a character-level score: the
character error rate of a translation, the per-position accuracy of a
caption of one word (`digit_accuracy` for digit strings). A BLEU order that
the references do not have is left out, not reported as 0 (`bleu_left_out`).
The alignments that beam search carries for its best
hypotheses are plotted for the first `config.eval.num_plots` examples.
Optionally, every decoded example goes to a predictions TSV (source,
reference, hypothesis, score), and inputs with characters the vocabulary
cannot represent are reported.
"""

import csv
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from attnx import decoding
from attnx.data.tokenizers import EOS_ID, Tokenizer
from attnx.interpret import alignment_output
from attnx.interpret.plots import plot_alignment
from attnx.training import metrics as metrics_lib
from attnx.training import string_metrics


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one NumPy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def token_labels(tokenizer: Tokenizer, ids: np.ndarray) -> list[str]:
    """One label per real token (up to and excluding eos / padding)."""
    labels = []
    for token in ids:
        if token in (0, 2):
            break
        labels.append(tokenizer.decode([int(token)]) or f"<{int(token)}>")
    return labels


def token_labels_with_eos(tokenizer: Tokenizer, ids: np.ndarray) -> list[str]:
    """`token_labels`, then '</s>' (the eos row or column of a map) if the eos is there.

    A hypothesis that reached the length limit without emitting eos has no eos
    row, so it gets no '</s>' label.
    """
    ids = np.asarray(ids)
    labels = token_labels(tokenizer, ids)
    ended = len(labels) < len(ids) and int(ids[len(labels)]) == EOS_ID
    return [*labels, "</s>"] if ended else labels


# The predictions file's columns, in order (its header row).
PREDICTION_COLUMNS = ("source", "reference", "hypothesis", "score")
# Inputs with unknown characters reported one by one; the rest are only counted.
MAX_UNKNOWN_CHARACTER_WARNINGS = 20
# Distinct unknown characters listed in the summary line.
_MAX_LISTED_CHARACTERS = 50


def _shorten(text: str, width: int = 60) -> str:
    """`text` on one log line: control characters escaped, at most `width` characters."""
    text = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _describe(characters: Iterable[str]) -> str:
    """Each character with its code point: `'ʼ' (U+02BC), '€' (U+20AC)`."""
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in characters)


def _write_predictions(path: str, rows: Iterable[tuple[str, str, str, str]]) -> None:
    """Writes `rows` (source, reference, hypothesis, score) as a UTF-8 TSV with a header."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        # The csv module quotes a field that holds a tab, a quote or "\n" (the line
        # terminator), but not a bare "\r", which csv.reader takes for a line end:
        # a row holding one is written fully quoted (valid CSV either way).
        quoted = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerow(PREDICTION_COLUMNS)
        for row in rows:
            (quoted if any("\r" in field for field in row) else writer).writerow(row)


# BLEU metrics whose leaving out has been logged (once per process, not at every evaluation).
_LEFT_OUT_LOGGED: set[str] = set()


def bleu_left_out(
    references: Sequence[Sequence[str]], *, captions: bool, tokenize: str
) -> dict[str, str]:
    """{metric name: why} of the BLEU metrics that `references` cannot support.

    BLEU-n (a translation's 'bleu' is BLEU-4; a caption's 'bleu1'..'bleu4')
    is left out when fewer than `string_metrics.MIN_BLEU_COVERAGE` of the
    references have n tokens or more as sacrebleu's `tokenize` splits them:
    with single-word targets its n-gram precisions have nothing to count and
    corpus BLEU reads 0 beside a perfect exact match.
    """
    orders = {f"bleu{n}": n for n in range(1, 5)} if captions else {"bleu": 4}
    left_out = {}
    for name, order in orders.items():
        share = string_metrics.bleu_coverage(references, tokenize, order)
        if share < string_metrics.MIN_BLEU_COVERAGE:
            left_out[name] = (
                f"{share:.0%} of the {sum(len(r) for r in references)} references have "
                f"{order} or more tokens (sacrebleu tokenize={tokenize!r}; "
                f"{string_metrics.MIN_BLEU_COVERAGE:.0%} needed)"
            )
    return left_out


def text_scores(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    captions: bool,
    eval_config: Any,
) -> dict[str, float]:
    """The scores of decoded strings against their references (names without 'eval/').

    Every task: 'exact_match' (any reference), 'chrf' and the BLEU orders
    that `bleu_left_out` keeps (the reason for leaving one out is logged once
    per process). A translation (one reference each) adds 'char_error_rate'
    (cheap, and on the same footing for any target), and with
    `eval_config.tokenized_bleu` 'tokenized_bleu'
    (`string_metrics.tokenized_bleu`, compound splitting as Vaswani et al.),
    unless BLEU is left out. A caption adds the per-position character accuracy when
    every reference is one word (no whitespace; on sentences of words it
    would only measure where they line up): named 'digit_accuracy' when every
    reference is a digit string, else 'char_accuracy'.

    Args:
      hypotheses: the decoded strings.
      references: the references of each hypothesis (one for a translation).
      captions: whether the hypotheses are captions (BLEU-1..4).
      eval_config: `config.eval`: bleu_tokenize, and optionally tokenized_bleu.
    """
    tokenize = eval_config.bleu_tokenize
    matches, count = metrics_lib.exact_match_strings(hypotheses, references)
    scores = {"exact_match": matches / max(count, 1)}
    left_out = bleu_left_out(references, captions=captions, tokenize=tokenize)
    for name, reason in left_out.items():
        if name not in _LEFT_OUT_LOGGED and jax.process_index() == 0:
            _LEFT_OUT_LOGGED.add(name)
            logging.info("eval/%s is left out: only %s.", name, reason)
    if captions:
        bleu = metrics_lib.caption_bleu(hypotheses, references, tokenize=tokenize)
        scores.update({k: v for k, v in bleu.items() if k not in left_out})
        scores["chrf"] = string_metrics.chrf(hypotheses, references)
        words = [ref for refs in references for ref in refs]
        if words and not any(len(ref.split()) > 1 for ref in words):
            name = "digit_accuracy" if all(ref.isdigit() for ref in words) else "char_accuracy"
            correct, positions = string_metrics.char_accuracy_counts(hypotheses, references)
            scores[name] = correct / max(positions, 1)
        return scores
    first = [refs[0] for refs in references]  # a translation has one reference
    if "bleu" not in left_out:
        scores["bleu"] = metrics_lib.corpus_bleu(hypotheses, first, tokenize=tokenize)
        if eval_config.get("tokenized_bleu"):
            scores["tokenized_bleu"] = string_metrics.tokenized_bleu(hypotheses, first)
    scores["chrf"] = string_metrics.chrf(hypotheses, first)
    scores["char_error_rate"] = string_metrics.char_error_rate(hypotheses, first)
    return scores


def check_ranking_metrics(
    config: Any, references: Callable[[], Sequence[Sequence[str]]], *, captions: bool
) -> None:
    """Refuses a checkpoint or plateau metric that evaluation will leave out (`bleu_left_out`).

    Args:
      config: the experiment config (`checkpoint.best_metric`, `train.schedule`,
        `train.plateau_metric`, `eval.bleu_tokenize`).
      references: reads the references of the examples evaluation decodes;
        called only when a ranking metric is a BLEU one.
      captions: whether the task is captioning.

    Raises:
      ValueError: naming the config key, the reason and what to rank by instead.
    """
    keys = {"checkpoint.best_metric": config.checkpoint.get("best_metric")}
    if config.train.schedule == "plateau":
        keys["train.plateau_metric"] = config.train.plateau_metric
    named = {key: value for key, value in keys.items() if value and value.startswith("eval/bleu")}
    if not named:
        return
    left_out = bleu_left_out(references(), captions=captions, tokenize=config.eval.bleu_tokenize)
    for key, value in named.items():
        reason = left_out.get(value.split("/", 1)[1])
        if reason is not None:
            raise ValueError(
                f"config.{key}={value!r} is never logged for this task: only {reason}; "
                "rank by 'eval/chrf' or 'eval/exact_match' instead"
            )


def evaluate(
    *,
    model: nnx.Module,
    params: Any,
    eval_step: Callable[[Any, Mapping[str, jax.Array]], Mapping[str, tuple[Any, Any]]],
    batches: Iterable[Mapping[str, jax.Array]],
    tokenizer: Tokenizer,
    eval_config: Any,
    max_target_length: int,
    captions: bool,
    plot_dir: str | None,
    references_of: Callable[[int], list[str]] | None = None,
    predictions_path: str | None = None,
    sources_of: Callable[[int], str] | None = None,
    warn_unknown_characters: bool = False,
    pointing: Callable[[Mapping[str, jax.Array]], Any] | None = None,
    alignments_path: str | None = None,
    alignment_kind: str = "hard",
) -> tuple[dict[str, float], list[tuple[str, np.ndarray]]]:
    """Runs one evaluation pass; returns `({'eval/...': value}, [(name, picture), ...])`.

    Every batch is scored with `eval_step` (teacher forcing); the first
    `eval_config.max_examples` real rows (padding rows, whose first target is
    pad, are skipped) are also decoded with `decoding.beam_search`.

    Args:
      model: the seq2seq model, for beam search.
      params: its parameters, for `eval_step`.
      eval_step: `(params, batch) -> {name: (sum, count)}` metric sums.
      batches: global batches: 'inputs' [B, S] int32 (or 'image' [B, H, W, C]
        with `captions`), 'targets' [B, T] int32, and 'index' [B] int32 (the
        record of each row, -1 for padding) when the pipeline's `with_index`.
      tokenizer: detokenises hypotheses (and targets, without `references_of`).
      eval_config: beam_size, length_penalty, alpha, max_examples, num_plots,
        bleu_tokenize, and optionally tokenized_bleu (`text_scores`).
      max_target_length: beam search's maximum output length.
      captions: the source is an image (BLEU-1..4 over every reference).
      plot_dir: where the alignment plots go (None: not saved, still returned).
      references_of: `references_of(index)` gives the references of a row's
        record as raw text (untruncated, no unknown tokens; all five-odd
        captions of a COCO image); without it (or without 'index'), the row's
        detokenised targets.
      predictions_path: if given, process 0 writes there a UTF-8 TSV (csv
        module, tab-delimited, "\n" line ends; a field holding a tab, a quote
        or a line break is quoted) with the header `source reference
        hypothesis score` and one row per decoded example: the source text
        (`sources_of(index)`, empty without it), the first reference, the best
        hypothesis and its beam-search ranking score (length-normalised
        log-prob, `DecodeResult.scores[:, 0]`) with 4 decimals.
      sources_of: `sources_of(index)` gives the raw source text of a row's
        record (for captions, a label such as 'image 17'); needs 'index' in
        the batches. Called only for the predictions file and the warnings.
      warn_unknown_characters: log (process 0, absl warning) each decoded
        input whose source text has characters the tokenizer cannot
        represent (`Tokenizer.unknown_characters`; the model read them as
        <unk>), naming them with their code points: one line per input for
        the first 20 such inputs, then one summary line with their number
        and the distinct characters. Needs `sources_of`; ignored for captions
        (an image has no text).
      pointing: `pointing(batch) -> PointingScores | None`, the attention of
        the decoded batches scored against the task's gold
        (`Run._pointing`); its totals give 'eval/pointing_accuracy' and
        'eval/attention_mass'.
      alignments_path: if given, process 0 writes there one line per decoded
        example, in the order of the predictions file: the best hypothesis's
        alignment, `alignment_kind` 'hard' (Pharaoh) or 'soft'
        (`attnx.interpret.alignment_output`).

    Raises:
      ValueError: `warn_unknown_characters` without `sources_of` for a text
        source, or sources to read from batches that carry no 'index'.
    """
    alignment_output.check_kind(alignment_kind, key="alignment_kind")
    if warn_unknown_characters and sources_of is None and not captions:
        raise ValueError("evaluate: warn_unknown_characters=True needs sources_of.")
    # Only the chief process writes and logs; every process holds all rows (to_host).
    chief = jax.process_index() == 0
    check_sources = warn_unknown_characters and not captions
    # Reading a source may mean reading its record again: only when something uses it.
    read_sources = sources_of is not None and (check_sources or predictions_path is not None)
    sums: dict[str, tuple[Any, Any]] = {}
    hypotheses: list[str] = []
    references: list[list[str]] = []
    source_texts: list[str] = []
    scores: list[float] = []
    alignment_lines: list[str] = []
    unknown_inputs = 0
    unknown_seen: dict[str, None] = {}  # distinct unknown characters, in order of appearance
    pictures = []
    decoded = 0
    pointed = None
    for batch in batches:
        sums = metrics_lib.add_metric_sums(sums, eval_step(params, batch))
        if decoded >= eval_config.max_examples:
            continue
        if pointing is not None and (batch_pointing := pointing(batch)) is not None:
            pointed = batch_pointing if pointed is None else pointed + batch_pointing
        src = batch["image"] if captions else batch["inputs"]
        result = decoding.beam_search(
            model,
            src,
            beam_size=eval_config.beam_size,
            length_penalty=eval_config.length_penalty,
            alpha=eval_config.alpha,
            max_length=max_target_length,
            return_weights=True,
        )
        sequences = to_host(result.sequences)[:, 0]
        alignments = to_host(result.alignments)[:, 0]
        best_scores = to_host(result.scores)[:, 0]  # [B] the returned hypothesis's score
        targets = to_host(batch["targets"])
        indices = to_host(batch["index"]) if "index" in batch else None
        if read_sources and indices is None:
            raise ValueError(
                "evaluate: sources_of needs batches that carry 'index' (the pipeline's "
                "with_index=True)."
            )
        sources = None if captions else to_host(batch["inputs"])
        batch_lines = (
            alignment_output.lines(alignment_kind, alignments, sequences, sources)
            if alignments_path is not None
            else None
        )
        for row in range(targets.shape[0]):
            if targets[row, 0] == 0 or decoded >= eval_config.max_examples:
                continue  # an empty padding row, or enough examples
            hypothesis = tokenizer.decode(sequences[row])
            hypotheses.append(hypothesis)
            scores.append(float(best_scores[row]))
            if batch_lines is not None:
                alignment_lines.append(batch_lines[row])
            if references_of is not None and indices is not None:
                references.append(references_of(int(indices[row])))
            else:
                references.append([tokenizer.decode(targets[row])])
            source_text = sources_of(int(indices[row])) if read_sources else ""
            source_texts.append(source_text)
            if check_sources and (unknown := tokenizer.unknown_characters(source_text)):
                unknown_inputs += 1
                unknown_seen.update(dict.fromkeys(unknown))
                if chief and unknown_inputs <= MAX_UNKNOWN_CHARACTER_WARNINGS:
                    logging.warning(
                        'input %d "%s": characters outside the vocabulary, read as <unk>: %s',
                        int(indices[row]),
                        _shorten(source_text),
                        _describe(unknown),
                    )
            if decoded < eval_config.num_plots:
                target_labels = token_labels_with_eos(tokenizer, sequences[row])
                if captions:
                    source_labels = [str(i) for i in range(alignments.shape[-1])]
                else:
                    source_labels = token_labels_with_eos(tokenizer, sources[row])
                name = f"alignment_{decoded}"
                path = None if plot_dir is None else os.path.join(plot_dir, f"{name}.png")
                picture = plot_alignment(
                    alignments[row], source_labels, target_labels, path, title=hypothesis
                )
                pictures.append((name, picture))
            decoded += 1
    totals = metrics_lib.sum_across_processes(sums)
    results = {f"eval/{k}": v for k, v in metrics_lib.compute_metrics(totals).items()}
    text = text_scores(hypotheses, references, captions=captions, eval_config=eval_config)
    results.update({f"eval/{k}": v for k, v in text.items()})
    results["eval/decoded_examples"] = float(len(hypotheses))
    if pointed is not None and pointed.count:
        results["eval/pointing_accuracy"] = pointed.accuracy
        results["eval/attention_mass"] = pointed.mass
    if unknown_inputs and chief:
        listed = list(unknown_seen)[:_MAX_LISTED_CHARACTERS]
        more = len(unknown_seen) - len(listed)
        logging.warning(
            "%d of %d decoded inputs had characters outside the vocabulary (distinct: %s%s)",
            unknown_inputs,
            len(hypotheses),
            _describe(listed),
            f", and {more} more" if more else "",
        )
    if predictions_path is not None and chief:
        _write_predictions(
            predictions_path,
            (
                (source, reference[0], hypothesis, f"{score:.4f}")
                for source, reference, hypothesis, score in zip(
                    source_texts, references, hypotheses, scores, strict=True
                )
            ),
        )
    if alignments_path is not None and chief:
        with open(alignments_path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in alignment_lines)
    return results, pictures
