"""A dataset kind: the `config.task.dataset` names it serves, its task, and how it opens a split.

`attnx.data.tasks` keeps the registry, an ordered tuple of kinds: the first
kind whose `matches` accepts the task section serves it. Every function of a
kind takes the task section (`config.task`, an `ml_collections.ConfigDict`,
or any Mapping with the same keys) and reads it through `setting`, so plain
dicts work as well as configs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attnx.data.task_types import Task

# config.task, or any Mapping with its keys.
Section = Any
Records = Sequence[Mapping[str, Any]]

# config.task keys that say which record fields a TFDS task reads.
TEXT_KEYS = ("source_key", "target_key")
IMAGE_KEYS = ("image_key", "caption_key", "caption_choice")
TASK_KEYS = TEXT_KEYS + IMAGE_KEYS


def setting(section: Section, key: str) -> Any:
    """The value of `config.task.<key>` ('files.train' for a nested key); None when unset."""
    value = section
    for part in key.split("."):
        if value is None:
            return None
        value = value.get(part)
    return value


def dataset_name(section: Section) -> str:
    """`config.task.dataset`, checked to be a non-empty string."""
    name = setting(section, "dataset")
    if not isinstance(name, str) or not name:
        raise ValueError(f"config.task.dataset must name a dataset, got {name!r}.")
    return name


def given_keys(section: Section, keys: Sequence[str] = TASK_KEYS) -> dict[str, str]:
    """The task keys of `section` that are set (not None or empty)."""
    return {key: setting(section, key) for key in keys if setting(section, key)}


def _naming(given: Mapping[str, str]) -> str:
    return ", ".join(f"config.task.{key}={value!r}" for key, value in given.items())


def refuse_image_keys(section: Section) -> None:
    """Raises a ValueError naming the image keys set for a text-to-text dataset."""
    given = given_keys(section, IMAGE_KEYS)
    if given:
        raise ValueError(
            f"Dataset {dataset_name(section)!r} is text to text: {_naming(given)} does not "
            "apply (image_key, caption_key and caption_choice are for image captioning)."
        )


def refuse_text_keys(section: Section) -> None:
    """Raises a ValueError naming the text keys set for an image-to-text dataset."""
    given = given_keys(section, TEXT_KEYS)
    if given:
        raise ValueError(
            f"Dataset {dataset_name(section)!r} is image to text: {_naming(given)} does not "
            "apply (source_key and target_key are for text to text)."
        )


def refuse_mixed_keys(section: Section) -> None:
    """Raises a ValueError when both text and image keys are set."""
    if given_keys(section, TEXT_KEYS) and given_keys(section, IMAGE_KEYS):
        raise ValueError(
            f"Dataset {dataset_name(section)!r}: give source_key/target_key (text to text) or "
            f"image_key/caption_key (image to text), not both; got {_naming(given_keys(section))}."
        )


def named(*patterns: str) -> Callable[[Section], bool]:
    """`matches` for the kinds that serve fixed names: shell patterns of the dataset name.

    The name's ':version' is ignored, so 'dates:1.0.0' is a 'dates' dataset.
    """

    def matches(section: Section) -> bool:
        name = dataset_name(section).split(":")[0]
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    return matches


def _nothing_to_check(section: Section) -> None:
    del section


@dataclasses.dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset, one entry of the registry in `attnx.data.tasks`.

    Attributes:
      name: how error messages list it, e.g. "'number_words/*'".
      matches: whether this kind serves a task section (usually `named(...)`).
      make_task: the `Task` of a section; raises ValueError naming a bad key.
      open_split: the random-access records of one split ('train',
        'validation', ...); raises `attnx.errors.RunError` for a problem the
        user fixes in the data (a missing or bad file).
      check: cheap checks of the section before anything runs (reads no data
        beyond checking that files exist); raises ValueError naming the key.
    """

    name: str
    matches: Callable[[Section], bool]
    make_task: Callable[[Section], Task]
    open_split: Callable[[Section, str], Records]
    check: Callable[[Section], None] = _nothing_to_check
