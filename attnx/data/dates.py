"""The `dates` dataset: a date written in one of 43 CLDR locales -> ISO 8601.

Each example is a calendar date between 1900-01-01 and 2100-12-31 written with
one date pattern of one locale, for instance::

    source: 'Sonntag, 2. Januar 2005'    (de_DE, pattern 'EEEE, d. MMMM y')
    target: '2005-01-02'

The locales cover 15 scripts (Latin, Cyrillic, Greek, Hebrew, Arabic,
Devanagari, Bengali, Tamil, Thai, Khmer, CJK, Hangul, Georgian, Armenian,
Ethiopic). Half of the examples use one of the locale's CLDR `full`, `long`,
`medium` and `short` date formats (from babel), half one of a few custom
patterns (`CUSTOM_PATTERNS`) written with the locale's month and weekday names.
babel writes every number with ASCII digits.

Every source determines its target:

* a pattern must contain exactly one day (`d`), one month (`M` or `L`, not the
  ambiguous narrow form `MMMMM`) and one year (`y`) field; patterns that drop
  a field or use other fields than era and weekday are not used;
* a pattern with a two-digit year (`yy`, CLDR's short formats) is used only for
  years 2000-2099, so '05' always means 2005;
* numeric patterns of different locales can still write two dates the same way
  ('01/02/2005' is 1 February in en_GB and 2 January in a month-first order):
  every source string that was generated for two different dates anywhere
  during generation is dropped, in every split;
* a source string appears in one split only: the split is chosen from a hash
  (BLAKE2b) of the source string, and duplicates are dropped.

Besides source and target, every example carries the alignment that attention
can be scored against. For each of the 10 target characters, `alignment_start`
and `alignment_end` give the half-open span `[start, end)` of source characters
(Unicode code points of the decoded string) it comes from: the four year digits
point at the year field, the two month digits at the month field (a number or a
name), the two day digits at the day field; both dashes get `-1, -1`. The
spans come from formatting the pattern field by field, never from searching
the output.

Features (Text features are read back as UTF-8 `bytes`):

    source:           Text, the written date.
    target:           Text, 'YYYY-MM-DD'.
    locale:           Text, the CLDR locale identifier, e.g. 'de_DE'.
    pattern:          Text, the CLDR date pattern, e.g. 'EEEE, d. MMMM y'.
    alignment_start:  int32 [10], first source character of each target character.
    alignment_end:    int32 [10], one past the last source character.

Sizes of the `default` config: 40,000 train / 2,000 validation / 2,000 test
examples, generated in about 11 s on a shared two-core machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import Iterator, Sequence

import babel
import babel.dates
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from attnx.data.splits import split_of

# At least 30 locales over many scripts; the order fixes the dataset (the
# generator draws indices into this tuple), so only append to it with a new
# version.
LOCALES: tuple[str, ...] = (
    # Latin
    "en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "es_MX", "it_IT", "pt_BR", "nl_NL",
    "sv_SE", "pl_PL", "cs_CZ", "tr_TR", "fi_FI", "hu_HU", "ro_RO", "id_ID", "vi_VN",
    "sw_KE",
    # Cyrillic
    "ru_RU", "uk_UA", "bg_BG", "sr_Cyrl_RS", "kk_KZ",
    # Greek, Hebrew, Arabic script
    "el_GR", "he_IL", "ar_EG", "fa_IR", "ur_PK",
    # Brahmic scripts
    "hi_IN", "mr_IN", "ne_NP", "bn_BD", "ta_IN", "th_TH", "km_KH",
    # CJK and Hangul
    "ja_JP", "zh_Hans_CN", "zh_Hant_TW", "ko_KR",
    # Georgian, Armenian, Ethiopic
    "ka_GE", "hy_AM", "am_ET",
)  # fmt: skip

# CLDR's four standard date formats.
CLDR_FORMATS: tuple[str, ...] = ("full", "long", "medium", "short")

# Patterns used in every locale besides its CLDR formats (month and weekday
# names come from the locale).
CUSTOM_PATTERNS: tuple[str, ...] = (
    "d MMMM y",
    "MMMM d, y",
    "d MMM y",
    "EEEE, d MMMM y",
    "EEE d MMM y",
    "dd.MM.y",
    "dd/MM/y",
    "y-MM-dd",
    "dd.MM.yy",
)

FIRST_DATE = datetime.date(1900, 1, 1)
LAST_DATE = datetime.date(2100, 12, 31)
# Two-digit years are only written for dates in this century.
TWO_DIGIT_YEAR_CENTURY = 2000

TARGET_LENGTH = 10  # len('YYYY-MM-DD')
_YEAR_FIELDS = ("y",)
_MONTH_FIELDS = ("M", "L")
_DAY_FIELDS = ("d",)
# Fields that may appear besides day, month and year: they are redundant with
# the date (weekday) or constant over the years 1900-2100 (era).
_EXTRA_FIELDS = ("E", "c", "G")


@dataclasses.dataclass(frozen=True)
class ParsedPattern:
    """A date pattern split into literal text and fields.

    Attributes:
      locale: the CLDR locale identifier.
      pattern: the pattern string, e.g. 'd MMMM y'.
      tokens: ('chars', text) and ('field', (letter, count)) pairs, as
        `babel.dates.tokenize_pattern` returns them.
      two_digit_year: whether the year field writes only two digits.
    """

    locale: str
    pattern: str
    tokens: tuple[tuple[str, object], ...]
    two_digit_year: bool


def parse_date_pattern(locale: str, pattern: str) -> ParsedPattern:
    """Checks that `pattern` writes the whole date and splits it into fields.

    Raises:
      ValueError: naming the pattern if it lacks the day, the month or the year,
        repeats one of them, writes the narrow month (one letter, ambiguous) or
        uses any other field than weekday and era.
    """
    tokens = tuple(babel.dates.tokenize_pattern(pattern))
    counts = {"year": 0, "month": 0, "day": 0}
    two_digit_year = False
    for kind, value in tokens:
        if kind != "field":
            continue
        letter, count = value
        if letter in _YEAR_FIELDS:
            counts["year"] += 1
            two_digit_year = count == 2
        elif letter in _MONTH_FIELDS:
            counts["month"] += 1
            if count == 5:
                raise ValueError(f"pattern {pattern!r} ({locale}) writes the narrow month")
        elif letter in _DAY_FIELDS:
            counts["day"] += 1
        elif letter not in _EXTRA_FIELDS:
            raise ValueError(f"pattern {pattern!r} ({locale}) has an unsupported field {letter!r}")
    for field, count in counts.items():
        if count != 1:
            raise ValueError(f"pattern {pattern!r} ({locale}) has {count} {field} fields, not 1")
    return ParsedPattern(locale, pattern, tokens, two_digit_year)


@functools.cache
def locale_patterns(locale: str) -> tuple[tuple[ParsedPattern, ...], tuple[ParsedPattern, ...]]:
    """The usable, distinct patterns of one locale.

    Returns:
      (CLDR formats, custom patterns that are not already among the CLDR ones).
    """
    cldr = [babel.dates.get_date_format(f, locale=locale).pattern for f in CLDR_FORMATS]
    cldr = list(dict.fromkeys(cldr))  # distinct, in order (e.g. ja_JP medium == short)
    custom = [pattern for pattern in CUSTOM_PATTERNS if pattern not in cldr]
    return _usable(locale, cldr), _usable(locale, custom)


def _usable(locale: str, patterns: Sequence[str]) -> tuple[ParsedPattern, ...]:
    usable = []
    for pattern in patterns:
        try:
            usable.append(parse_date_pattern(locale, pattern))
        except ValueError:
            continue  # e.g. a format without a day: it would not determine the date
    return tuple(usable)


def format_with_alignment(
    date: datetime.date, parsed: ParsedPattern
) -> tuple[str, np.ndarray, np.ndarray]:
    """Writes `date` with a pattern and tracks which characters each field wrote.

    Returns:
      source: the written date.
      alignment_start, alignment_end: int32 [10], for each character of the
        ISO target 'YYYY-MM-DD', the half-open span of `source` characters
        it comes from; -1 for the dashes.
    """
    formatter = babel.dates.DateTimeFormat(date, _babel_locale(parsed.locale))
    pieces = []
    spans = {}
    offset = 0
    for kind, value in parsed.tokens:
        if kind == "chars":
            text = value
        else:
            letter, count = value
            text = formatter[letter * count]
            if letter in _YEAR_FIELDS:
                spans["year"] = (offset, offset + len(text))
            elif letter in _MONTH_FIELDS:
                spans["month"] = (offset, offset + len(text))
            elif letter in _DAY_FIELDS:
                spans["day"] = (offset, offset + len(text))
        pieces.append(text)
        offset += len(text)
    start = np.full((TARGET_LENGTH,), -1, np.int32)
    end = np.full((TARGET_LENGTH,), -1, np.int32)
    # Target characters: 0-3 year, 4 dash, 5-6 month, 7 dash, 8-9 day.
    for field, positions in (("year", slice(0, 4)), ("month", slice(5, 7)), ("day", slice(8, 10))):
        start[positions], end[positions] = spans[field]
    return "".join(pieces), start, end


@functools.cache
def _babel_locale(locale: str) -> babel.Locale:
    return babel.Locale.parse(locale)


def _writes_year(parsed: ParsedPattern, year: int) -> bool:
    """Whether the pattern determines `year` (two-digit years only in one century)."""
    return not parsed.two_digit_year or (
        TWO_DIGIT_YEAR_CENTURY <= year < TWO_DIGIT_YEAR_CENTURY + 100
    )


@dataclasses.dataclass(eq=False)
class DatesConfig(tfds.core.BuilderConfig):
    """Sizes and seed of the `dates` dataset."""

    num_train: int = 40_000
    num_validation: int = 2_000
    num_test: int = 2_000
    seed: int = 0


def generate_dates(config: DatesConfig) -> dict[str, list[dict[str, object]]]:
    """Draws the examples of all splits at once (ambiguity is a global property).

    Candidates (date, locale, pattern) are drawn with a NumPy generator seeded by
    `config.seed`; each goes to the split its source hashes to, unless that split
    is full, the source is already there, or the source was ever written for
    another date (then it is removed wherever it is and never used again).

    Returns:
      Split name -> list of feature dicts, in generation order.
    """
    quotas = {
        "train": config.num_train,
        "validation": config.num_validation,
        "test": config.num_test,
    }
    total = sum(quotas.values())
    fractions = [(name, quota / total) for name, quota in quotas.items()]
    patterns = [locale_patterns(locale) for locale in LOCALES]
    rng = np.random.default_rng(config.seed)
    first, last = FIRST_DATE.toordinal(), LAST_DATE.toordinal()

    target_of: dict[str, str] = {}  # every source ever drawn -> its date
    ambiguous: set[str] = set()
    chosen: dict[str, dict[str, dict[str, object]]] = {name: {} for name in quotas}
    filled = 0
    batch = 4096
    while filled < total:
        ordinals = rng.integers(first, last + 1, size=batch)
        locale_ids = rng.integers(0, len(LOCALES), size=batch)
        pattern_draws = rng.random(size=batch)
        for ordinal, locale_id, draw in zip(ordinals, locale_ids, pattern_draws, strict=True):
            date = datetime.date.fromordinal(int(ordinal))
            cldr, custom = patterns[locale_id]
            # Half of the examples use a CLDR format, half a custom pattern.
            group = cldr if draw < 0.5 and cldr else custom
            usable = [p for p in group if _writes_year(p, date.year)]
            parsed = usable[int((2.0 * draw) % 1.0 * len(usable))]
            source, start, end = format_with_alignment(date, parsed)
            target = date.isoformat()
            if source in ambiguous:
                continue
            if source in target_of:
                if target_of[source] != target:
                    ambiguous.add(source)
                    split = split_of(source, fractions)
                    if chosen[split].pop(source, None) is not None:
                        filled -= 1
                continue
            target_of[source] = target
            split = split_of(source, fractions)
            if len(chosen[split]) < quotas[split]:
                chosen[split][source] = {
                    "source": source,
                    "target": target,
                    "locale": parsed.locale,
                    "pattern": parsed.pattern,
                    "alignment_start": start,
                    "alignment_end": end,
                }
                filled += 1
                if filled == total:
                    break
    return {name: list(examples.values()) for name, examples in chosen.items()}


class Dates(tfds.core.GeneratorBasedBuilder):
    """Dates in 43 CLDR locales and many formats -> ISO 8601, with alignments."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 43 locales, CLDR and custom patterns."}
    BUILDER_CONFIGS = [DatesConfig(name="default", version=VERSION, description=__doc__)]
    # TFDS 4.9.10 finds a packaged builder's source through `importlib_resources`,
    # which it does not install on Python >= 3.9; name the file directly.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "source": tfds.features.Text(),
                    "target": tfds.features.Text(),
                    "locale": tfds.features.Text(),
                    "pattern": tfds.features.Text(),
                    "alignment_start": tfds.features.Tensor(shape=(TARGET_LENGTH,), dtype=np.int32),
                    "alignment_end": tfds.features.Tensor(shape=(TARGET_LENGTH,), dtype=np.int32),
                }
            ),
            supervised_keys=("source", "target"),
            homepage="https://babel.pocoo.org/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: babel ships the CLDR data
        splits = generate_dates(self.builder_config)
        return {name: self._generate_examples(name, examples) for name, examples in splits.items()}

    def _generate_examples(
        self, split: str, examples: list[dict[str, object]]
    ) -> Iterator[tuple[str, dict[str, object]]]:
        for index, example in enumerate(examples):
            yield f"{split}-{index}", example
