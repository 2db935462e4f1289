"""Tests of `prepare` / `load_source`: names, errors, mocked TFDS datasets, determinism."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attnx.data import prepare as prepare_lib


@pytest.mark.parametrize(
    "name, split, message",
    [
        ("datez", "train", "Unknown dataset 'datez'.*'dates'"),
        ("number_words/en_xx", "train", "Unknown config 'en_xx'.*'en_de', 'en_fr', 'digits_en'"),
        ("dates", "tran", "Unknown split 'tran'.*'train', 'validation', 'test'"),
        ("dates", "train+tset[:10]", "Unknown split 'tset'"),
        ("digit_captions/big", "train", "Unknown config 'big'.*'default'"),
        ("wmt14_translate/de-xx", "train", "Unknown config 'de-xx'.*'de-en'"),
        ("mnist/foo", "train", "Unknown config 'foo'.*no configs"),
        ("not a name", "train", "'not a name' is not of the form"),
    ],
)
def test_bad_names_are_named_before_any_work(tmp_path, name, split, message):
    with pytest.raises(ValueError, match=message):
        prepare_lib.load_source(name, split, data_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing was generated or downloaded


def test_bad_name_in_prepare(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'number_word'.*'number_words'"):
        prepare_lib.prepare("number_word/en_de", data_dir=str(tmp_path))


def test_bundled_builders_are_registered():
    assert set(prepare_lib.BUNDLED_BUILDERS) == {"dates", "number_words", "digit_captions"}
    for name, builder_cls in prepare_lib.BUNDLED_BUILDERS.items():
        assert tfds.builder_cls(name) is builder_cls
        assert str(builder_cls.VERSION) == "1.0.0" and "1.0.0" in builder_cls.RELEASE_NOTES


@pytest.mark.parametrize("name", ["wmt14_translate/de-en", "wmt14_translate/fr-en"])
def test_tfds_datasets_go_through_the_same_path(tmp_path, name):
    with tfds.testing.mock_data(num_examples=7):
        source = prepare_lib.load_source(name, "train", data_dir=str(tmp_path))
        assert len(source) == 7
        record = source[3]
    language = name.split("/")[1].split("-")[0]
    assert set(record) == {language, "en"}


_PREPARE_SMALL = textwrap.dedent(
    """
    import sys
    from attnx.data import dates, digit_captions, number_words

    data_dir = sys.argv[1]
    builders = [
        dates.Dates(config=dates.DatesConfig(
            name="tiny", num_train=300, num_validation=50, num_test=50), data_dir=data_dir),
        number_words.NumberWords(config=number_words.NumberWordsConfig(
            name="tiny", num_train=300, num_validation=50, num_test=50), data_dir=data_dir),
        digit_captions.DigitCaptions(config=digit_captions.DigitCaptionsConfig(
            name="tiny", num_train=100, num_validation=20, num_test=20), data_dir=data_dir),
    ]
    for builder in builders:
        builder.download_and_prepare(file_format="array_record")
    """
)


def _read_all(data_dir: str) -> dict:
    records = {}
    for name in ("dates/tiny", "number_words/tiny", "digit_captions/tiny"):
        dataset, config = name.split("/")
        builder_cls = prepare_lib.BUNDLED_BUILDERS[dataset]
        builder = builder_cls(config=_tiny_config(builder_cls), data_dir=data_dir)
        for split in ("train", "validation", "test"):
            source = builder.as_data_source(split=split)
            records[name, split] = source.__getitems__(list(range(len(source))))
    return records


def _tiny_config(builder_cls):
    config_cls = type(builder_cls.BUILDER_CONFIGS[0])
    sizes = (100, 20, 20) if builder_cls.name == "digit_captions" else (300, 50, 50)
    return config_cls(name="tiny", num_train=sizes[0], num_validation=sizes[1], num_test=sizes[2])


def test_preparation_does_not_depend_on_the_process(tmp_path):
    """Two processes with different str hash seeds write the same examples in the same order."""
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        data_dir = str(tmp_path / hash_seed)
        subprocess.run(
            [sys.executable, "-c", _PREPARE_SMALL, data_dir],
            env=env,
            check=True,
            capture_output=True,
        )
    first, second = _read_all(str(tmp_path / "1")), _read_all(str(tmp_path / "2"))
    assert first.keys() == second.keys()
    for key, records in first.items():
        assert len(records) == len(second[key]) > 0
        for one, two in zip(records, second[key], strict=True):
            assert one.keys() == two.keys()
            for feature in one:
                np.testing.assert_array_equal(one[feature], two[feature])
