"""attnx.training.evaluate: beam-search metrics scored against every reference of a record,
the predictions TSV, and the warnings about characters outside the vocabulary."""

import csv
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sacrebleu
from flax import nnx

from attnx import decoding
from attnx.data.tokenizers import CharacterTokenizer
from attnx.models import transformer_config
from attnx.models.captioner import Captioner, tiny
from attnx.models.transformer import Transformer
from attnx.training import evaluate, steps, string_metrics

MAX_LENGTH = 6


def test_caption_metrics_use_every_reference_of_the_record(tmp_path):
    model = Captioner(tiny(), rngs=nnx.Rngs(0))
    tokenizer = CharacterTokenizer("abcdefg")  # 4 special ids + 7 = the tiny vocab of 11
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, 16, 16, 1)).astype(np.float32)
    targets = rng.integers(4, 11, (4, MAX_LENGTH)).astype(np.int32)
    targets[:, -1] = 2
    targets[3] = 0  # a padding row: no example, index -1
    batch = {
        "image": jnp.asarray(images),
        "targets": jnp.asarray(targets),
        "index": jnp.asarray([5, 2, 7, -1], jnp.int32),
    }
    eval_config = ml_collections.ConfigDict(
        dict(
            max_examples=100,
            beam_size=2,
            length_penalty="gnmt",
            alpha=0.6,
            num_plots=0,
            bleu_tokenize="char",
        )
    )
    # The hypotheses, decoded independently of the evaluator.
    result = decoding.beam_search(model, batch["image"], beam_size=2, max_length=MAX_LENGTH)
    hypotheses = [tokenizer.decode(row) for row in np.asarray(result.sequences[:3, 0])]
    references = {
        5: ["gg", hypotheses[0]],
        2: [hypotheses[1], "a"],
        7: ["bcd", "cde"],
    }
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_step = jax.jit(steps.make_eval_step(graphdef, rest, label_smoothing=0.0))
    predictions = tmp_path / "predictions.tsv"
    results, _ = evaluate.evaluate(
        model=model,
        params=params,
        eval_step=eval_step,
        batches=[batch],
        tokenizer=tokenizer,
        eval_config=eval_config,
        max_target_length=MAX_LENGTH,
        captions=True,
        plot_dir=None,
        references_of=lambda index: references[index],
        predictions_path=str(predictions),
        # An image has no text: its label is the source column and is never checked
        # against the vocabulary (its characters are not in "abcdefg").
        sources_of=lambda index: f"image {index}",
        warn_unknown_characters=True,
    )
    assert results["eval/decoded_examples"] == 3
    # Two hypotheses equal one of their references (not the row's targets).
    assert results["eval/exact_match"] == 2 / 3
    streams = [[references[i][k] for i in (5, 2, 7)] for k in range(2)]
    bleu = sacrebleu.BLEU(tokenize="char", smooth_method="none", max_ngram_order=1)
    expected = bleu.corpus_score(hypotheses, streams).score
    np.testing.assert_allclose(results["eval/bleu1"], expected, atol=1e-6)
    with open(predictions, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["source", "reference", "hypothesis", "score"]
    assert [row[:3] for row in rows[1:]] == [
        [f"image {i}", references[i][0], h] for i, h in zip((5, 2, 7), hypotheses, strict=True)
    ]


# --- A text model: the predictions TSV and the unknown-character warnings -----

VOCAB = "abcdefg "  # 4 special ids + 8 characters: the tiny Transformer's vocabulary of 12
SOURCE_LENGTH = 8
EVAL_CONFIG = dict(
    max_examples=100,
    beam_size=2,
    length_penalty="gnmt",
    alpha=0.6,
    num_plots=0,
    bleu_tokenize="char",
)
UNKNOWN = "outside the vocabulary"


@pytest.fixture(scope="module")
def text_model():
    """A tiny Transformer over `VOCAB`, its parameters and a compiled eval step."""
    tokenizer = CharacterTokenizer(VOCAB)
    model = Transformer(transformer_config.tiny(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_step = jax.jit(steps.make_eval_step(graphdef, rest, label_smoothing=0.0))
    return model, params, eval_step, tokenizer


def _text_batch(tokenizer, sources: dict[int, str], indices: list[int]) -> dict:
    """A batch as the pipeline makes it: sources truncated to SOURCE_LENGTH with eos, -1 = padding."""
    inputs = np.zeros((len(indices), SOURCE_LENGTH), np.int32)
    targets = np.zeros((len(indices), MAX_LENGTH), np.int32)
    for row, index in enumerate(indices):
        if index < 0:
            continue
        ids = tokenizer.encode(sources[index])[: SOURCE_LENGTH - 1]
        inputs[row, : len(ids) + 1] = [*ids, 2]
        targets[row, :3] = [4 + index % 8, 4 + (index + 3) % 8, 2]
    return {
        "inputs": jnp.asarray(inputs),
        "targets": jnp.asarray(targets),
        "index": jnp.asarray(indices, jnp.int32),
    }


def _evaluate_text(text_model, batches, sources, **kwargs):
    model, params, eval_step, tokenizer = text_model
    return evaluate.evaluate(
        model=model,
        params=params,
        eval_step=eval_step,
        batches=batches,
        tokenizer=tokenizer,
        eval_config=ml_collections.ConfigDict(EVAL_CONFIG),
        max_target_length=MAX_LENGTH,
        captions=False,
        plot_dir=None,
        references_of=lambda index: [f"ref {index}", "other"],
        sources_of=lambda index: sources[index],
        **kwargs,
    )


def _unknown_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "absl" and r.levelno == logging.WARNING and UNKNOWN in r.getMessage()
    ]


def test_predictions_tsv_round_trips_with_source_reference_and_score(text_model, tmp_path):
    tokenizer = text_model[3]
    # A tab, a newline with quotes, a bare carriage return: each must stay inside its field.
    sources = {5: "ab\tcd", 2: 'fed\n"bag"', 7: "face\rbad", 9: "dead"}
    references = {5: ["ref\twith tab", "x"], 2: ["cab"], 7: ["line\nbreak"], 9: ["gag"]}
    batch = _text_batch(tokenizer, sources, [5, 2, 7, -1])
    later = _text_batch(tokenizer, sources, [9, -1, -1, -1])
    path = tmp_path / "predictions.tsv"
    model, params, eval_step, _ = text_model
    results, _ = evaluate.evaluate(
        model=model,
        params=params,
        eval_step=eval_step,
        batches=[batch, later],
        tokenizer=tokenizer,
        eval_config=ml_collections.ConfigDict(EVAL_CONFIG),
        max_target_length=MAX_LENGTH,
        captions=False,
        plot_dir=None,
        references_of=lambda index: references[index],
        predictions_path=str(path),
        sources_of=lambda index: sources[index],
    )
    assert results["eval/decoded_examples"] == 4
    # The expected hypotheses and scores, from beam search run here.
    expected = []
    for b in (batch, later):
        result = decoding.beam_search(
            model, b["inputs"], beam_size=2, length_penalty="gnmt", alpha=0.6, max_length=MAX_LENGTH
        )
        for row, index in enumerate(np.asarray(b["index"]).tolist()):
            if index >= 0:
                sequence = np.asarray(result.sequences[row, 0])
                expected.append((index, tokenizer.decode(sequence), float(result.scores[row, 0])))
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["source", "reference", "hypothesis", "score"]
    assert len(rows) == 1 + 4
    for row, (index, hypothesis, score) in zip(rows[1:], expected, strict=True):
        assert len(row) == 4, row
        assert row[0] == sources[index]
        assert row[1] == references[index][0]
        assert row[2] == hypothesis
        assert re.fullmatch(r"-?\d+\.\d{4}", row[3]), row[3]
        assert abs(float(row[3]) - score) <= 1e-4
    # A plain header line, "\n" line ends.
    assert path.read_bytes().startswith(b"source\treference\thypothesis\tscore\n")


def test_predictions_tsv_without_sources_has_an_empty_source_column(text_model, tmp_path):
    sources = {0: "bad", 1: "cage"}
    path = tmp_path / "predictions.tsv"
    model, params, eval_step, tokenizer = text_model
    evaluate.evaluate(
        model=model,
        params=params,
        eval_step=eval_step,
        batches=[_text_batch(tokenizer, sources, [0, 1])],
        tokenizer=tokenizer,
        eval_config=ml_collections.ConfigDict({**EVAL_CONFIG, "max_examples": 1}),
        max_target_length=MAX_LENGTH,
        captions=False,
        plot_dir=None,
        predictions_path=str(path),
    )
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    # max_examples=1: one decoded example, one row; its reference is the detokenised target.
    assert len(rows) == 2
    assert rows[1][:2] == ["", tokenizer.decode([4 + 0, 4 + 3, 2])]


def test_one_warning_per_input_with_unknown_characters(text_model, caplog):
    long_source = "a" * 70 + "€"  # the character comes after the shortened text ends
    sources = {
        17: "12 ʼJan 2019",
        3: "bad cafe",  # clean
        4: "bad\u2019 €café €",
        8: "faced",  # clean
        6: long_source,
    }
    batch = _text_batch(text_model[3], sources, [17, 3, 4, 8, 6, -1])
    caplog.set_level(logging.WARNING, logger="absl")
    results, _ = _evaluate_text(text_model, [batch], sources, warn_unknown_characters=True)
    assert results["eval/decoded_examples"] == 5
    assert _unknown_warnings(caplog) == [
        'input 17 "12 ʼJan 2019": characters outside the vocabulary, read as <unk>: '
        "'1' (U+0031), '2' (U+0032), 'ʼ' (U+02BC), 'J' (U+004A), 'n' (U+006E), '0' (U+0030), "
        "'9' (U+0039)",
        'input 4 "bad\u2019 €café €": characters outside the vocabulary, read as <unk>: '
        "'\u2019' (U+2019), '€' (U+20AC), 'é' (U+00E9)",
        f'input 6 "{"a" * 59}\u2026": characters outside the vocabulary, read as <unk>: '
        "'€' (U+20AC)",
        "3 of 5 decoded inputs had characters outside the vocabulary (distinct: '1' (U+0031), "
        "'2' (U+0032), 'ʼ' (U+02BC), 'J' (U+004A), 'n' (U+006E), '0' (U+0030), '9' (U+0039), "
        "'\u2019' (U+2019), '€' (U+20AC), 'é' (U+00E9))",
    ]


def test_unknown_character_warnings_stop_at_20_then_one_summary(text_model, caplog):
    # 24 inputs over 3 batches: 23 have one new character each, input 10 is clean.
    sources = {i: "cab" + chr(0x100 + i) for i in range(24)}
    sources[10] = "cabbage"
    batches = [
        _text_batch(text_model[3], sources, list(range(start, start + 8))) for start in (0, 8, 16)
    ]
    caplog.set_level(logging.WARNING, logger="absl")
    results, _ = _evaluate_text(text_model, batches, sources, warn_unknown_characters=True)
    assert results["eval/decoded_examples"] == 24
    warnings = _unknown_warnings(caplog)
    assert len(warnings) == 20 + 1
    with_unknown = [i for i in range(24) if i != 10]
    for message, index in zip(warnings[:20], with_unknown[:20], strict=True):
        character = chr(0x100 + index)
        assert message == (
            f'input {index} "cab{character}": characters outside the vocabulary, read as <unk>: '
            f"'{character}' (U+{0x100 + index:04X})"
        )
    distinct = ", ".join(f"'{chr(0x100 + i)}' (U+{0x100 + i:04X})" for i in with_unknown)
    assert warnings[20] == (
        f"23 of 24 decoded inputs had characters outside the vocabulary (distinct: {distinct})"
    )


class _CountingSources(dict):
    """A dict of sources that counts how often a source is read."""

    reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def test_no_unknown_character_warnings_unless_asked_or_all_clean(text_model, caplog):
    texts = {0: "12 ʼJan 2019", 1: "€"}
    batch = _text_batch(text_model[3], texts, [0, 1])
    sources = _CountingSources(texts)
    caplog.set_level(logging.WARNING, logger="absl")
    _evaluate_text(text_model, [batch], sources)  # warn_unknown_characters defaults to False
    _evaluate_text(text_model, [batch], sources, warn_unknown_characters=False)
    # Without warnings or a predictions file nothing needs a source: none is read.
    assert sources.reads == 0
    clean = {0: "bad cafe", 1: "egg"}
    _evaluate_text(
        text_model, [_text_batch(text_model[3], clean, [0, 1])], clean, warn_unknown_characters=True
    )
    assert _unknown_warnings(caplog) == []


def test_bad_source_arguments_are_refused(text_model):
    model, params, eval_step, tokenizer = text_model
    batch = _text_batch(tokenizer, {0: "bad"}, [0])
    common = dict(
        model=model,
        params=params,
        eval_step=eval_step,
        tokenizer=tokenizer,
        eval_config=ml_collections.ConfigDict(EVAL_CONFIG),
        max_target_length=MAX_LENGTH,
        captions=False,
        plot_dir=None,
    )
    with pytest.raises(ValueError, match="sources_of"):
        evaluate.evaluate(batches=[batch], warn_unknown_characters=True, **common)
    without_index = {k: v for k, v in batch.items() if k != "index"}
    with pytest.raises(ValueError, match="with_index"):
        evaluate.evaluate(
            batches=[without_index],
            sources_of=lambda index: "bad",
            warn_unknown_characters=True,
            **common,
        )


# --- The scores of decoded strings: which metrics a task gets ------------------


def test_single_word_targets_get_chrf_and_cer_and_no_bleu(caplog):
    # German number words: one 13a token each, so corpus BLEU would read 0.0 beside
    # an exact match of 1.0 (numbers_convs2s, step 6000: BLEU 0.0, exact match 0.996).
    references = [["dreihundertzwei"], ["vierzig"], ["einundsiebzig"], ["elf"]]
    hypotheses = ["dreihundertzwei", "vierzig", "einundsiebzig", "zwölf"]
    config = ml_collections.ConfigDict(dict(bleu_tokenize="13a", tokenized_bleu=True))
    assert sacrebleu.corpus_bleu(hypotheses, [[r[0] for r in references]]).score == 0.0
    evaluate._LEFT_OUT_LOGGED.clear()
    caplog.set_level(logging.INFO)
    for _ in range(2):
        scores = evaluate.text_scores(hypotheses, references, captions=False, eval_config=config)
    assert "bleu" not in scores and "tokenized_bleu" not in scores
    assert scores["exact_match"] == 3 / 4
    assert scores["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(hypotheses, [[r[0] for r in references]]).score
    )
    # "zwölf" against "elf": keep "lf", turn "zwö" into "e" (one substitution, two
    # deletions): 3 edits over 15 + 7 + 13 + 3 = 38 reference characters.
    assert scores["char_error_rate"] == pytest.approx(3 / 38)
    said = [r.getMessage() for r in caplog.records if "eval/bleu is left out" in r.getMessage()]
    assert len(said) == 1, "the reason is logged once, not at every evaluation"
    assert "0% of the 4 references have 4 or more tokens" in said[0]


def test_sentences_get_bleu_chrf_cer_and_tokenized_bleu():
    references = [["Das ist ein gut-gemachter Test ."], ["Wir sehen uns morgen früh ."]]
    hypotheses = ["Das ist ein gut-bekannter Test .", "Wir sehen uns morgen früh ."]
    first = [r[0] for r in references]
    config = ml_collections.ConfigDict(dict(bleu_tokenize="13a", tokenized_bleu=True))
    scores = evaluate.text_scores(hypotheses, references, captions=False, eval_config=config)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [first]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [first]).score)
    # "bekannter" against "gemachter": g>b, m>k, c>n, h>n, 4 substitutions in all.
    assert scores["char_error_rate"] == pytest.approx(4 / sum(map(len, first)))
    assert scores["tokenized_bleu"] == pytest.approx(
        string_metrics.tokenized_bleu(hypotheses, first)
    )
    config.tokenized_bleu = False
    assert "tokenized_bleu" not in evaluate.text_scores(
        hypotheses, references, captions=False, eval_config=config
    )


