"""Scores of decoded strings beside BLEU: chrF, character error rate, per-position accuracy.

Evaluation (`attnx.training.evaluate`) scores beam-search output on
detokenised strings. BLEU (`metrics.corpus_bleu`) counts word n-grams, which
do not exist where a target is a single word (German number words such as
"dreihundertvierundzwanzig"): corpus BLEU then reads 0.0 beside a perfect
exact match. So every task also gets scores that read characters:

  chrf             sacrebleu's chrF (Popovic 2015; `sacrebleu.metrics.CHRF` with
                   its defaults: character 6-grams, no word n-grams, beta 2), corpus
                   level, on sacrebleu's 0-100 scale; several references allowed.
  char_error_rate  corpus character error rate: the sum over examples of the
                   Levenshtein distance between hypothesis and reference,
                   divided by the total reference length (0 = perfect; above 1
                   when the hypotheses are much longer than the references).
  char_accuracy    per position: the characters equal at the same position,
                   over max(len(hypothesis), len(reference)) positions per
                   example (a missing or extra character is wrong), summed over
                   the corpus. Meant for targets that are one short string (a
                   digit string).

`bleu_coverage` says whether BLEU of a given n-gram order means anything
for a set of references (`MIN_BLEU_COVERAGE`), and `tokenized_bleu` is the
BLEU of the papers that score tokenised text (see its docstring).
"""

import re
from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.metrics.chrf import CHRF

# BLEU-n is left out when fewer than this share of the references have n tokens
# or more (as sacrebleu's tokenizer splits them): the n-gram precision then rests
# on a small part of the corpus, and on none of it when the targets are single
# words. Measured shares: digit captions (2-5 digits, 'char' tokens) have 48% of
# 4-digit captions, so BLEU-4 is kept; German number words have 0% of 2-token
# targets, so BLEU is left out.
MIN_BLEU_COVERAGE = 0.25

# Tensor2Tensor's get_ende_bleu.sh splits hyphenated compounds, as Vaswani et al.
# (2017) did for their En-De scores: "a-b" -> "a ##AT##-##AT## b".
_COMPOUND = re.compile(r"(\S)-(\S)")


def _reference_lists(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    lists = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, refs in enumerate(lists):
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a string or a non-empty list of strings.")
    return lists


def _check_pairs(hypotheses: Sequence[str], references: Sequence[object]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; need one each."
        )


def chrf(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus chrF (0-100) with sacrebleu's defaults; = `CHRF().corpus_score(h, streams).score`.

    `references` holds one string per hypothesis or a non-empty list of them
    (several captions of an image; sacrebleu scores each sentence against its
    best reference).
    """
    _check_pairs(hypotheses, references)
    if not hypotheses:
        return 0.0
    lists = _reference_lists(references)
    streams = [
        [refs[k] if k < len(refs) else None for refs in lists]
        for k in range(max(len(refs) for refs in lists))
    ]
    return CHRF().corpus_score(list(hypotheses), streams).score


def levenshtein(a: str, b: str) -> int:
    """The edit distance between `a` and `b` (insertions, deletions, substitutions cost 1).

    One row of the dynamic programme per character of `a`, each row computed
    with NumPy: substitutions and deletions elementwise, then insertions as a
    running minimum, row[j] = j + min_{k <= j} (row'[k] - k).
    """
    if not a or not b:
        return len(a) + len(b)
    target = np.frombuffer(b.encode("utf-32-le"), np.uint32)
    positions = np.arange(len(b) + 1)
    row = positions.copy()
    for i, code in enumerate(np.frombuffer(a.encode("utf-32-le"), np.uint32), start=1):
        substitute = row[:-1] + (target != code)
        delete = row[1:] + 1
        best = np.empty_like(row)
        best[0] = i
        best[1:] = np.minimum(substitute, delete)
        row = positions + np.minimum.accumulate(best - positions)
    return int(row[-1])


def char_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus character error rate: sum of Levenshtein distances / total reference characters.

    One reference per hypothesis. 0.0 for an empty corpus; a corpus of empty
    references divides by 1 (so it counts the hypotheses' characters).
    """
    _check_pairs(hypotheses, references)
    errors = sum(levenshtein(h, r) for h, r in zip(hypotheses, references, strict=True))
    return errors / max(sum(len(r) for r in references), 1)


def char_accuracy_counts(
    hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> tuple[int, int]:
    """(characters equal at their position, positions) summed over the corpus.

    An example has max(len(hypothesis), len(reference)) positions; with several
    references, the one with the most equal positions (ties: the fewest
    positions) counts.
    """
    _check_pairs(hypotheses, references)
    correct = total = 0
    for hypothesis, refs in zip(hypotheses, _reference_lists(references), strict=True):
        scores = [
            (
                sum(h == r for h, r in zip(hypothesis, ref, strict=False)),
                -max(len(hypothesis), len(ref)),
            )
            for ref in refs
        ]
        best_correct, negative_length = max(scores)
        correct += best_correct
        total -= negative_length
    return correct, total


def bleu_coverage(
    references: Sequence[str] | Sequence[Sequence[str]], tokenize: str, order: int
) -> float:
    """The share of references with at least `order` tokens, as sacrebleu `tokenize` splits them.

    Every reference of every example counts once; 0.0 for no references.
    """
    split = BLEU(tokenize=tokenize).tokenizer
    counts = [len(split(ref).split()) for refs in _reference_lists(references) for ref in refs]
    return sum(c >= order for c in counts) / len(counts) if counts else 0.0


def _tokenized(text: str, compound_splitting: bool) -> str:
    text = BLEU(tokenize="13a").tokenizer(text)
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", text) if compound_splitting else text


def tokenized_bleu(
    hypotheses: Sequence[str], references: Sequence[str], *, compound_splitting: bool = True
) -> float:
    """Corpus BLEU (0-100) on tokenised text, as papers before sacreBLEU reported it.

    Vaswani et al. (2017) and the ConvS2S and Transformer reproductions in
    fairseq score En-De with multi-bleu.perl on Moses-tokenised text whose
    hyphenated compounds are split ("a-b" -> "a ##AT##-##AT## b",
    Tensor2Tensor's get_ende_bleu.sh), which counts each compound as three
    tokens. Here both sides are tokenised by sacrebleu's 13a tokenizer (the
    mteval-v13a rules of WMT's official scorer; they separate punctuation as
    Moses' tokenizer.perl does, except that Moses also splits apostrophes and
    keeps the period of an abbreviation), then the compounds are split, then
    BLEU is taken over those tokens (sacrebleu tokenize='none', exponential
    smoothing). Without compound splitting this equals sacreBLEU with '13a',
    so the split is what makes the number differ: a compound that is half
    right now earns n-gram matches.
    """
    _check_pairs(hypotheses, references)
    if not hypotheses:
        return 0.0
    hyps = [_tokenized(h, compound_splitting) for h in hypotheses]
    refs = [_tokenized(r, compound_splitting) for r in references]
    return BLEU(tokenize="none").corpus_score(hyps, [refs]).score
