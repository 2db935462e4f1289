"""Tasks and datasets: `config.task` -> the task and the random-access records of a split.

A dataset is named by `config.task.dataset` and served by one entry of the
registry `DATASETS` (a `kinds.DatasetKind`: which names it serves, how it
makes its task and opens a split). The first entry whose `matches` accepts
the task section serves it:

    'files'                your TSV / JSONL / parallel text files, or a JSONL of
                           images and captions (`files_kind`; config.task.files.*)
    builder_module set     your own TFDS builder, imported first (`tfds_kinds`)
    'dates', 'number_words/*', 'digit_captions'   bundled, generated offline
    'wmt*_translate/*', 'coco_captions'           TFDS, prepared as BUILD.md shows
    any other name         a TFDS dataset, given source_key/target_key or
                           image_key/caption_key

A new kind of dataset is one new `DatasetKind`, added with `register`.

What training calls (the section is `config.task`, or any Mapping with its keys):

    check_task_config(config.task)      cheap checks before anything runs (ValueError)
    task_from_config(config.task)       the Task (ValueError naming a bad key)
    open_split(config.task, 'train')    the records (RunError for a data problem)

A task says which fields of a record hold what (`task_types`):

- `TextPairTask`: text-to-text (translation, dates, number words): the source
  text and the target text.
- `CaptionTask`: image-to-text (captioning): the image and its caption.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from attnx.data import files_kind, tfds_kinds
from attnx.data.kinds import TASK_KEYS, DatasetKind, Records, Section, dataset_name
from attnx.data.task_types import (
    CAPTION_CHOICES,
    CaptionTask,
    Task,
    TextPairTask,
    get_field,
    to_text,
)

__all__ = [
    "CAPTION_CHOICES",
    "DATASETS",
    "TASK_KEYS",
    "CaptionTask",
    "DatasetKind",
    "Task",
    "TextPairTask",
    "check_task_config",
    "get_field",
    "get_task",
    "open_source",
    "open_split",
    "register",
    "sample_texts",
    "task_from_config",
    "to_text",
]

# Records read at once when sampling the text of a split.
_READ_CHUNK = 1024

# The registry, in look-up order: named kinds first, then those that serve any
# name (a builder module, TFDS keys).
DATASETS: list[DatasetKind] = [
    files_kind.FILES,
    tfds_kinds.USER_BUILDER,
    tfds_kinds.DATES,
    tfds_kinds.NUMBER_WORDS,
    tfds_kinds.DIGIT_CAPTIONS,
    tfds_kinds.WMT,
    tfds_kinds.COCO_CAPTIONS,
    tfds_kinds.ANY_TFDS,
]


def register(kind: DatasetKind) -> None:
    """Adds a kind of dataset, looked up before the kinds that serve any TFDS name."""
    DATASETS.insert(DATASETS.index(tfds_kinds.ANY_TFDS), kind)


def find_kind(section: Section) -> DatasetKind:
    """The registry entry that serves `config.task`.

    Raises:
      ValueError: for a dataset no entry serves, naming it and every known kind.
    """
    for kind in DATASETS:
        if kind.matches(section):
            return kind
    known = "; ".join(kind.name for kind in DATASETS)
    raise ValueError(f"Unknown dataset {dataset_name(section)!r}: attnx knows {known}.")


def task_from_config(task_section: Section) -> Task:
    """The task of `config.task`: which record fields hold the source and the target.

    Raises:
      ValueError: naming the dataset and the config.task key that is wrong.
    """
    return find_kind(task_section).make_task(task_section)


def check_task_config(task_section: Section) -> None:
    """Checks `config.task` before anything runs: the dataset is known, its keys fit.

    Cheap: reads no data. For `files` it checks that the files of every split
    that is set exist (globs match); for a builder module, that it imports and
    defines the dataset.

    Raises:
      ValueError: naming the config.task key that is wrong.
    """
    kind = find_kind(task_section)
    kind.make_task(task_section)
    kind.check(task_section)


def open_split(task_section: Section, split: str) -> Records:
    """The random-access records of `split` ('train', 'validation', 'test') of `config.task`.

    Any of them goes through `attnx.data.pipeline.make_pipeline`. TFDS
    datasets are read from their ArrayRecord files (a bundled dataset is
    generated offline on first use); `files` are read whole into memory.

    Raises:
      RunError: for a problem the user fixes in the data or its preparation
        (an unknown split, a missing or bad file: `FILE:LINE: ...`).
    """
    return find_kind(task_section).open_split(task_section, split)


def get_task(
    dataset: str,
    *,
    source_key: str | None = None,
    target_key: str | None = None,
    image_key: str | None = None,
    caption_key: str | None = None,
    caption_choice: str | None = None,
) -> Task:
    """`task_from_config` of a TFDS dataset named with its keys (no config at hand).

    Known datasets need no keys: 'dates', 'number_words/*' ('source' ->
    'target'); 'wmt*_translate/xx-yy' (English -> the other language unless
    source_key/target_key say otherwise); 'digit_captions' ('image' ->
    'caption'); 'coco_captions' ('image' -> the first of 'captions/text').
    Any other TFDS dataset needs source_key and target_key, or image_key and
    caption_key.
    """
    keys = dict(
        source_key=source_key,
        target_key=target_key,
        image_key=image_key,
        caption_key=caption_key,
        caption_choice=caption_choice,
    )
    return task_from_config({"dataset": dataset, **keys})


def open_source(name: str, split: str, data_dir: str | None = None) -> Records:
    """`open_split` of a TFDS dataset named `name` in `data_dir` (no config at hand)."""
    return open_split({"dataset": name, "data_dir": data_dir}, split)


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