def test_digit_captions_get_digit_accuracy_and_keep_the_bleu_orders_they_have():
    references = [["1234"], ["567"], ["89"], ["4321"]]
    hypotheses = ["1234", "56", "98", "43210"]
    config = ml_collections.ConfigDict(dict(bleu_tokenize="char"))
    scores = evaluate.text_scores(hypotheses, references, captions=True, eval_config=config)
    # Positions: 4 of 4, 2 of 3 (7 missing), 0 of 2 (swapped), 4 of 5 (extra 0).
    assert scores["digit_accuracy"] == pytest.approx(10 / 14)
    assert "char_accuracy" not in scores and "char_error_rate" not in scores
    # Half the references have 4 digits: BLEU-4 stays (at least a quarter needed).
    assert set(scores) >= {"bleu1", "bleu2", "bleu3", "bleu4", "chrf", "exact_match"}
    short = evaluate.text_scores(["12", "3"], [["12"], ["34"]], captions=True, eval_config=config)
    assert "bleu2" in short and "bleu3" not in short and "bleu4" not in short
    words = evaluate.text_scores(["ab"], [["abc"]], captions=True, eval_config=config)
    assert words["char_accuracy"] == pytest.approx(2 / 3) and "digit_accuracy" not in words
    sentences = evaluate.text_scores(
        ["a cat"], [["a cat", "one cat"]], captions=True, eval_config=config
    )
    assert "char_accuracy" not in sentences, "positions mean nothing across words"


def test_a_ranking_metric_that_is_left_out_is_refused_naming_its_key():
    config = ml_collections.ConfigDict(
        dict(
            checkpoint=dict(best_metric="eval/bleu"),
            train=dict(schedule="plateau", plateau_metric="eval/perplexity"),
            eval=dict(bleu_tokenize="13a"),
        )
    )
    words = [["dreihundertzwei"], ["vierzig"]]
    with pytest.raises(ValueError, match=r"config\.checkpoint\.best_metric='eval/bleu'.*chrf"):
        evaluate.check_ranking_metrics(config, lambda: words, captions=False)
    config.checkpoint.best_metric = "eval/exact_match"
    config.train.plateau_metric = "eval/bleu"
    with pytest.raises(ValueError, match=r"config\.train\.plateau_metric='eval/bleu'"):
        evaluate.check_ranking_metrics(config, lambda: words, captions=False)
    # Sentences keep BLEU; and nothing is read when no ranking metric is a BLEU one.
    evaluate.check_ranking_metrics(config, lambda: [["ein zwei drei vier"]], captions=False)
    config.train.plateau_metric = "eval/perplexity"
    evaluate.check_ranking_metrics(config, lambda: pytest.fail("read"), captions=False)
