"""The dataset kinds read through TFDS: bundled builders, WMT, COCO, any TFDS name, your builder.

Every one opens a split with `attnx.data.prepare.load_source` (ArrayRecord
files through `tfds.data_source`; a bundled dataset is generated offline on
first use). `prepare` is imported only then: it imports TFDS and the bundled
builders, which pull in babel, num2words and scikit-learn.
"""

from __future__ import annotations

import dataclasses

from attnx.data import builder_module
from attnx.data.kinds import (
    DatasetKind,
    Records,
    Section,
    dataset_name,
    given_keys,
    named,
    refuse_image_keys,
    refuse_mixed_keys,
    refuse_text_keys,
    setting,
)
from attnx.data.task_types import CaptionTask, Task, TextPairTask
from attnx.errors import RunError


def open_tfds(section: Section, split: str) -> Records:
    """The `tfds.data_source` of one split of `config.task.dataset` in `config.task.data_dir`.

    Raises:
      RunError: naming the dataset and split, for an unknown dataset, config or
        split, or a dataset that must be prepared elsewhere (the message says how).
    """
    from attnx.data import prepare

    dataset = dataset_name(section)
    try:
        return prepare.load_source(dataset, split, setting(section, "data_dir"))
    except (ValueError, FileNotFoundError) as error:
        raise RunError(f"config.task.dataset={dataset!r}, split {split!r}: {error}") from error


def _bundled_text_task(section: Section) -> Task:
    refuse_image_keys(section)
    return TextPairTask(
        dataset_name(section),
        setting(section, "source_key") or "source",
        setting(section, "target_key") or "target",
    )


def _wmt_task(section: Section) -> Task:
    """English -> the other language of the pair, unless source_key/target_key say otherwise."""
    refuse_image_keys(section)
    dataset = dataset_name(section)
    source_key, target_key = setting(section, "source_key"), setting(section, "target_key")
    base, _, config = dataset.split(":")[0].partition("/")
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
                f"Dataset {dataset!r}: config.task.{role}={key!r} is not one of its "
                f"languages {languages}."
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


def _caption_task(
    image_key: str, caption_key: str, caption_choice: str, box_key: str | None = None
):
    """make_task of a captioning dataset with these default fields (and gold boxes)."""

    def make_task(section: Section) -> Task:
        refuse_text_keys(section)
        keys_given = setting(section, "image_key") or setting(section, "caption_key")
        return CaptionTask(
            dataset_name(section),
            setting(section, "image_key") or image_key,
            setting(section, "caption_key") or caption_key,
            setting(section, "caption_choice") or caption_choice,
            # The boxes describe the default fields' captions only.
            box_key=None if keys_given else box_key,
        )

    return make_task


def _task_from_keys(section: Section) -> Task:
    """The task of a dataset attnx knows nothing about: the keys say everything."""
    refuse_mixed_keys(section)
    dataset = dataset_name(section)
    keys = given_keys(section)
    if "source_key" in keys and "target_key" in keys:
        return TextPairTask(dataset, keys["source_key"], keys["target_key"])
    if "image_key" in keys and "caption_key" in keys:
        return CaptionTask(
            dataset, keys["image_key"], keys["caption_key"], keys.get("caption_choice", "single")
        )
    raise ValueError(
        f"Dataset {dataset!r}: give both config.task.source_key and config.task.target_key "
        "(text to text), or both image_key and caption_key (image to text); "
        f"got {sorted(keys) or 'none'}."
    )


def _has_task_keys(section: Section) -> bool:
    return bool(given_keys(section))


def _builder_module_set(section: Section) -> bool:
    return bool(setting(section, "builder_module"))


def _check_builder_module(section: Section) -> None:
    """Imports the module and checks that it defines the dataset (ValueError naming the keys)."""
    spec = setting(section, "builder_module")
    module = builder_module.import_builder_module(spec)
    dataset = dataset_name(section)
    base = dataset.split(":")[0].split("/")[0]
    builders = builder_module.builders_of(module)
    if base not in builders:
        raise ValueError(
            f"config.task.dataset={dataset!r} is not a TFDS builder of "
            f"config.task.builder_module={spec!r}, which defines {sorted(builders) or 'none'}."
        )


def _open_user_builder(section: Section, split: str) -> Records:
    try:
        _check_builder_module(section)
    except ValueError as error:
        raise RunError(str(error)) from error
    return open_tfds(section, split)


def _dates_task(section: Section) -> Task:
    """The dates task, with its gold alignment (`attnx.data.dates`: a source span per character)."""
    task = _bundled_text_task(section)
    if setting(section, "source_key") or setting(section, "target_key"):
        return task  # other fields than the ones the spans describe
    return dataclasses.replace(task, span_keys=("alignment_start", "alignment_end"))


DATES = DatasetKind("'dates'", named("dates", "dates/*"), _dates_task, open_tfds)
NUMBER_WORDS = DatasetKind(
    "'number_words/*'", named("number_words", "number_words/*"), _bundled_text_task, open_tfds
)
DIGIT_CAPTIONS = DatasetKind(
    "'digit_captions'",
    named("digit_captions", "digit_captions/*"),
    _caption_task("image", "caption", "single", box_key="boxes"),
    open_tfds,
)
WMT = DatasetKind(
    "'wmt*_translate/*'", named("wmt*_translate", "wmt*_translate/*"), _wmt_task, open_tfds
)
# Training draws the first of an image's five-odd captions unless caption_choice='random'.
COCO_CAPTIONS = DatasetKind(
    "'coco_captions'",
    named("coco_captions", "coco_captions/*"),
    _caption_task("image", "captions/text", "first"),
    open_tfds,
)
USER_BUILDER = DatasetKind(
    "your own TFDS builder (config.task.builder_module, with source_key/target_key or "
    "image_key/caption_key)",
    _builder_module_set,
    _task_from_keys,
    _open_user_builder,
    check=_check_builder_module,
)
ANY_TFDS = DatasetKind(
    "any other TFDS dataset (with config.task.source_key/target_key or image_key/caption_key)",
    _has_task_keys,
    _task_from_keys,
    open_tfds,
)
