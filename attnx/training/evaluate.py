"""Evaluation: teacher-forced metrics, then beam search and the metrics of its output.

Exact match and BLEU are computed from beam-search output (never from teacher
forcing), on detokenised strings; BLEU with sacrebleu (`metrics.corpus_bleu`),
BLEU-1..4 for captions. The alignments that beam search carries for its best
hypotheses are plotted for the first `config.eval.num_plots` examples.
"""

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from attnx import decoding
from attnx.data.tokenizers import Tokenizer
from attnx.interpret.plots import plot_alignment
from attnx.training import metrics as metrics_lib


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one NumPy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _labels(tokenizer: Tokenizer, ids: np.ndarray) -> list[str]:
    """One label per real token (up to and excluding eos / padding)."""
    labels = []
    for token in ids:
        if token in (0, 2):
            break
        labels.append(tokenizer.decode([int(token)]) or f"<{int(token)}>")
    return labels


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
) -> tuple[dict[str, float], list[tuple[str, np.ndarray]]]:
    """Runs one evaluation pass; returns `({'eval/...': value}, [(name, picture), ...])`.

    References: with `references_of` and batches that carry 'index' (the
    pipeline's `with_index`), `references_of(index)` gives the references of
    a row's record as raw text (untruncated, no unknown tokens; all five-odd
    captions of a COCO image); otherwise the row's detokenised targets.

    With `predictions_path`, process 0 also writes one `reference<TAB>hypothesis`
    line per decoded example there (the first reference).
    """
    sums: dict[str, tuple[Any, Any]] = {}
    hypotheses: list[str] = []
    references: list[list[str]] = []
    pictures = []
    decoded = 0
    for batch in batches:
        sums = metrics_lib.add_metric_sums(sums, eval_step(params, batch))
        if decoded >= eval_config.max_examples:
            continue
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
        targets = to_host(batch["targets"])
        indices = to_host(batch["index"]) if "index" in batch else None
        sources = None if captions else to_host(batch["inputs"])
        for row in range(targets.shape[0]):
            if targets[row, 0] == 0 or decoded >= eval_config.max_examples:
                continue  # an empty padding row, or enough examples
            hypothesis = tokenizer.decode(sequences[row])
            hypotheses.append(hypothesis)
            if references_of is not None and indices is not None:
                references.append(references_of(int(indices[row])))
            else:
                references.append([tokenizer.decode(targets[row])])
            if decoded < eval_config.num_plots:
                target_labels = _labels(tokenizer, sequences[row]) + ["</s>"]
                if captions:
                    source_labels = [str(i) for i in range(alignments.shape[-1])]
                else:
                    source_labels = _labels(tokenizer, sources[row]) + ["</s>"]
                name = f"alignment_{decoded}"
                path = None if plot_dir is None else os.path.join(plot_dir, f"{name}.png")
                picture = plot_alignment(
                    alignments[row], source_labels, target_labels, path, title=hypothesis
                )
                pictures.append((name, picture))
            decoded += 1
    totals = metrics_lib.sum_across_processes(sums)
    results = {f"eval/{k}": v for k, v in metrics_lib.compute_metrics(totals).items()}
    matches, count = metrics_lib.exact_match_strings(hypotheses, references)
    results["eval/exact_match"] = matches / max(count, 1)
    if captions:
        bleu = metrics_lib.caption_bleu(hypotheses, references, tokenize=eval_config.bleu_tokenize)
        results.update({f"eval/{k}": v for k, v in bleu.items()})
    else:
        # A translation has one reference.
        results["eval/bleu"] = metrics_lib.corpus_bleu(
            hypotheses, [r[0] for r in references], tokenize=eval_config.bleu_tokenize
        )
    results["eval/decoded_examples"] = float(len(hypotheses))
    if predictions_path is not None and jax.process_index() == 0:
        with open(predictions_path, "w", encoding="utf-8") as f:
            for reference, hypothesis in zip(references, hypotheses, strict=True):
                f.write(f"{reference[0]}\t{hypothesis}\n")
    return results, pictures
