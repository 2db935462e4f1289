"""Prepares a TFDS dataset by name as ArrayRecord files and opens it for random access.

One code path serves the bundled datasets (`dates`, `number_words/en_de`,
`digit_captions`, generated offline by attnx) and every TFDS dataset
(`wmt14_translate/de-en`, `coco_captions`, ...), which TFDS downloads on first
use and so needs network access. Names are TFDS names:
`dataset[/config][:version]`.

    builder = prepare('number_words/en_de', data_dir='/data/tfds')
    source = load_source('number_words/en_de', 'train', data_dir='/data/tfds')
    source[0]  # {'number': 71224, 'source': b'seventy-one thousand, ...', ...}

`load_source` returns `tfds.data_source`'s random-access view over the
ArrayRecord files (no TensorFlow), the input of a grain pipeline. Text features
come back as UTF-8 `bytes`.
"""

from __future__ import annotations

import difflib
import importlib
import re
import time
from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import logging

# Importing the builders registers them with TFDS under their names.
from attnx.data.dates import Dates
from attnx.data.digit_captions import DigitCaptions
from attnx.data.number_words import NumberWords

BUNDLED_BUILDERS = {builder.name: builder for builder in (Dates, NumberWords, DigitCaptions)}
BUNDLED_SPLITS = ("train", "validation", "test")
FILE_FORMAT = "array_record"

# TFDS registers most of its catalogue only when these sub-packages are
# imported (`import tensorflow_datasets` imports them lazily).
_TFDS_CATALOGUE_MODULES = (
    "audio",
    "graphs",
    "image",
    "image_classification",
    "object_detection",
    "question_answering",
    "ranking",
    "recommendation",
    "structured",
    "summarization",
    "text",
    "text_simplification",
    "time_series",
    "translate",
    "video",
    "vision_language",
)


def _registered_datasets() -> list[str]:
    return tfds.list_builders(with_community_datasets=False)


def _import_tfds_catalogue() -> None:
    for module in _TFDS_CATALOGUE_MODULES:
        try:
            importlib.import_module(f"tensorflow_datasets.{module}")
        except ImportError as error:  # e.g. a builder needing an optional package
            logging.info("Skipping TFDS builders of %s: %s", module, error)


def _parse_name(name: str) -> tuple[str, str | None]:
    """'dataset[/config][:version]' -> (dataset, config or None)."""
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?(:[\w.*-]+)?", name):
        raise ValueError(
            f"Dataset name {name!r} is not of the form 'dataset[/config][:version]', "
            "e.g. 'dates' or 'wmt14_translate/de-en'."
        )
    dataset, _, config = name.split(":")[0].partition("/")
    return dataset, config or None


def check_name(name: str) -> type[tfds.core.DatasetBuilder]:
    """Checks that `name` names a known dataset and config; returns its builder class.

    Raises:
      ValueError: naming the unknown dataset or config and listing the valid ones.
    """
    dataset, config = _parse_name(name)
    if dataset not in _registered_datasets():
        _import_tfds_catalogue()
    registered = _registered_datasets()
    if dataset not in registered:
        close = difflib.get_close_matches(dataset, registered, n=5)
        raise ValueError(
            f"Unknown dataset {dataset!r} (in {name!r}). Bundled datasets: "
            f"{sorted(BUNDLED_BUILDERS)}; TFDS datasets: see tfds.list_builders()"
            + (f"; close matches: {close}" if close else "")
            + "."
        )
    builder_cls = tfds.builder_cls(dataset)
    configs = [c.name for c in builder_cls.BUILDER_CONFIGS or ()]
    if config is not None and config not in configs:
        valid = f"valid configs: {configs}" if configs else "it has no configs"
        raise ValueError(
            f"Unknown config {config!r} of dataset {dataset!r} (in {name!r}); {valid}."
        )
    return builder_cls


def check_split(split: str, valid: Sequence[str], name: str) -> None:
    """Checks every split named in a TFDS split string ('train[:10%]+validation').

    Raises:
      ValueError: naming the unknown split and listing the valid ones.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"Split of {name!r} must be a non-empty string, got {split!r}.")
    for part in split.split("+"):
        base = part.split("[")[0].strip()
        if base not in valid:
            raise ValueError(
                f"Unknown split {base!r} (in {split!r}) of dataset {name!r}; "
                f"valid splits: {list(valid)}."
            )


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Makes sure dataset `name` is prepared as ArrayRecord files under `data_dir`.

    A bundled dataset is generated on first use (a few seconds to half a minute,
    with progress bars); a TFDS dataset is downloaded and prepared by TFDS.
    Later calls find the files and return at once.

    Args:
      name: 'dataset[/config][:version]', e.g. 'dates', 'number_words/en_fr',
        'wmt14_translate/de-en'.
      data_dir: TFDS data directory; None for TFDS's default
        (`~/tensorflow_datasets` or $TFDS_DATA_DIR).

    Returns:
      The prepared builder (`builder.info` has the features and split sizes).

    Raises:
      ValueError: for an unknown dataset or config, naming it.
    """
    check_name(name)
    builder = tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
    logging.info("Preparing %s in %s", name, builder.data_dir)
    start = time.perf_counter()
    builder.download_and_prepare(file_format=FILE_FORMAT)
    logging.info("%s is ready (%.1f s)", name, time.perf_counter() - start)
    return builder


def load_source(name: str, split: str, data_dir: str | None = None):
    """Random-access source of one split of dataset `name`, preparing it if needed.

    Args:
      name: 'dataset[/config][:version]'.
      split: a TFDS split string: 'train', 'test', 'train[:1000]', 'train+validation'.
      data_dir: TFDS data directory; None for TFDS's default.

    Returns:
      A `tfds.data_source` view (a sequence of feature dicts) over the
      ArrayRecord files.

    Raises:
      ValueError: for an unknown dataset, config or split, naming it.
    """
    builder_cls = check_name(name)
    if builder_cls.name in BUNDLED_BUILDERS:
        # Known before generating anything: fail fast on a misspelt split.
        check_split(split, BUNDLED_SPLITS, name)
    builder = prepare(name, data_dir)
    if builder.info.splits:  # empty only for a mocked, never prepared dataset
        check_split(split, list(builder.info.splits.keys()), name)
    return builder.as_data_source(split=split)
