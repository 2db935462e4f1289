"""attnx.training.string_metrics against sacrebleu, a plain edit-distance recursion and hand counts."""

import functools
import random

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

from attnx.training import string_metrics


def recursive_distance(a: str, b: str) -> int:
    """The textbook recursion of the edit distance, memoised: an oracle independent of the rows."""

    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "abc", 3),
        ("abc", "", 3),
        ("straße", "strasse", 2),  # ß -> s, then one insertion
        ("dreizehn", "dreizehn", 0),
    ],
)
def test_levenshtein_by_hand(a, b, distance):
    assert string_metrics.levenshtein(a, b) == distance


def test_levenshtein_equals_the_recursion_on_random_strings():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abü-") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abü-") for _ in range(rng.randint(0, 9)))
        assert string_metrics.levenshtein(a, b) == recursive_distance(a, b), (a, b)


def test_char_error_rate_is_corpus_level():
    # One substitution in "abc"; two deletions against "xyz": 3 edits over 6 characters.
    assert string_metrics.char_error_rate(["abd", "x"], ["abc", "xyz"]) == 3 / 6
    assert string_metrics.char_error_rate([], []) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        string_metrics.char_error_rate(["a", "b"], ["a"])


def test_char_accuracy_counts_positions_over_the_longer_string():
    # "123" vs "124": 2 of 3; "45" vs "456": the missing 6 is wrong, 2 of 3;
    # "1234" vs "12": the extra 3 and 4 are wrong, 2 of 4; "9" vs "19": shifted, 0 of 2.
    assert string_metrics.char_accuracy_counts(
        ["123", "45", "1234", "9"], ["124", "456", "12", "19"]
    ) == (6, 12)
    # With several references the best one counts.
    assert string_metrics.char_accuracy_counts(["12"], [["99", "13"]]) == (1, 2)


def test_chrf_equals_sacrebleu():
    hypotheses = ["dreihundertzwei", "vierzig", "elf"]
    references = ["dreihundertdrei", "vierzig", "zwölf"]
    expected = sacrebleu.corpus_chrf(hypotheses, [references]).score
    assert string_metrics.chrf(hypotheses, references) == pytest.approx(expected)
    assert string_metrics.chrf(references, references) == pytest.approx(100.0)
    # Several references per hypothesis (their number may vary): sacrebleu's streams.
    several = [["dreihundertdrei", "dreihundertzwei"], ["vier"], ["zwölf", "elf"]]
    streams = [["dreihundertdrei", "vier", "zwölf"], ["dreihundertzwei", None, "elf"]]
    assert string_metrics.chrf(hypotheses, several) == pytest.approx(
        CHRF().corpus_score(hypotheses, streams).score
    )


def test_bleu_coverage_counts_references_with_enough_tokens():
    references = ["a b c d", "a b", "x", ["y z w v u", "y"]]
    # 13a tokens: 4, 2, 1, 5, 1 -> two of five references have 4 or more.
    assert string_metrics.bleu_coverage(references, "13a", 4) == 2 / 5
    # Single German number words have no 2-grams; 'char' splits digit strings.
    assert string_metrics.bleu_coverage(["dreihundertzwei", "elf"], "13a", 2) == 0.0
    assert string_metrics.bleu_coverage(["1234", "12"], "char", 4) == 1 / 2


def test_tokenized_bleu_splits_compounds_after_13a():
    hypotheses = ["Ein gut-bekannter Fakt, sagt er."]
    references = ["Ein gut-gemachter Fakt, sagt er."]
    # The tokens by hand: 13a separates the comma and the period; the compound
    # split then makes "gut ##AT##-##AT## bekannter" three tokens.
    hand_hyp = ["Ein gut ##AT##-##AT## bekannter Fakt , sagt er ."]
    hand_ref = ["Ein gut ##AT##-##AT## gemachter Fakt , sagt er ."]
    expected = BLEU(tokenize="none").corpus_score(hand_hyp, [hand_ref]).score
    assert string_metrics.tokenized_bleu(hypotheses, references) == pytest.approx(expected)
    # Without the split it is sacreBLEU's 13a score; the split changes it.
    plain = sacrebleu.corpus_bleu(hypotheses, [references]).score
    assert string_metrics.tokenized_bleu(
        hypotheses, references, compound_splitting=False
    ) == pytest.approx(plain)
    assert abs(expected - plain) > 1.0
