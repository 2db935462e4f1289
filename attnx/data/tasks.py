"""Tasks: how the examples of a dataset become model inputs.

A dataset is named as in TFDS ('dates', 'number_words/en_de',
'wmt14_translate/de-en', 'coco_captions', ...). Its task says which fields of a
record hold what:

- `TextPairTask`: text-to-text (translation, dates, number words): the source
  text and the target text.
- `CaptionTask`: image-to-text (captioning): the image and its caption.

Records come from `tfds.data_source`, whose text features come back as bytes
(or as str under `tfds.testing.mock_data`); tasks always hand back str. A key
may name a nested field with '/', e.g. 'captions/text' in coco_captions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

CAPTION_CHOICES = ("single", "first", "random")
# Records read at once when sampling the text of a split.
_READ_CHUNK = 1024


def _field(record: Mapping[str, Any], key: str) -> Any:
    """Returns the field `key` ('a/b' for nested) of `record`, naming it if missing."""
    value: Any = record
    for part in key.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            available = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise KeyError(f"Record has no field {key!r} (no {part!r}; available: {available}).")
        value = value[part]
    return value


def to_text(value: Any) -> str:
    """Turns a TFDS text value (bytes, str or a 0-d numpy array of either) into str."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"Expected text (bytes or str), got {type(value).__name__}: {value!r:.80}.")


def _check_keys(record: Mapping[str, Any], keys: Sequence[str], dataset: str) -> None:
    for key in keys:
        try:
            _field(record, key)
        except KeyError as error:
            raise KeyError(f"Dataset {dataset!r}: {error.args[0]}") from None


@dataclasses.dataclass(frozen=True)
class TextPairTask:
    """Text in, text out.

    Attributes:
      dataset: the TFDS name, e.g. 'wmt14_translate/de-en'.
      source_key: field of the source text.
      target_key: field of the target text.
    """

    dataset: str
    source_key: str
    target_key: str

    def check_record(self, record: Mapping[str, Any]) -> None:
        """Raises a KeyError naming the field if `record` lacks one the task reads."""
        _check_keys(record, (self.source_key, self.target_key), self.dataset)

    def source_text(self, record: Mapping[str, Any]) -> str:
        return to_text(_field(record, self.source_key))

    def target_text(self, record: Mapping[str, Any]) -> str:
        return to_text(_field(record, self.target_key))

    def texts(self, record: Mapping[str, Any]) -> list[str]:
        """All text of a record, for building a shared vocabulary."""
        return [self.source_text(record), self.target_text(record)]

    def references(self, record: Mapping[str, Any]) -> list[str]:
        """The reference translations a hypothesis is scored against: the target text."""
        return [self.target_text(record)]


