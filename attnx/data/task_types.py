"""What a task reads from a record: `TextPairTask` (text -> text), `CaptionTask` (image -> text).

A task names the record fields that hold its source and target, and hands
back their content in one form whatever the dataset: text as str (TFDS text
features come back as bytes, or as str under `tfds.testing.mock_data` and
from the user's files), images as uint8 [height, width, channels]. A key may
name a nested field with '/', e.g. 'captions/text' in coco_captions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CAPTION_CHOICES = ("single", "first", "random")


def get_field(record: Mapping[str, Any], key: str) -> Any:
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
            get_field(record, key)
        except KeyError as error:
            raise KeyError(f"Dataset {dataset!r}: {error.args[0]}") from None


@dataclasses.dataclass(frozen=True)
class TextPairTask:
    """Text in, text out.

    Attributes:
      dataset: config.task.dataset, e.g. 'wmt14_translate/de-en' or 'files'.
      source_key: field of the source text.
      target_key: field of the target text.
    """

    dataset: str
    source_key: str
    target_key: str
    span_keys: tuple[str, str] | None = None

    def gold_spans(self, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
        """The gold alignment of the record, if the dataset carries one; else None.

        `span_keys` name two int fields `[target characters]`: for each
        character of the target text, the half-open span `[start, end)` of the
        source characters it comes from (-1, -1 for a character with none,
        e.g. the dashes of a `dates` target).
        """
        if self.span_keys is None:
            return None
        start, end = (np.asarray(get_field(record, key)) for key in self.span_keys)
        return start.astype(np.int32), end.astype(np.int32)

    def check_record(self, record: Mapping[str, Any]) -> None:
        """Raises a KeyError naming the field if `record` lacks one the task reads."""
        _check_keys(record, (self.source_key, self.target_key), self.dataset)

    def source_text(self, record: Mapping[str, Any]) -> str:
        return to_text(get_field(record, self.source_key))

    def target_text(self, record: Mapping[str, Any]) -> str:
        return to_text(get_field(record, self.target_key))

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
      dataset: config.task.dataset, e.g. 'coco_captions' or 'files'.
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
    box_key: str | None = None

    def gold_boxes(self, record: Mapping[str, Any]) -> np.ndarray | None:
        """The gold boxes of the record, if the dataset carries them; else None.

        `box_key` names an int field `[n, 4]`: `[ymin, xmin, ymax, xmax]` in
        pixels (max exclusive) of the n-th thing the caption names, in order
        (the digits of a `digit_captions` canvas, left to right).
        """
        if self.box_key is None:
            return None
        return np.asarray(get_field(record, self.box_key)).astype(np.int32).reshape(-1, 4)

    def __post_init__(self):
        if self.caption_choice not in CAPTION_CHOICES:
            raise ValueError(
                f"Dataset {self.dataset!r}: caption_choice={self.caption_choice!r}, "
                f"expected one of {CAPTION_CHOICES}."
            )

    def check_record(self, record: Mapping[str, Any]) -> None:
        """Raises a KeyError naming the field if `record` lacks one the task reads."""
        _check_keys(record, (self.image_key, self.caption_key), self.dataset)
        image = np.asarray(get_field(record, self.image_key))
        if image.ndim != 3:
            raise ValueError(
                f"Dataset {self.dataset!r}: field {self.image_key!r} has shape {image.shape}, "
                "expected an image [height, width, channels]."
            )

    def image(self, record: Mapping[str, Any]) -> np.ndarray:
        """The image, uint8 [height, width, channels]."""
        return np.asarray(get_field(record, self.image_key))

    def captions(self, record: Mapping[str, Any]) -> list[str]:
        """Every caption of the record."""
        value = get_field(record, self.caption_key)
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
