"""The `number_words` dataset: a number spelled out in one language -> in another.

Each example is a whole number spelled out by num2words in a source language
and in a target language, for instance (config `en_de`)::

    source: 'seventy-one thousand, two hundred and twenty-four'
    target: 'einundsiebzigtausendzweihundertvierundzwanzig'

German puts the units before the tens ('einundsiebzig' is 'one-and-seventy'),
so a model cannot copy the English word order: attention has to reorder, and
the alignment is not monotonic. French counts some tens in twenties
('quatre-vingt-dix-sept', 'four-twenty-ten-seven' for 97).

Numbers: 0 <= number <= 999,999. The number of digits is drawn uniformly from
1 to 6, then the number uniformly among the numbers with that many digits, so
short examples are common (a uniform draw would give almost only six-digit
numbers). Every number appears at most once in the whole dataset, so a number
in the test split is never seen in training; the split is chosen from a hash
(BLAKE2b) of the number, and the draws use a NumPy generator seeded by the
config's seed.

Configs:

    en_de:      English words -> German words.
    en_fr:      English words -> French words.
    digits_en:  decimal digits ('71224') -> English words.

Features (Text features are read back as UTF-8 `bytes`):

    source:  Text, the number in the source language.
    target:  Text, the number in the target language.
    number:  int64, the number itself.

Sizes of every config: 30,000 train / 2,000 validation / 2,000 test examples,
generated in 8 s (digits_en) to 18 s (en_de) on a shared two-core machine
(num2words takes 0.1-0.4 ms a call).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from num2words import num2words

from attnx.data.splits import split_of

MAX_DIGITS = 6
MAX_NUMBER = 10**MAX_DIGITS - 1
# The pseudo-language of numbers written with decimal digits.
DIGITS = "digits"


def spell(number: int, language: str) -> str:
    """The number written in `language`: a num2words language code or 'digits'."""
    if language == DIGITS:
        return str(number)
    return num2words(number, lang=language)


def draw_number(rng: np.random.Generator) -> int:
    """A number in [0, MAX_NUMBER] whose number of digits is uniform in 1..MAX_DIGITS."""
    digits = int(rng.integers(1, MAX_DIGITS + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


@dataclasses.dataclass(eq=False)
class NumberWordsConfig(tfds.core.BuilderConfig):
    """Languages, sizes and seed of a `number_words` config.

    Attributes:
      source_language: num2words language code, or 'digits'.
      target_language: num2words language code.
    """

    source_language: str = "en"
    target_language: str = "de"
    num_train: int = 30_000
    num_validation: int = 2_000
    num_test: int = 2_000
    seed: int = 0


def draw_split_numbers(config: NumberWordsConfig) -> dict[str, list[int]]:
    """Draws distinct numbers until every split has its size; split -> numbers in draw order."""
    quotas = {
        "train": config.num_train,
        "validation": config.num_validation,
        "test": config.num_test,
    }
    total = sum(quotas.values())
    if total > MAX_NUMBER + 1:
        raise ValueError(f"config {config.name!r} asks for {total} numbers, only {MAX_NUMBER + 1}")
    fractions = [(name, quota / total) for name, quota in quotas.items()]
    rng = np.random.default_rng(config.seed)
    seen: set[int] = set()
    numbers: dict[str, list[int]] = {name: [] for name in quotas}
    filled = 0
    while filled < total:
        number = draw_number(rng)
        if number in seen:
            continue
        seen.add(number)
        split = split_of(str(number), fractions)
        if len(numbers[split]) < quotas[split]:
            numbers[split].append(number)
            filled += 1
    return numbers


class NumberWords(tfds.core.GeneratorBasedBuilder):
    """Numbers spelled out in one language -> spelled out in another (num2words)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: en_de, en_fr and digits_en."}
    BUILDER_CONFIGS = [
        NumberWordsConfig(
            name="en_de",
            version=VERSION,
            description="English words -> German words.",
            source_language="en",
            target_language="de",
        ),
        NumberWordsConfig(
            name="en_fr",
            version=VERSION,
            description="English words -> French words.",
            source_language="en",
            target_language="fr",
        ),
        NumberWordsConfig(
            name="digits_en",
            version=VERSION,
            description="Decimal digits -> English words.",
            source_language=DIGITS,
            target_language="en",
        ),
    ]
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
                    "number": np.int64,
                }
            ),
            supervised_keys=("source", "target"),
            homepage="https://github.com/savoirfairelinux/num2words",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: num2words spells the numbers
        numbers = draw_split_numbers(self.builder_config)
        return {name: self._generate_examples(name, values) for name, values in numbers.items()}

    def _generate_examples(
        self, split: str, numbers: list[int]
    ) -> Iterator[tuple[str, dict[str, object]]]:
        config = self.builder_config
        for index, number in enumerate(numbers):
            yield (
                f"{split}-{index}",
                {
                    "source": spell(number, config.source_language),
                    "target": spell(number, config.target_language),
                    "number": number,
                },
            )
