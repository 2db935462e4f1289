"""Text pairs from the user's files: TSV, JSON lines, or parallel plain-text files.

Formats (`config.task.files.format`):

- 'tsv': one pair a line, `source<TAB>target`; with `header=True` the first
  line of every file is a header and is not a pair. Fields are taken as they
  are (no quoting, no trimming), so neither may hold a tab.
- 'jsonl': one JSON object a line; the source and target are the string
  fields `source_field` and `target_field` ('a/b' names a nested field, e.g.
  'translation/de').
- 'text_pairs': two parallel files, one sentence a line, fairseq-style: the
  pair of `train.en` and `train.de` is named by the prefix 'train' and the
  suffixes 'en' and 'de'. Line n of one is the translation of line n of the other.

Every split is read once, whole, into memory, as two lists of str: a corpus
of millions of short lines takes a few hundred MB. Each file is checked as it
is read; a problem stops the run with `FILE:LINE: what is wrong`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, overload

from attnx.data.file_lines import read_lines
from attnx.errors import RunError

FIELD_NAMES = ("source", "target")


class TextPairs(Sequence[dict[str, str]]):
    """Random-access records {'source': str, 'target': str}, held in two lists.

    What `attnx.data.pipeline.make_pipeline` needs from a source (len and
    indexing), so shuffling, packing, sharding and resuming work as they do
    for `tfds.data_source`.
    """

    def __init__(self, sources: list[str], targets: list[str]):
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets.")
        self._sources = sources
        self._targets = targets

    def __len__(self) -> int:
        return len(self._sources)

    @overload
    def __getitem__(self, index: int) -> dict[str, str]: ...

    @overload
    def __getitem__(self, index: slice) -> TextPairs: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TextPairs(self._sources[index], self._targets[index])
        return {"source": self._sources[index], "target": self._targets[index]}

    def __repr__(self) -> str:
        return f"TextPairs({len(self)} pairs)"


def read_tsv(paths: Sequence[str], *, header: bool = False) -> TextPairs:
    """Reads `source<TAB>target` lines of each file, in order (the first skipped with header)."""
    sources, targets = [], []
    for path in paths:
        count = 0
        for number, line in read_lines(path):
            fields = line.split("\t")
            if len(fields) != 2:
                raise RunError(
                    f"{path}:{number}: {len(fields)} tab-separated field(s), expected 2 "
                    "(source<TAB>target)"
                )
            if header and number == 1:
                continue
            for column, (name, value) in enumerate(zip(FIELD_NAMES, fields, strict=True), 1):
                if not value.strip():
                    raise RunError(f"{path}:{number}: the {name} (column {column}) is empty")
            sources.append(fields[0])
            targets.append(fields[1])
            count += 1
        if not count:
            raise RunError(f"{path}: the file holds a header and no pair")
    return TextPairs(sources, targets)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a string")


def json_field(obj: Mapping[str, Any], key: str, where: str, setting: str) -> Any:
    """The field `key` ('a/b' for nested) of a JSON object, or a RunError naming what is missing.

    Args:
      obj: the decoded line.
      key: the field name.
      where: 'FILE:LINE' for the message.
      setting: the config key that names the field, for the message.
    """
    value: Any = obj
    for part in key.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            available = sorted(value) if isinstance(value, Mapping) else _json_type(value)
            raise RunError(f"{where}: no field {key!r} ({setting}); the object has {available}")
        value = value[part]
    return value


def read_json_object(path: str, number: int, line: str) -> dict[str, Any]:
    """One JSON-lines line as an object, or a RunError naming the file, line and column."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise RunError(
            f"{path}:{number}: invalid JSON: {error.msg} at column {error.colno}"
        ) from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}:{number}: expected a JSON object, got {_json_type(obj)}")
    return obj


def json_text(obj: Mapping[str, Any], key: str, where: str, setting: str) -> str:
    """A non-empty string field of a JSON object, or a RunError naming it."""
    value = json_field(obj, key, where, setting)
    if not isinstance(value, str):
        raise RunError(f"{where}: field {key!r} is {_json_type(value)}, expected a string")
    if not value.strip():
        raise RunError(f"{where}: field {key!r} is empty")
    return value


def read_jsonl(paths: Sequence[str], *, source_field: str, target_field: str) -> TextPairs:
    """Reads the source and target string fields of every JSON object, file after file."""
    sources, targets = [], []
    for path in paths:
        for number, line in read_lines(path):
            obj = read_json_object(path, number, line)
            where = f"{path}:{number}"
            sources.append(json_text(obj, source_field, where, "config.task.files.source_field"))
            targets.append(json_text(obj, target_field, where, "config.task.files.target_field"))
    return TextPairs(sources, targets)


def read_text_pairs(pairs: Sequence[tuple[str, str]]) -> TextPairs:
    """Reads parallel files (source file, target file), pair after pair; line n goes with line n.

    Raises:
      RunError: naming the first line that has no counterpart when the two
        files of a pair have different numbers of lines.
    """
    sources, targets = [], []
    for source_path, target_path in pairs:
        source_lines = [line for _, line in read_lines(source_path)]
        target_lines = [line for _, line in read_lines(target_path)]
        if len(source_lines) != len(target_lines):
            counts = [(source_path, len(source_lines)), (target_path, len(target_lines))]
            (long_path, long_count), (short_path, short_count) = sorted(
                counts, key=lambda path_count: -path_count[1]
            )
            raise RunError(
                f"{long_path}:{short_count + 1}: this line has no counterpart in {short_path}, "
                f"which ends after {short_count} lines (this file has {long_count}); parallel "
                "files hold one sentence a line, as many lines each"
            )
        sources.extend(source_lines)
        targets.extend(target_lines)
    return TextPairs(sources, targets)
