"""Image captions from the user's files: a JSON-lines file of image paths and captions.

Format 'jsonl_images' (`config.task.files.format`): one JSON object a line,

    {"image": "images/0001.png", "caption": "a cat on a mat"}
    {"image": "images/0002.jpg", "caption": ["two dogs", "dogs playing"]}

with the fields named by `image_field` and `caption_field`. An image path is
relative to the directory of the JSON-lines file (or absolute); a caption is
a string, or a list of strings when an image has several (training uses the
first, or a random one with `config.task.caption_choice='random'`;
evaluation scores against all).

The JSON-lines file is read whole when the split is opened, and every image
file is checked to exist then. Images are decoded (PIL) only when a record's
'image' field is read, to uint8 [height, width, channels] with 1 (grayscale)
or 3 (RGB) channels as `files.image_channels` says, whatever the file holds.
Without `config.task.image_size` every image must have the size of the
split's first image (a batch is one array); with it, the pipeline resizes them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

from attnx.data.file_lines import read_lines
from attnx.data.text_files import json_field, read_json_object
from attnx.errors import RunError

CHANNELS = {1: "L", 3: "RGB"}  # files.image_channels -> PIL mode
RECORD_KEYS = ("image", "caption", "image_path")


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One line of the JSON-lines file.

    Attributes:
      path: the image file, absolute.
      captions: its captions, at least one.
      where: 'FILE:LINE' of the JSON-lines line, for error messages.
      name: the image path as the line gives it, for error messages.
    """

    path: str
    captions: tuple[str, ...]
    where: str
    name: str


def load_image(entry: ImageEntry, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """The image of `entry` as uint8 [height, width, channels].

    Args:
      entry: the line naming the image.
      channels: 1 (converted to grayscale) or 3 (converted to RGB).
      size: (height, width) the image must have, or None for any.

    Raises:
      RunError: `FILE:LINE: image ...` for an image that does not load or has
        another size than `size`.
    """
    try:
        with PIL.Image.open(entry.path) as image:
            pixels = np.asarray(image.convert(CHANNELS[channels]), dtype=np.uint8)
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise RunError(
            f"{entry.where}: image {entry.name!r} ({entry.path}) does not load: "
            f"{type(error).__name__}: {error}"
        ) from None
    pixels = pixels.reshape(*pixels.shape[:2], channels)
    if size is not None and pixels.shape[:2] != tuple(size):
        raise RunError(
            f"{entry.where}: image {entry.name!r} is {pixels.shape[0]}x{pixels.shape[1]} "
            f"(height x width), unlike the {size[0]}x{size[1]} of the split's first image; set "
            "config.task.image_size=(height, width) to resize every image to one size"
        )
    return pixels


class ImageRecord(Mapping[str, Any]):
    """{'image': uint8 [H, W, C], 'caption': list of str, 'image_path': str}.

    The image is decoded each time 'image' is read, and only then: building a
    vocabulary from the captions never decodes an image.
    """

    def __init__(self, entry: ImageEntry, channels: int, size: tuple[int, int] | None):
        self._entry = entry
        self._channels = channels
        self._size = size

    def __getitem__(self, key: str) -> Any:
        if key == "image":
            return load_image(self._entry, self._channels, self._size)
        if key == "caption":
            return list(self._entry.captions)
        if key == "image_path":
            return self._entry.path
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        # Mapping's default would read the value, which decodes the image.
        return key in RECORD_KEYS

    def __iter__(self) -> Iterator[str]:
        return iter(RECORD_KEYS)

    def __len__(self) -> int:
        return len(RECORD_KEYS)


class ImageCaptions(Sequence[ImageRecord]):
    """Random-access `ImageRecord`s of one split (what `pipeline.make_pipeline` reads)."""

    def __init__(
        self,
        entries: list[ImageEntry],
        channels: int,
        image_size: tuple[int, int] | None,
    ):
        if channels not in CHANNELS:
            raise ValueError(f"channels={channels}, expected one of {sorted(CHANNELS)}.")
        self._entries = entries
        self._channels = channels
        # Without a resize every image must be as large as the first (one batch, one array).
        self._size = None
        if image_size is None and entries:
            self._size = load_image(entries[0], channels, None).shape[:2]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> ImageRecord:
        return ImageRecord(self._entries[index], self._channels, self._size)

    def __repr__(self) -> str:
        return f"ImageCaptions({len(self)} images, {self._channels} channel(s))"


def _captions(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = json_field(obj, key, where, "config.task.files.caption_field")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise RunError(f"{where}: field {key!r} is an empty list; give at least one caption")
    for caption in values:
        if not isinstance(caption, str):
            raise RunError(
                f"{where}: field {key!r} holds {caption!r:.40}, expected a caption string "
                "or a list of them"
            )
        if not caption.strip():
            raise RunError(f"{where}: field {key!r} holds an empty caption")
    return tuple(values)


def read_jsonl_images(
    paths: Sequence[str],
    *,
    image_field: str,
    caption_field: str,
    channels: int,
    image_size: tuple[int, int] | None,
) -> ImageCaptions:
    """Reads every line of the JSON-lines files and checks that each image file exists.

    Raises:
      RunError: `FILE:LINE: ...` for a bad line, a missing field, an image
        path that is not a string or names no file, or a first image that
        does not load.
    """
    entries = []
    for path in paths:
        directory = os.path.dirname(path)
        for number, line in read_lines(path):
            where = f"{path}:{number}"
            obj = read_json_object(path, number, line)
            name = json_field(obj, image_field, where, "config.task.files.image_field")
            if not isinstance(name, str) or not name.strip():
                raise RunError(
                    f"{where}: field {image_field!r} must be an image path, got {name!r}"
                )
            image_path = os.path.join(directory, os.path.expanduser(name))
            if not os.path.isfile(image_path):
                raise RunError(f"{where}: image {name!r}: no such file {image_path}")
            entries.append(
                ImageEntry(image_path, _captions(obj, caption_field, where), where, name)
            )
    return ImageCaptions(entries, channels, image_size)
