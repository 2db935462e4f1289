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

Some TFDS builders need TensorFlow in their own code (`coco_captions` declares a
feature as `tf.int64`), so without TensorFlow not even their builder object can
be made. Such a dataset is prepared on a machine that has TensorFlow
(`tfds build coco_captions --file_format=array_record`), its directory is
copied into `data_dir`, and attnx reads it with `tfds.builder_from_directory`,
which needs no builder code: the directory describes its own features.
"""

from __future__ import annotations

import difflib
import importlib
import re
import time
from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

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
    Later calls find the files and return at once. A TFDS dataset whose builder
    code needs TensorFlow (not installed) is read from the directory prepared
    elsewhere (see the module docstring) without its builder code.

    Args:
      name: 'dataset[/config][:version]', e.g. 'dates', 'number_words/en_fr',
        'wmt14_translate/de-en'.
      data_dir: TFDS data directory; None for TFDS's default
        (`~/tensorflow_datasets` or $TFDS_DATA_DIR).

    Returns:
      The prepared builder (`builder.info` has the features and split sizes).

    Raises:
      ValueError: for an unknown dataset or config, naming it.
      FileNotFoundError: for a dataset whose builder needs TensorFlow and that
        was not prepared in `data_dir`; the message says how to prepare it.
    """
    builder_cls = check_name(name)
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
    except ImportError as error:
        if not _needs_tensorflow(error):
            raise
        return _prepared_elsewhere(name, builder_cls, data_dir, error)
    logging.info("Preparing %s in %s", name, builder.data_dir)
    start = time.perf_counter()
    try:
        builder.download_and_prepare(file_format=FILE_FORMAT)
    except ImportError as error:
        # The builder object exists but generating the files needs TensorFlow.
        if not _needs_tensorflow(error):
            raise
        data_root = data_dir or tfds.core.constants.DATA_DIR
        message = _how_to_prepare(
            name,
            builder_cls.name,
            builder.builder_config and builder.builder_config.name,
            data_root,
            builder.data_dir,
        )
        raise FileNotFoundError(message) from error
    logging.info("%s is ready (%.1f s)", name, time.perf_counter() - start)
    return builder


def _needs_tensorflow(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is TensorFlow failing to import."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ModuleNotFoundError):
            # TFDS re-raises with a new message; the original keeps the module name.
            module = error.name or ""
            if module.split(".")[0] == "tensorflow":
                return True
        error = error.__cause__ or error.__context__
    return False


def _how_to_prepare(
    name: str, dataset: str, config: str | None, data_dir: str, expected: str
) -> str:
    """The error message for a dataset that needs TensorFlow to prepare and is not prepared."""
    target = f"{dataset}/{config}" if config else dataset
    return (
        f"Dataset {name!r} is not prepared: no {expected}. The TFDS builder of {dataset!r} "
        "needs TensorFlow, which attnx does not install, so prepare it on a machine with "
        "TensorFlow and network access:\n"
        "  pip install tensorflow tensorflow-datasets\n"
        f"  tfds build {target} --file_format={FILE_FORMAT} --data_dir=/tmp/tfds\n"
        f"then copy the directory /tmp/tfds/{dataset} to {epath.Path(data_dir) / dataset} "
        "on this machine."
    )


def _default_config(builder_cls: type[tfds.core.DatasetBuilder]) -> str | None:
    """The config TFDS picks when a name gives none (as DatasetBuilder does)."""
    if not builder_cls.BUILDER_CONFIGS:
        return None
    return builder_cls.DEFAULT_BUILDER_CONFIG_NAME or builder_cls.BUILDER_CONFIGS[0].name


def _prepared_versions(config_dir: epath.Path) -> list[tfds.core.Version]:
    """Versions fully prepared under `config_dir`, oldest first."""
    if not config_dir.is_dir():
        return []
    versions = []
    for child in config_dir.iterdir():
        # TFDS writes into 'incomplete.*' directories and renames them when done.
        if tfds.core.Version.is_valid(child.name) and (child / "dataset_info.json").exists():
            versions.append(tfds.core.Version(child.name))
    return sorted(versions)


def _prepared_elsewhere(
    name: str,
    builder_cls: type[tfds.core.DatasetBuilder],
    data_dir: str | None,
    error: ImportError,
) -> tfds.core.DatasetBuilder:
    """Opens a dataset prepared on another machine, without its builder code.

    Reads `<data_dir>/<dataset>/<config>/<version>`: the version named in
    `name` (wildcards allowed, e.g. ':1.*.*'), else the newest one prepared.
    """
    dataset, config = _parse_name(name)
    config = config or _default_config(builder_cls)
    requested = name.partition(":")[2] or None
    data_root = data_dir or tfds.core.constants.DATA_DIR
    config_dir = epath.Path(data_root) / dataset
    if config:
        config_dir /= config
    versions = _prepared_versions(config_dir)
    if requested:
        versions = [v for v in versions if v.match(requested)]
    if not versions:
        expected = config_dir / (requested or "<version>") / "dataset_info.json"
        message = _how_to_prepare(name, dataset, config, data_root, str(expected))
        raise FileNotFoundError(message) from error
    builder_dir = config_dir / str(versions[-1])
    logging.info("%s needs TensorFlow to build; reading it from %s", name, builder_dir)
    return tfds.builder_from_directory(builder_dir)


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
      FileNotFoundError: for a dataset whose builder needs TensorFlow and that
        was not prepared in `data_dir`; the message says how to prepare it.
    """
    builder_cls = check_name(name)
    if builder_cls.name in BUNDLED_BUILDERS:
        # Known before generating anything: fail fast on a misspelt split.
        check_split(split, BUNDLED_SPLITS, name)
    builder = prepare(name, data_dir)
    if builder.info.splits:  # empty only for a mocked, never prepared dataset
        check_split(split, list(builder.info.splits.keys()), name)
    return builder.as_data_source(split=split)
