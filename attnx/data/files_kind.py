"""`config.task.dataset='files'`: text pairs or image captions from the user's own files.

The keys, in `config.task.files`:

    train, validation, test   a path or a glob per split ('data/train-*.tsv'); for
                              'text_pairs', the prefix of the parallel files
    format                    'tsv', 'jsonl', 'text_pairs' or 'jsonl_images'
    header                    'tsv': the first line of every file is a header
    source_field, target_field   'jsonl': the fields holding the two texts
    source_suffix, target_suffix 'text_pairs': 'en', 'de' for train.en, train.de
    image_field, caption_field   'jsonl_images': the fields of image path and caption(s)
    image_channels            'jsonl_images': 1 (grayscale) or 3 (RGB)

Relative paths are relative to the directory the command starts in: attnx
resolves them when the files are opened (`file_lines.resolve`). Training reads
'train', evaluation `config.task.eval_split`. The formats are described in
`text_files` and `image_files`.
"""

from __future__ import annotations

import os

from attnx.data import file_lines, image_files, text_files
from attnx.data.kinds import (
    TASK_KEYS,
    DatasetKind,
    Records,
    Section,
    named,
    setting,
)
from attnx.data.task_types import CaptionTask, Task, TextPairTask
from attnx.errors import RunError

NAME = "files"
SPLITS = ("train", "validation", "test")
TEXT_FORMATS = ("tsv", "jsonl", "text_pairs")
IMAGE_FORMATS = ("jsonl_images",)
FORMATS = TEXT_FORMATS + IMAGE_FORMATS
CAPTION_CHOICES = ("first", "random")
# The record fields the task reads (the files' own field names are settings).
SOURCE, TARGET, IMAGE, CAPTION = "source", "target", "image", "caption"
# What each format reads, besides its split paths.
_FORMAT_KEYS = {
    "tsv": ("header",),
    "jsonl": ("source_field", "target_field"),
    "text_pairs": ("source_suffix", "target_suffix"),
    "jsonl_images": ("image_field", "caption_field", "image_channels"),
}
# The defaults of base_config's config.task.files (for a task section given as a plain
# dict); set to another value, a key that belongs to one format needs that format.
DEFAULTS = {
    "format": "tsv",
    "header": False,
    "source_field": "source",
    "target_field": "target",
    "image_field": "image",
    "caption_field": "caption",
    "image_channels": 3,
}


def _files(section: Section, key: str):
    """config.task.files.<key>, or its default when unset (a plain dict may omit keys)."""
    value = setting(section, f"files.{key}")
    return DEFAULTS.get(key) if value is None else value


def _format(section: Section) -> str:
    value = _files(section, "format")
    if value not in FORMATS:
        raise ValueError(f"config.task.files.format={value!r}; choose one of {list(FORMATS)}.")
    return value


def make_task(section: Section) -> Task:
    """TextPairTask('files', 'source', 'target'), or CaptionTask('files', 'image', 'caption')."""
    file_format = _format(section)
    tfds_keys = {key: setting(section, key) for key in TASK_KEYS if setting(section, key)}
    tfds_keys.pop("caption_choice", None)
    if tfds_keys:
        key = next(iter(tfds_keys))
        field = key.replace("_key", "_field")
        raise ValueError(
            f"Dataset 'files': config.task.{key}={tfds_keys[key]!r} names a field of a TFDS "
            f"dataset; name the field of your files with config.task.files.{field}."
        )
    if setting(section, "builder_module"):
        raise ValueError(
            f"config.task.builder_module={setting(section, 'builder_module')!r} names a TFDS "
            "builder; dataset 'files' reads config.task.files.* (set config.task.dataset to "
            "the builder's name to use it)."
        )
    caption_choice = setting(section, "caption_choice")
    if file_format in TEXT_FORMATS:
        if caption_choice:
            raise ValueError(
                f"Dataset 'files' with format {file_format!r} is text to text: "
                f"config.task.caption_choice={caption_choice!r} does not apply."
            )
        return TextPairTask(NAME, SOURCE, TARGET)
    if caption_choice and caption_choice not in CAPTION_CHOICES:
        raise ValueError(
            f"Dataset 'files': config.task.caption_choice={caption_choice!r}; choose one of "
            f"{list(CAPTION_CHOICES)} (every image has a list of captions)."
        )
    return CaptionTask(NAME, IMAGE, CAPTION, caption_choice or "first")


def _split_files(section: Section, split: str) -> list[str] | list[tuple[str, str]] | None:
    """The files of `split` (pairs of parallel files for 'text_pairs'); None when unset.

    Returns [] when the path or glob matches nothing.
    """
    pattern = _files(section, split)
    if not pattern:
        return None
    if _format(section) != "text_pairs":
        return file_lines.match_files(pattern)
    source_suffix, target_suffix = (
        _files(section, "source_suffix"),
        _files(section, "target_suffix"),
    )
    pairs = []
    for source_path in file_lines.match_files(f"{pattern}.{source_suffix}"):
        prefix = source_path[: -len(source_suffix) - 1]
        pairs.append((source_path, f"{prefix}.{target_suffix}"))
    return pairs


