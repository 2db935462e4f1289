"""Tests of the `dates` dataset, checked against babel independently of the builder."""

import datetime
import time
import unicodedata

import babel
import babel.dates
import numpy as np
import pytest

from attnx.data import dates
from attnx.data.prepare import load_source, prepare

SPLITS = ("train", "validation", "test")


def read_split(source) -> list[dict]:
    """All records of a data source, with Text features decoded to str."""
    records = []
    # One batched read: TFDS decodes a record in ~0.2 ms this way, ~1 ms one by one.
    for record in source.__getitems__(list(range(len(source)))):
        record = dict(record)
        for key in ("source", "target", "locale", "pattern"):
            record[key] = record[key].decode("utf-8")
        records.append(record)
    return records


@pytest.fixture(scope="session")
def default_dates(tmp_path_factory):
    """The real default config, prepared once through `prepare` / `load_source`."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    start = time.perf_counter()
    prepare("dates", data_dir=data_dir)
    print(f"dates default prepared in {time.perf_counter() - start:.1f} s")
    return data_dir, {split: read_split(load_source("dates", split, data_dir)) for split in SPLITS}


def small_dates(data_dir: str) -> dict[str, list[dict]]:
    config = dates.DatesConfig(name="small", num_train=600, num_validation=100, num_test=100)
    builder = dates.Dates(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return {split: read_split(builder.as_data_source(split=split)) for split in SPLITS}


def test_default_sizes_and_fast_reload(default_dates):
    data_dir, splits = default_dates
    assert {split: len(records) for split, records in splits.items()} == {
        "train": 40_000,
        "validation": 2_000,
        "test": 2_000,
    }
    start = time.perf_counter()
    assert len(load_source("dates", "test[:10]", data_dir)) == 10
    assert time.perf_counter() - start < 5.0  # already prepared: nothing is generated again


def _field_letters(pattern: str) -> dict[str, list[int]]:
    """Pattern letter -> widths of its fields, e.g. 'd.M.yy' -> {'d': [1], 'M': [1], 'y': [2]}."""
    letters = {}
    for kind, value in babel.dates.tokenize_pattern(pattern):
        if kind == "field":
            letters.setdefault(value[0], []).append(value[1])
    return letters


def test_targets_are_the_dates_written_in_the_sources(default_dates):
    _, splits = default_dates
    checked = splits["test"] + splits["validation"] + splits["train"][:4000]
    for record in checked:
        date = datetime.date.fromisoformat(record["target"])
        assert record["target"] == f"{date.year:04d}-{date.month:02d}-{date.day:02d}"
        assert datetime.date(1900, 1, 1) <= date <= datetime.date(2100, 12, 31)
        # babel's own formatter, given the stored locale and pattern, writes the source.
        written = babel.dates.format_date(date, record["pattern"], locale=record["locale"])
        assert written == record["source"], record
        letters = _field_letters(record["pattern"])
        assert len(letters.get("d", [])) == 1
        assert len(letters.get("M", []) + letters.get("L", [])) == 1
        assert len(letters.get("y", [])) == 1
        assert set(letters) <= {"d", "M", "L", "y", "E", "c", "G"}
        if letters["y"] == [2]:  # a two-digit year only within 2000-2099
            assert 2000 <= date.year <= 2099, record


def test_every_source_determines_its_target(default_dates):
    _, splits = default_dates
    target_of = {}
    for records in splits.values():
        for record in records:
            assert target_of.setdefault(record["source"], record["target"]) == record["target"]
    # Sources are unique across the whole dataset.
    assert len(target_of) == sum(len(records) for records in splits.values())


def test_no_source_in_two_splits(default_dates):
    _, splits = default_dates
    sources = {split: {r["source"] for r in records} for split, records in splits.items()}
    assert not sources["train"] & sources["test"]
    assert not sources["train"] & sources["validation"]
    assert not sources["validation"] & sources["test"]


def test_locales_and_scripts(default_dates):
    _, splits = default_dates
    locales = {r["locale"] for records in splits.values() for r in records}
    assert len(locales) >= 30
    scripts = set()
    for record in splits["test"]:
        for char in record["source"]:
            if char.isalpha():
                scripts.add(unicodedata.name(char).split()[0])
    for script in ("LATIN", "CYRILLIC", "GREEK", "HEBREW", "ARABIC", "DEVANAGARI", "THAI", "CJK"):
        assert script in scripts
    # Several formats per locale, CLDR's and custom ones.
    patterns = {(r["locale"], r["pattern"]) for records in splits.values() for r in records}
    assert len(patterns) >= 5 * len(locales)


def _digits_value(text: str) -> int:
    """Value of a string of decimal digits of any script (raises on any non-digit)."""
    assert text, "empty span"
    value = 0
    for char in text:
        value = 10 * value + unicodedata.digit(char)
    return value


def _month_names(locale: str, month: int) -> set[str]:
    months = babel.Locale.parse(locale).months
    return {months[context][width][month] for context in months for width in months[context]}


def test_alignment_spans_point_at_the_fields(default_dates):
    _, splits = default_dates
    for record in splits["test"]:
        source, target = record["source"], record["target"]
        start, end = record["alignment_start"], record["alignment_end"]
        assert start.shape == end.shape == (10,) and start.dtype == np.int32
        date = datetime.date.fromisoformat(target)
        # Dashes align with nothing; each field's characters share one span.
        assert start[4] == end[4] == start[7] == end[7] == -1
        for chars in (slice(0, 4), slice(5, 7), slice(8, 10)):
            assert len(set(start[chars])) == 1 and len(set(end[chars])) == 1
            assert 0 <= start[chars][0] < end[chars][0] <= len(source)
        year_text = source[start[0] : end[0]]
        month_text = source[start[5] : end[5]]
        day_text = source[start[8] : end[8]]
        if len(year_text) == 2:
            assert _digits_value(year_text) == date.year - 2000
        else:
            assert _digits_value(year_text) == date.year
        if month_text.isdigit():
            assert _digits_value(month_text) == date.month
        else:
            assert month_text in _month_names(record["locale"], date.month), record
        assert _digits_value(day_text) == date.day
        # The three spans do not overlap.
        spans = sorted([(start[0], end[0]), (start[5], end[5]), (start[8], end[8])])
        assert spans[0][1] <= spans[1][0] and spans[1][1] <= spans[2][0]


def test_two_digit_patterns_exist_and_are_checked():
    # The generator must refuse a pattern without a year, and accept 'yy'.
    with pytest.raises(ValueError, match="year"):
        dates.parse_date_pattern("en_US", "MMMM d")
    with pytest.raises(ValueError, match="narrow"):
        dates.parse_date_pattern("en_US", "d MMMMM y")
    assert dates.parse_date_pattern("en_US", "M/d/yy").two_digit_year


def test_two_preparations_give_identical_examples(tmp_path):
    first = small_dates(str(tmp_path / "a"))
    second = small_dates(str(tmp_path / "b"))
    assert [len(first[s]) for s in SPLITS] == [600, 100, 100]
    for split in SPLITS:
        for one, two in zip(first[split], second[split], strict=True):
            assert one.keys() == two.keys()
            for key in one:
                np.testing.assert_array_equal(one[key], two[key])
