"""Tests of the `number_words` dataset against num2words called directly."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from num2words import num2words

from attnx.data import number_words

SPLITS = ("train", "validation", "test")
# The registered configs, with small sizes: the generation code is the same.
LANGUAGES = {"en_de": ("en", "de"), "en_fr": ("en", "fr"), "digits_en": ("digits", "en")}


def small_config(name: str) -> number_words.NumberWordsConfig:
    source_language, target_language = LANGUAGES[name]
    return number_words.NumberWordsConfig(
        name=f"{name}_small",
        source_language=source_language,
        target_language=target_language,
        num_train=1_500,
        num_validation=200,
        num_test=200,
    )


def prepare_small(name: str, data_dir: str) -> dict[str, list[dict]]:
    builder = number_words.NumberWords(
        config=small_config(name), data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare()
    splits = {}
    for split in SPLITS:
        source = builder.as_data_source(split=split)
        splits[split] = [
            {
                "source": r["source"].decode("utf-8"),
                "target": r["target"].decode("utf-8"),
                "number": int(r["number"]),
            }
            for r in source.__getitems__(list(range(len(source))))
        ]
    return splits


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return {name: prepare_small(name, data_dir) for name in LANGUAGES}


def test_registered_configs():
    configs = {c.name: c for c in number_words.NumberWords.BUILDER_CONFIGS}
    assert set(configs) >= set(LANGUAGES)
    for name, (source_language, target_language) in LANGUAGES.items():
        assert configs[name].source_language == source_language
        assert configs[name].target_language == target_language
    assert tfds.builder_cls("number_words") is number_words.NumberWords


@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_sources_and_targets_spell_the_number(prepared, name):
    source_language, target_language = LANGUAGES[name]
    splits = prepared[name]
    assert [len(splits[s]) for s in SPLITS] == [1_500, 200, 200]
    for records in splits.values():
        for r in records:
            assert 0 <= r["number"] <= 999_999
            expected_source = (
                str(r["number"])
                if source_language == "digits"
                else num2words(r["number"], lang=source_language)
            )
            assert r["source"] == expected_source
            assert r["target"] == num2words(r["number"], lang=target_language)


@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_no_number_in_two_splits(prepared, name):
    numbers = {split: [r["number"] for r in records] for split, records in prepared[name].items()}
    everything = sum(numbers.values(), [])
    assert len(set(everything)) == len(everything)


def test_short_numbers_are_common(prepared):
    numbers = np.array([r["number"] for r in prepared["en_de"]["train"]])
    # Digits count uniform in 1..6 (small counts saturate): a uniform draw over
    # 0..999,999 would give almost no number below 1,000.
    assert np.mean(numbers < 1_000) > 0.2
    assert np.mean(numbers >= 100_000) > 0.1


def test_german_reorders_units_and_tens(prepared):
    # 'twenty-one' -> 'einundzwanzig': units before tens.
    records = [r for r in prepared["en_de"]["train"] if 21 <= r["number"] % 100 <= 99]
    records = [r for r in records if r["number"] % 10 != 0][:50]
    assert records
    for r in records:
        assert "und" in r["target"]


def test_two_preparations_give_identical_examples(prepared, tmp_path):
    again = prepare_small("en_fr", str(tmp_path))
    assert again == prepared["en_fr"]