@dataclasses.dataclass(frozen=True)
class CaptionTask:
    """Image in, text out.

    Attributes:
      dataset: the TFDS name, e.g. 'coco_captions'.
      image_key: field of the image, uint8 [height, width, channels].
      caption_key: field of the caption: one text ('single'), or a list of
        texts of which one is used ('first', or 'random': a different one,
        drawn with the pipeline's seed, for each example and epoch).
      caption_choice: 'single', 'first' or 'random'.
    """

    dataset: str
    image_key: str
    caption_key: str
    caption_choice: str = "single"

    def __post_init__(self):
        if self.caption_choice not in CAPTION_CHOICES:
            raise ValueError(
                f"Dataset {self.dataset!r}: caption_choice={self.caption_choice!r}, "
                f"expected one of {CAPTION_CHOICES}."
            )

    def check_record(self, record: Mapping[str, Any]) -> None:
        """Raises a KeyError naming the field if `record` lacks one the task reads."""
        _check_keys(record, (self.image_key, self.caption_key), self.dataset)
        image = np.asarray(_field(record, self.image_key))
        if image.ndim != 3:
            raise ValueError(
                f"Dataset {self.dataset!r}: field {self.image_key!r} has shape {image.shape}, "
                "expected an image [height, width, channels]."
            )

    def image(self, record: Mapping[str, Any]) -> np.ndarray:
        """The image, uint8 [height, width, channels]."""
        return np.asarray(_field(record, self.image_key))

    def captions(self, record: Mapping[str, Any]) -> list[str]:
        """Every caption of the record."""
        value = _field(record, self.caption_key)
        if self.caption_choice == "single":
            return [to_text(value)]
        captions = [to_text(v) for v in value]
        if not captions:
            raise ValueError(f"Dataset {self.dataset!r}: a record has no caption.")
        return captions

    def caption(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> str:
        """The caption used as target; `rng` draws it when caption_choice='random'."""
        captions = self.captions(record)
        if self.caption_choice == "random":
            if rng is None:
                raise ValueError("caption_choice='random' needs a random generator.")
            return captions[int(rng.integers(len(captions)))]
        return captions[0]

    def texts(self, record: Mapping[str, Any]) -> list[str]:
        """All text of a record, for building the vocabulary."""
        return self.captions(record)

    def references(self, record: Mapping[str, Any]) -> list[str]:
        """The references a generated caption is scored against: every caption."""
        return self.captions(record)


Task = TextPairTask | CaptionTask


def get_task(
    dataset: str,
    *,
    source_key: str | None = None,
    target_key: str | None = None,
    image_key: str | None = None,
    caption_key: str | None = None,
    caption_choice: str | None = None,
) -> Task:
    """Returns the task of `dataset`, with keys from the arguments where given.

    Known datasets need no keys: 'dates', 'number_words/*' ('source' ->
    'target'); 'wmt*_translate/xx-yy' (English -> the other language unless
    source_key/target_key say otherwise); 'digit_captions' ('image' ->
    'caption'); 'coco_captions' ('image' -> the first of 'captions/text').
    Any other TFDS dataset needs source_key and target_key, or image_key and
    caption_key.

    Raises:
      ValueError: naming the dataset, when its keys are unknown or mixed.
    """
    base, _, config = dataset.partition("/")
    text_keys = source_key is not None or target_key is not None
    image_keys = image_key is not None or caption_key is not None
    if text_keys and image_keys:
        raise ValueError(
            f"Dataset {dataset!r}: give source_key/target_key (text to text) or "
            "image_key/caption_key (image to text), not both."
        )
    if caption_choice is not None and text_keys:
        raise ValueError(f"Dataset {dataset!r}: caption_choice applies only to captioning.")
    text_dataset = base in ("dates", "number_words") or (
        base.startswith("wmt") and base.endswith("_translate")
    )
    image_dataset = base in ("digit_captions", "coco_captions")
    if text_dataset and (image_keys or caption_choice is not None):
        raise ValueError(
            f"Dataset {dataset!r} is text to text: image_key, caption_key and "
            "caption_choice do not apply."
        )
    if image_dataset and text_keys:
        raise ValueError(
            f"Dataset {dataset!r} is image to text: source_key and target_key do not apply."
        )

    if base in ("dates", "number_words"):
        return TextPairTask(dataset, source_key or "source", target_key or "target")
    if base.startswith("wmt") and base.endswith("_translate"):
        languages = config.split("-") if config else []
        if len(languages) != 2:
            if source_key is None or target_key is None:
                raise ValueError(
                    f"Dataset {dataset!r}: name a language pair config (e.g. "
                    f"'{base}/de-en') or give source_key and target_key."
                )
            languages = [source_key, target_key]
        for role, key in (("source_key", source_key), ("target_key", target_key)):
            if key is not None and key not in languages:
                raise ValueError(
                    f"Dataset {dataset!r}: {role}={key!r} is not one of its languages {languages}."
                )
        if source_key is None and target_key is None:
            # Translation out of English is the usual benchmark direction (en->de, en->fr).
            source_key = "en" if "en" in languages else languages[0]
        other = {languages[0]: languages[1], languages[1]: languages[0]}
        source = source_key or other[target_key]
        target = target_key or other[source]
        if source == target:
            raise ValueError(f"Dataset {dataset!r}: source and target are both {source!r}.")
        return TextPairTask(dataset, source, target)
    if base == "digit_captions":
        return CaptionTask(
            dataset, image_key or "image", caption_key or "caption", caption_choice or "single"
        )
    if base == "coco_captions":
        return CaptionTask(
            dataset, image_key or "image", caption_key or "captions/text", caption_choice or "first"
        )
    if source_key is not None and target_key is not None:
        return TextPairTask(dataset, source_key, target_key)
    if image_key is not None and caption_key is not None:
        return CaptionTask(dataset, image_key, caption_key, caption_choice or "single")
    raise ValueError(
        f"Unknown dataset {dataset!r}: attnx knows 'dates', 'number_words/*', "
        "'wmt*_translate/*', 'digit_captions' and 'coco_captions'; for any other TFDS "
        "dataset give source_key and target_key, or image_key and caption_key."
    )


def open_source(name: str, split: str, data_dir: str | None = None) -> Sequence[Mapping[str, Any]]:
    """Returns the random-access source (`tfds.data_source`) of `split` of dataset `name`.

    One code path for every dataset (`attnx.data.prepare.load_source`): a
    bundled dataset is generated offline on first use; any other TFDS dataset
    is read from its ArrayRecord files in `data_dir` (prepared as BUILD.md
    shows; TFDS downloads it if missing, which needs network access). A
    dataset whose TFDS builder needs TensorFlow, such as 'coco_captions', is
    prepared on a machine with TensorFlow and copied into `data_dir`.
    Raises a ValueError naming an unknown dataset, config or split, and a
    FileNotFoundError saying how to prepare a dataset that needs TensorFlow.
    """
    # Imported here: the bundled builders pull in babel, num2words and
    # scikit-learn, which the rest of this module does not need.
    from attnx.data import prepare

    return prepare.load_source(name, split, data_dir)


def sample_texts(
    task: Task, source: Sequence[Mapping[str, Any]], max_records: int
) -> Iterator[str]:
    """Yields the text of up to `max_records` records spread evenly over `source`.

    Used to build a vocabulary from the training split: evenly spaced records
    cover the whole split deterministically, without reading all of it.
    """
    count = len(source)
    if count == 0:
        raise ValueError(f"Dataset {task.dataset!r}: the split is empty.")
    indices = np.unique(np.linspace(0, count - 1, min(count, max_records)).astype(np.int64))
    for start in range(0, len(indices), _READ_CHUNK):
        chunk = [int(i) for i in indices[start : start + _READ_CHUNK]]
        for record in _read_records(source, chunk):
            yield from task.texts(record)


def _read_records(source: Sequence[Mapping[str, Any]], indices: list[int]) -> list:
    """Reads records `indices`, in one call where the source supports it."""
    # ArrayRecord sources read many records at once far faster than one by one.
    read_many = getattr(source, "__getitems__", None)
    if read_many is not None:
        try:
            return list(read_many(indices))
        except TypeError:
            # tfds.testing.mock_data's source breaks __getitems__'s signature.
            pass
    return [source[i] for i in indices]