def _split_problem(section: Section, split: str) -> str | None:
    """Why split `split` cannot be opened (unset, nothing matches), or None."""
    pattern = _files(section, split)
    if not pattern:
        return (
            f"config.task.files.{split} is not set; give the {split} file(s): "
            f"--config.task.files.{split}=PATH (a path or a glob)"
        )
    found = _split_files(section, split)
    where = f"config.task.files.{split}={pattern!r}"
    if _format(section) == "text_pairs":
        suffix = _files(section, "source_suffix")
        if not found:
            reason = file_lines.why_nothing_matches(f"{pattern}.{suffix}")
            return f"{where}: {reason} (the source files, {pattern}.{suffix})"
        for _, target_path in found:
            if not os.path.isfile(target_path):
                return f"{where}: no such file {target_path} (the target file)"
        return None
    if not found:
        return f"{where}: {file_lines.why_nothing_matches(pattern)}"
    return None


def check(section: Section, splits: tuple[str, ...] | None = None) -> None:
    """Checks the keys and that the files of every split given exist (reads none of them).

    Args:
      section: config.task.
      splits: the splits to look for; by default every split that is set.

    Raises:
      ValueError: naming the config.task.files key that is wrong.
    """
    file_format = _format(section)
    make_task(section)
    used = _FORMAT_KEYS[file_format]
    for other_format, keys in _FORMAT_KEYS.items():
        for key in keys:
            if key not in used and _files(section, key) not in (None, DEFAULTS.get(key)):
                raise ValueError(
                    f"config.task.files.{key}={_files(section, key)!r} applies to format "
                    f"{other_format!r}, not to config.task.files.format={file_format!r}."
                )
    if file_format == "text_pairs":
        suffixes = [_files(section, "source_suffix"), _files(section, "target_suffix")]
        if not all(suffixes) or suffixes[0] == suffixes[1]:
            raise ValueError(
                "config.task.files.source_suffix and target_suffix must be two different "
                f"suffixes of the parallel files (e.g. 'en' and 'de' for train.en, train.de); "
                f"got {suffixes[0]!r} and {suffixes[1]!r}."
            )
    for key in ("source_field", "target_field", "image_field", "caption_field"):
        if key in used and not _files(section, key):
            raise ValueError(f"config.task.files.{key} must name a JSON field, got empty.")
    if "image_channels" in used and _files(section, "image_channels") not in image_files.CHANNELS:
        raise ValueError(
            f"config.task.files.image_channels={_files(section, 'image_channels')!r}; "
            f"choose {sorted(image_files.CHANNELS)} (grayscale or RGB)."
        )
    eval_split = setting(section, "eval_split") or "validation"
    if eval_split not in SPLITS:
        raise ValueError(
            f"config.task.eval_split={eval_split!r}; dataset 'files' has splits {list(SPLITS)}."
        )
    for split in splits if splits is not None else SPLITS:
        problem = _split_problem(section, split)
        if problem and (splits is not None or _files(section, split)):
            raise ValueError(problem)


def open_split(section: Section, split: str) -> Records:
    """Reads every file of `split` into memory (see `text_files`, `image_files`).

    Raises:
      RunError: for a split that is not set or matches no file, and for any
        problem in a file (`FILE:LINE: ...`).
    """
    if split not in SPLITS:
        raise RunError(f"Dataset 'files' has splits {list(SPLITS)}, not {split!r}.")
    problem = _split_problem(section, split)
    if problem:
        raise RunError(problem)
    return _READERS[_format(section)](section, _split_files(section, split))


def _read_tsv(section: Section, paths: list[str]) -> Records:
    return text_files.read_tsv(paths, header=bool(_files(section, "header")))


def _read_jsonl(section: Section, paths: list[str]) -> Records:
    return text_files.read_jsonl(
        paths,
        source_field=_files(section, "source_field"),
        target_field=_files(section, "target_field"),
    )


def _read_text_pairs(section: Section, pairs: list[tuple[str, str]]) -> Records:
    del section  # the pairs of files say everything
    return text_files.read_text_pairs(pairs)


def _read_jsonl_images(section: Section, paths: list[str]) -> Records:
    image_size = setting(section, "image_size")
    return image_files.read_jsonl_images(
        paths,
        image_field=_files(section, "image_field"),
        caption_field=_files(section, "caption_field"),
        channels=_files(section, "image_channels"),
        image_size=tuple(image_size) if image_size else None,
    )


# config.task.files.format -> reader of a split's files.
_READERS = {
    "tsv": _read_tsv,
    "jsonl": _read_jsonl,
    "text_pairs": _read_text_pairs,
    "jsonl_images": _read_jsonl_images,
}


FILES = DatasetKind(
    "'files' (your TSV, JSONL or parallel text files: config.task.files.*)",
    named(NAME),
    make_task,
    open_split,
    check=check,
)
